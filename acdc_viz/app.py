"""The Explorer as a stand-alone web page: Voila serves a one-cell notebook, with no code shown.

    acdc-viz app [--task NAME] [--port 8866] [--host 127.0.0.1] [--no-browser]
    voila notebooks/app.ipynb                 # the same page; add ?task=NAME to the URL

The notebook (``acdc_viz/app.ipynb``, shipped inside the package so that an installed
``acdc-viz app`` finds it) runs ``acdc_viz.app.show()``. Its settings come from the page's query
string (Voila passes it to the kernel as ``QUERY_STRING``: ``?task=tracr-reverse&tau=0.001``), and
otherwise from the environment ``acdc-viz app`` sets (``ACDC_VIZ_APP_TASK``). Anything wrong, such
as an unknown task or a model that cannot be loaded, is shown as an error page that says what to
do, never as a traceback.

Voila is optional: ``pip install 'acdc_viz[app]'``.
"""

from __future__ import annotations

import html
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from acdc_viz.errors import AcdcVizError, SettingsError

APP_NOTEBOOK = Path(__file__).with_name("app.ipynb")
"""The notebook Voila serves; ``notebooks/app.ipynb`` in the repository is a copy of it."""
TASK_ENV = "ACDC_VIZ_APP_TASK"
"""The task ``acdc-viz app --task`` asks for (the query string's ``task`` wins)."""
EXPORT_ENV = "ACDC_VIZ_APP_EXPORT_DIR"
"""Where the export buttons write: the folder ``acdc-viz app`` was started in."""
DEFAULT_TASK = "induction"
DEFAULT_PORT = 8866
"""Voila's own default; ``acdc-viz app`` takes the next free port from it unless --port is given."""
QUERY_KEYS = ("task", "tau", "positions", "layout")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class AppError(AcdcVizError, RuntimeError):
    """The app cannot be served: Voila is missing, or the port is taken."""


@dataclass(frozen=True)
class AppSettings:
    """What the page shows: a bundled or hub task and the Explorer's initial settings."""

    task: str = DEFAULT_TASK
    tau: float | None = None
    positions: bool = False
    layout: str = "seq"


def app_settings(query: str | None = None, env: Mapping[str, str] | None = None) -> AppSettings:
    """Parse the page's settings from a query string (``task=NAME&tau=0.01&positions=1``).

    The task is checked against the registry (nothing is loaded here).

    Raises:
        TaskError: an unknown task.
        SettingsError: an unknown query key, a bad tau, a bad ``positions`` flag.
        ValueError: an unknown layout.
    """
    from acdc_viz.layout import check_layout
    from acdc_viz.tasks import get_task
    from acdc_viz.taus import check_tau

    env = os.environ if env is None else env
    query = env.get("QUERY_STRING", "") if query is None else query
    parsed = parse_qs(query.lstrip("?"), keep_blank_values=True)
    values = {key: items[-1] for key, items in parsed.items()}
    unknown = sorted(set(values) - set(QUERY_KEYS))
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(unknown)} in the address: the page "
                            f"takes {', '.join(QUERY_KEYS)} (e.g. ?task=induction&tau=0.05)")
    task = values.get("task") or env.get(TASK_ENV) or DEFAULT_TASK
    get_task(task)
    tau = check_tau(values["tau"]) if values.get("tau") else None
    flag = values.get("positions", "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise SettingsError(f"positions must be 1 or 0 (true or false), not "
                            f"{values['positions']!r}")
    return AppSettings(task=task, tau=tau, positions=flag in _TRUE,
                       layout=check_layout(values.get("layout") or "seq"))


def error_page(exc: BaseException) -> str:
    """An HTML message for a page that could not show the Explorer: what went wrong, what to do."""
    from acdc_viz.tasks import TaskError, all_tasks

    title = "Unknown task" if isinstance(exc, TaskError) and "unknown task" in str(exc) else \
        "The Explorer could not start"
    cell = "<td style='text-align: left; padding: 2px 12px 2px 0'>"
    rows = "".join(
        f"<tr>{cell}<a href='?task={html.escape(t.name)}'><code>{html.escape(t.name)}</code></a>"
        "</td>"
        f"{cell}{'bundled (offline)' if t.bundled else 'needs the Hugging Face hub'}</td>"
        f"{cell}{html.escape(t.description)}</td></tr>"
        for t in all_tasks().values())
    return (
        "<div class='acdc-app-error' style='font-family: sans-serif; max-width: 60em; margin: 1em'>"
        f"<h2 style='color:#B00020'>acdc_viz: {html.escape(title)}</h2>"
        f"<p class='acdc-app-error-message'><b>{html.escape(str(exc))}</b></p>"
        "<p>The page's address takes <code>?task=NAME&amp;tau=T&amp;positions=1&amp;layout=NAME"
        "</code> (all optional). Pick a task from the list below (or run <code>acdc-viz tasks"
        "</code> in a terminal) and open this page with <code>?task=NAME</code> at the end of its "
        "address, or restart it with <code>acdc-viz app --task NAME</code>.</p>"
        "<table><tr>" + "".join(f"<th style='text-align: left'>{h}</th>"
                                for h in ("task", "model", "what it is"))
        + f"</tr>{rows}</table></div>"
    )


