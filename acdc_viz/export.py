"""Writing a trace, or a figure of it, to a file: HTML, PNG, SVG or the trace's JSON.

HTML embeds plotly.js (about 4.5 MB), so the file opens offline and never fetches a script.
PNG and SVG go through kaleido, which drives a Chrome or Chromium browser; kaleido looks for
one at ``BROWSER_PATH`` first. When that is unset and a known Chromium is installed, the
export points kaleido at it for the duration of the call (the environment is restored after).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from acdc_viz.errors import AcdcVizError
from acdc_viz.trace import load_trace, save_trace

if TYPE_CHECKING:
    import plotly.graph_objects as go

FORMATS = (".html", ".png", ".svg", ".json")
"""The file suffixes ``render_file`` and ``export_figure`` write (JSON: ``render_file`` only)."""

BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome",
                      "/usr/bin/google-chrome-stable")
"""Where a browser is looked for when ``BROWSER_PATH`` is unset (then ``chromium`` etc. on PATH)."""

IMAGE_SCALE = 2
"""PNG pixels per CSS pixel: crisp on high-density screens and in slides."""


class ExportError(AcdcVizError, RuntimeError):
    """A figure could not be written: unknown format, or no kaleido/browser for PNG and SVG."""


def render_file(
    trace_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    step: int | None = None,
    layout: str = "seq",
) -> Path:
    """Load a trace file and write it to ``out_path``; the suffix picks the format.

    ``.html``, ``.png`` and ``.svg`` draw the circuit after ``step`` (None: the last recorded
    step; -1: the full graph) in ``layout``. ``.json`` writes the whole trace, validated
    (``step`` is still checked, but a trace has no single step to pick).

    Raises:
        TraceError: the trace file is unreadable or fails validation.
        IndexError: ``step`` is outside ``-1 .. len(steps) - 1``.
        ValueError: unknown layout.
        ExportError: unknown suffix, or PNG/SVG without kaleido or a browser.
    """
    from acdc_viz.figure import build_figure, resolve_step
    from acdc_viz.layout import check_layout

    out = Path(out_path)
    suffix = _suffix(out, FORMATS)
    check_layout(layout)
    trace = load_trace(trace_path)
    resolve_step(trace, step)
    if suffix == ".json":
        save_trace(trace, out)
        return out
    return export_figure(build_figure(trace, step, layout=layout), out)


def export_figure(fig: go.Figure | go.FigureWidget, out_path: str | os.PathLike[str], *,
                  scale: float = IMAGE_SCALE) -> Path:
    """Write a figure (``go.Figure`` or ``go.FigureWidget``) as ``.html``, ``.png`` or ``.svg``.

    ``scale`` is the PNG's pixels per CSS pixel.
    """
    out = Path(out_path)
    suffix = _suffix(out, FORMATS[:3])
    if suffix == ".html":
        fig.write_html(out, include_plotlyjs=True, full_html=True,
                       config={"displaylogo": False, "scrollZoom": True})
        return out
    write_image(fig, out, scale=scale)
    return out


def find_browser() -> str | None:
    """The browser kaleido would use: ``BROWSER_PATH`` if set, else a known Chromium, or None."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for candidate in BROWSER_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def write_image(fig: go.Figure | go.FigureWidget, out_path: str | os.PathLike[str], *,
                scale: float = IMAGE_SCALE) -> Path:
    """PNG or SVG through kaleido; ``ExportError`` saying how to fix a missing tool."""
    out = Path(out_path)
    suffix = _suffix(out, (".png", ".svg"))
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ExportError(
            f"cannot write {out.name}: PNG and SVG export needs kaleido (pip install 'kaleido>=1'),"
            " plus a Chrome or Chromium browser; or export to .html instead"
        ) from None
    browser = find_browser()
    if browser is None:
        env = os.environ.get("BROWSER_PATH")
        where = (f"BROWSER_PATH is set to {env!r}, which does not exist" if env else
                 "no Chrome or Chromium was found (looked at BROWSER_PATH, "
                 + ", ".join(BROWSER_CANDIDATES) + " and PATH)")
        raise ExportError(
            f"cannot write {out.name}: {where}. kaleido draws PNG and SVG through a browser: "
            "install one (Debian/Ubuntu: apt-get install chromium; or run plotly_get_chrome), "
            "or set BROWSER_PATH=/path/to/chromium. HTML export works without a browser."
        )
    with _browser_path(browser):
        try:
            fig.write_image(out, format=suffix[1:], scale=scale if suffix == ".png" else 1)
        except Exception as e:  # kaleido reports a failed browser start with many types
            raise ExportError(
                f"cannot write {out.name}: kaleido failed with the browser {browser} ({e}). "
                "Check that it starts (it needs --no-sandbox as root in containers), or set "
                "BROWSER_PATH to another Chrome/Chromium; HTML export works without a browser."
            ) from e
    return out


@contextlib.contextmanager
def _browser_path(browser: str) -> Iterator[None]:
    """Point kaleido at ``browser`` for the duration, restoring the environment after."""
    old = os.environ.get("BROWSER_PATH")
    os.environ["BROWSER_PATH"] = browser
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BROWSER_PATH", None)
        else:
            os.environ["BROWSER_PATH"] = old


def _suffix(out: Path, allowed: tuple[str, ...]) -> str:
    suffix = out.suffix.lower()
    if suffix not in allowed:
        raise ExportError(f"cannot write {out.name!r}: unknown format {suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(allowed)}")
    return suffix
