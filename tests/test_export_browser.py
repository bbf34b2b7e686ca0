"""Export: self-contained HTML drawn by a real browser, PNG/SVG through kaleido, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_figure import fake_trace

from acdc_viz.export import ExportError, export_figure, find_browser, render_file
from acdc_viz.figure import TRACE_IDS, build_figure
from acdc_viz.trace import TraceError, load_trace, save_trace

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (apt-get install -y chromium); CI installs it",
)
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.json"
    save_trace(fake_trace(2, 3, n_positions=2, n_steps=100), path)
    return path


def test_html_is_self_contained(trace_file: Path, tmp_path: Path) -> None:
    out = render_file(trace_file, tmp_path / "c.html", step=40)
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "c.html"
    assert len(text) > 3_000_000, "plotly.js is embedded"
    assert '<script src="http' not in text and "cdn.plot.ly" not in text.split("/*")[0]
    assert "step 41 \\u002f 150" in text  # plotly escapes "/" inside the embedded JSON


def test_json_export_is_the_trace(trace_file: Path, tmp_path: Path) -> None:
    out = render_file(trace_file, tmp_path / "copy.json")
    assert load_trace(out) == load_trace(trace_file)


def test_bad_inputs_get_clear_errors(trace_file: Path, tmp_path: Path) -> None:
    with pytest.raises(IndexError, match=r"-1\.\.99"):
        render_file(trace_file, tmp_path / "c.html", step=100)
    with pytest.raises(ValueError, match="unknown layout 'grid'.*seq"):
        render_file(trace_file, tmp_path / "c.html", layout="grid")
    with pytest.raises(ExportError, match=r"\.html, \.png, \.svg, \.json"):
        render_file(trace_file, tmp_path / "c.pdf")
    broken = json.loads(trace_file.read_text())
    broken["steps"][3]["delta"] = 123.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(TraceError, match=r"steps\[3\]\.delta"):
        render_file(bad, tmp_path / "c.html")
    assert not (tmp_path / "c.html").exists()


def test_png_without_browser_says_how_to_enable_it(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    assert find_browser() is None
    fig = build_figure(fake_trace(1, 1))
    with pytest.raises(ExportError) as info:
        export_figure(fig, tmp_path / "c.png")
    message = str(info.value)
    assert "apt-get install chromium" in message and "BROWSER_PATH" in message
    assert "HTML" in message
    assert not (tmp_path / "c.png").exists()


@pytest.mark.browser
@needs_chromium
def test_png_and_svg_through_kaleido(trace_file: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("kaleido", reason="PNG/SVG export needs kaleido (pip install kaleido)")
    monkeypatch.delenv("BROWSER_PATH", raising=False)  # found at /usr/bin/chromium
    png = render_file(trace_file, tmp_path / "c.png", step=-1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = render_file(trace_file, tmp_path / "c.svg", layout="spring")
    assert b"<svg" in svg.read_bytes()[:400]
    import os

    assert "BROWSER_PATH" not in os.environ, "the environment is restored"


@pytest.mark.browser
@needs_chromium
def test_html_export_draws_in_headless_chromium(trace_file: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs playwright (pip install playwright)")
    trace = load_trace(trace_file)
    out = render_file(trace_file, tmp_path / "c.html", step=60)
    n_nodes = len(trace.graph.nodes)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_selector(".js-plotly-plot .scatterlayer", timeout=30_000)
            # plotly.js names each trace's group "trace<uid>"; empty traces draw no group
            assert page.locator(".js-plotly-plot .scatterlayer g.trace.scatter").count() <= len(
                TRACE_IDS)
            markers = page.locator(".js-plotly-plot .scatterlayer g.tracenodes path.point")
            assert markers.count() == n_nodes
            lines = page.locator(".js-plotly-plot .scatterlayer path.js-line")
            assert lines.count() >= 3  # removed, untested and kept edges are drawn
            title = page.locator(".js-plotly-plot .gtitle").text_content() or ""
            assert "step 61 / 150" in title
            # the invisible marker at an edge's middle makes the edge hoverable
            hover = build_figure(trace, 60).data[TRACE_IDS.index("hover")]
            edge = trace.graph.edges[5].name
            i = list(hover.customdata).index(edge)
            x, y = page.evaluate(
                """([x, y]) => { const gd = document.querySelector('.js-plotly-plot');
                const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
                return [r.left + gd._fullLayout.xaxis.l2p(x),
                        r.top + gd._fullLayout.yaxis.l2p(y)]; }""",
                [float(hover.x[i]), float(hover.y[i])])
            page.mouse.move(x, y)
            page.wait_for_selector(".hoverlayer .hovertext", timeout=5_000)
            label = page.locator(".hoverlayer").text_content() or ""
            assert edge in label and "Δmetric" in label and "step 5" in label
            assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
        finally:
            browser.close()