_LOAD_ERRORS: tuple[type[BaseException], ...] = (AcdcVizError, ValueError, OSError)


def app_view(query: str | None = None, env: Mapping[str, str] | None = None) -> Any:
    """The page's content: an ``AppPage`` for the requested task, or an error page (IPython HTML).

    Bad settings (an unknown task, a bad tau) are caught here, before anything is loaded.
    """
    from IPython.display import HTML

    env = os.environ if env is None else env
    try:
        settings = app_settings(query, env)
    except _LOAD_ERRORS as exc:
        return HTML(error_page(exc))
    return AppPage(settings, export_dir=env.get(EXPORT_ENV, "."))


class AppPage:
    """The page: a header line, then the Explorer, built once a browser has connected.

    Voila runs the notebook first and connects the page to the kernel afterwards, and the page
    then creates every widget at once from its saved state. anywidget gives each model two
    seconds to load its JavaScript; plotly's is megabytes, and under load the seq-graph's model
    missed that deadline about every other time here, leaving a figure that never updates.
    So the cell shows only a small signal widget; when its view sends ``ready`` (the page is
    connected), the Explorer is built, and its widgets reach the page one by one, as in JupyterLab.
    """

    def __init__(self, settings: AppSettings, export_dir: str | Path = ".") -> None:
        import ipywidgets as w

        self.settings = settings
        self.export_dir = export_dir
        self.explorer: Any = None
        self.error: str | None = None
        self.body = w.VBox([w.HTML(f"<i>Loading task <code>{html.escape(settings.task)}</code>: "
                                   "its model and prompts (a few seconds)...</i>")])
        self.signal = _ready_signal()
        self.signal.on_msg(self._on_msg)
        self.widget = w.VBox([w.HTML(header(settings.task)), self.body, self.signal])
        self.widget.add_class("acdc-app")

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("event") == "ready":
            self.load()

    def load(self) -> Any:
        """Build the Explorer (once) and show it, or show an error page; returns the Explorer."""
        import ipywidgets as w

        if self.explorer is not None or self.error is not None:
            return self.explorer
        from acdc_viz.widget import Explorer

        s = self.settings
        try:
            self.explorer = Explorer(s.task, tau=s.tau, positions=s.positions, layout=s.layout,
                                     export_dir=self.export_dir)
        except _LOAD_ERRORS as exc:  # DataError and ModelLoadError are AcdcVizErrors
            self.error = str(exc)
            self.body.children = (w.HTML(error_page(exc)),)
            return None
        sync_figure_state(self.explorer.widget)
        self.body.children = (self.explorer.widget,)
        return self.explorer

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


_READY_ESM = """
export default {
  render({ model, el }) {
    el.style.display = "none";
    model.send({ event: "ready" });
  },
};
"""


def _ready_signal() -> Any:
    """A hidden anywidget whose view tells the kernel that a page has connected and rendered."""
    import anywidget

    class ReadySignal(anywidget.AnyWidget):
        _esm = _READY_ESM

    return ReadySignal()


def sync_figure_state(widget: Any) -> None:
    """Make every plotly FigureWidget under ``widget`` carry its current traces and layout as state.

    A FigureWidget sends changes made after its construction as one-off messages; a page that
    builds the widget from its state later (Voila, a reloaded notebook) never sees them, and
    would draw empty axes. Plotly re-syncs like this when a figure is displayed on its own;
    inside a Box nobody does.
    """
    from copy import deepcopy

    from plotly.basewidget import BaseFigureWidget

    if isinstance(widget, BaseFigureWidget):
        widget._widget_layout = deepcopy(widget._layout_obj._props)
        widget._widget_data = deepcopy(widget._data)
    for child in getattr(widget, "children", ()):
        sync_figure_state(child)


def header(task: str) -> str:
    """The line above the Explorer: what this page is, and how to start."""
    from acdc_viz.tasks import all_tasks

    spec = all_tasks().get(task)
    about = f" ({html.escape(spec.description)})" if spec else ""
    return ("<div class='acdc-app-header' style='font-family: sans-serif; margin: 0 0 6px 2px'>"
            "<b>acdc_viz</b>: Automatic Circuit Discovery, one edge at a time. "
            f"Task <code>{html.escape(task)}</code>{about}. Pick tau, then <b>Step</b> through the "
            "edges or <b>Run</b>; the replay slider scrubs back through the run.</div>")


def show() -> None:
    """Display the page's content (the app notebook's only cell)."""
    from IPython.display import display

    display(app_view())


# ----- serving -----------------------------------------------------------------------------------

def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, port: int | None) -> int:
    """``port`` if free (an error otherwise); without one, the first free port from 8866."""
    if port is not None:
        if not port_is_free(host, port):
            raise AppError(f"port {port} on {host} is in use: pick another with --port, or leave "
                           "--port out to take the next free one")
        return port
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + 50):
        if port_is_free(host, candidate):
            return candidate
    raise AppError(f"no free port in {DEFAULT_PORT}..{DEFAULT_PORT + 49} on {host}: give one "
                   "with --port")


def has_display() -> bool:
    """Whether a browser window could open here (no display on a headless Linux server)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def voila_command(port: int, host: str = "127.0.0.1", open_browser: bool = False,
                  notebook: Path = APP_NOTEBOOK) -> list[str]:
    """The Voila command line that serves the app notebook on ``host:port``."""
    return [sys.executable, "-m", "voila", str(notebook), f"--port={port}", f"--Voila.ip={host}",
            "--Voila.port_retries=0", f"--Voila.open_browser={open_browser}",
            "--VoilaConfiguration.show_tracebacks=False", "--theme=light"]


def check_voila() -> None:
    if importlib.util.find_spec("voila") is None:
        raise AppError("the app needs Voila, which is not installed: pip install 'acdc_viz[app]' "
                       "(or pip install voila)")


def serve(task: str = DEFAULT_TASK, port: int | None = None, host: str = "127.0.0.1",
          open_browser: bool | None = None, log: Any = None) -> int:
    """Serve the app until Ctrl-C or the server exits; returns Voila's exit status (0 on Ctrl-C).

    The task is checked before anything starts. ``open_browser`` None opens one only where a
    display is available. ``log`` (a file, default stderr) gets the progress lines; the address
    is printed on stdout.

    Raises:
        TaskError: an unknown task.
        AppError: Voila is missing, or the port is taken.
    """
    from acdc_viz.tasks import get_task

    log = sys.stderr if log is None else log
    get_task(task)
    check_voila()
    port = pick_port(host, port)
    open_browser = has_display() if open_browser is None else open_browser
    env = dict(os.environ, **{TASK_ENV: task, EXPORT_ENV: os.getcwd()})
    url = f"http://{host}:{port}/"
    print(f"acdc-viz: serving the Explorer on task {task!r}; stop with Ctrl-C", file=log,
          flush=True)
    print(url, flush=True)
    process = subprocess.Popen(voila_command(port, host, open_browser), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return _wait_after_interrupt(process)


def _wait_after_interrupt(process: subprocess.Popen) -> int:
    """After Ctrl-C, which the server got too: let it shut its kernels down; 0, as asked."""
    deadline = time.monotonic() + 10
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        process.terminate()
        process.wait(5)
    return 0


# ----- the quickstart (`acdc-viz demo`) ----------------------------------------------------------

QUICKSTART = Path("notebooks") / "01_quickstart.ipynb"


def find_quickstart(cwd: Path | None = None) -> Path:
    """The quickstart notebook: under the current folder, else in the checkout acdc_viz runs from.

    Raises:
        AppError: neither has it (it ships with the repository, not with the package).
    """
    for root in (Path.cwd() if cwd is None else cwd, Path(__file__).resolve().parents[1]):
        if (root / QUICKSTART).is_file():
            return root / QUICKSTART
    raise AppError(f"the quickstart notebook ({QUICKSTART}) comes with the repository, not with "
                   "the package: clone the repository and run `make demo` there, or use "
                   "`acdc-viz app` for the Explorer alone")


def lab_command(notebook: Path, open_browser: bool, as_root: bool = False) -> list[str]:
    """The JupyterLab command line that opens ``notebook``.

    JupyterLab refuses to start as root unless told to; in a container that is the usual user.
    """
    return ([sys.executable, "-m", "jupyter", "lab", str(notebook)]
            + ([] if open_browser else ["--no-browser"]) + (["--allow-root"] if as_root else []))


def open_quickstart(open_browser: bool | None = None) -> int:
    """Open the quickstart in JupyterLab until Ctrl-C; returns JupyterLab's exit status."""
    notebook = find_quickstart()
    if importlib.util.find_spec("jupyterlab") is None:
        raise AppError("the quickstart needs JupyterLab, which is not installed: pip install "
                       "jupyterlab (or pip install -e '.[dev]' in the repository)")
    open_browser = has_display() if open_browser is None else open_browser
    print(f"acdc-viz: opening {notebook} in JupyterLab; stop with Ctrl-C", file=sys.stderr,
          flush=True)
    root = notebook.parents[1]
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    process = subprocess.Popen(lab_command(notebook.relative_to(root), open_browser, as_root),
                               cwd=root)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return _wait_after_interrupt(process)
