"""`acdc-viz app` and `acdc-viz demo` without a browser: settings, error pages, commands, exit
codes."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import nbformat
import pytest

from acdc_viz import app
from acdc_viz.cli import EXIT_ERROR, main
from acdc_viz.errors import SettingsError
from acdc_viz.tasks import TaskError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QUERY_STRING", raising=False)
    monkeypatch.delenv(app.TASK_ENV, raising=False)


@pytest.fixture
def no_server(monkeypatch):
    """Fail the test if anything tries to start a server process."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a server was started: {args}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_settings_from_the_query_string_and_the_environment():
    assert app.app_settings("", {}) == app.AppSettings("induction", None, False, "seq")
    assert app.app_settings("?task=tracr-reverse&tau=0.001&positions=1&layout=spring", {}) == \
        app.AppSettings("tracr-reverse", 0.001, True, "spring")
    assert app.app_settings("", {app.TASK_ENV: "induction-gpt2"}).task == "induction-gpt2"
    settings = app.app_settings("task=tracr-reverse", {app.TASK_ENV: "induction-gpt2"})
    assert settings.task == "tracr-reverse"
    settings = app.app_settings(None, {"QUERY_STRING": "task=tracr-proportion"})
    assert settings.task == "tracr-proportion"


@pytest.mark.parametrize("query, error, words", [
    ("task=nope", TaskError, "unknown task 'nope'"),
    ("tau=-1", SettingsError, "tau must be"),
    ("positions=maybe", SettingsError, "positions must be"),
    ("layout=circle", ValueError, "unknown layout"),
    ("colour=red", SettingsError, "unknown setting(s) colour"),
])
def test_bad_settings_are_named(query, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        app.app_settings(query, {})


def test_unknown_task_is_an_error_page_not_a_traceback():
    view = app.app_view("task=nope", {})
    page = view.data
    assert "acdc-app-error" in page and "Unknown task" in page
    assert "unknown task &#x27;nope&#x27;" in page
    for name in ("induction", "tracr-reverse", "ioi"):
        assert f"?task={name}'" in page
    assert "Traceback" not in page
    assert "could not start" in app.app_view("tau=abc", {}).data


def as_json(value) -> str:
    from plotly.utils import PlotlyJSONEncoder

    return json.dumps(value, cls=PlotlyJSONEncoder, sort_keys=True)


def test_the_explorer_is_built_when_the_page_says_ready_and_carries_its_figures_as_state():
    from plotly.basewidget import BaseFigureWidget

    page = app.app_view("task=tracr-reverse", {})
    assert isinstance(page, app.AppPage) and page.explorer is None
    assert "Loading task" in page.body.children[0].value
    page._on_msg(page.signal, {"event": "ready"}, [])
    explorer = page.explorer
    assert explorer.name == "tracr-reverse" and page.body.children == (explorer.widget,)
    assert page.load() is explorer                     # a second view's "ready" builds nothing
    figures = []

    def collect(widget):
        if isinstance(widget, BaseFigureWidget):
            figures.append(widget)
        for child in getattr(widget, "children", ()):
            collect(child)

    collect(explorer.widget)
    assert len(figures) >= 2       # the seq-graph, the metric history (and more)
    for fig in figures:            # the state a page rebuilds the figure from: its current content
        assert fig._widget_data and as_json(fig._widget_data) == as_json(fig._data)
        assert as_json(fig._widget_layout) == as_json(fig._layout_obj._props)
    assert any(len(trace.get("x", ())) for trace in figures[0]._widget_data)
    assert "tracr-reverse" in app.header(explorer.name)


def test_a_model_that_cannot_load_is_an_error_page():
    page = app.app_view("task=docstring", {})       # a hub task, and the hub is off
    assert page.load() is None
    assert "acdc-app-error" in page.body.children[0].value and page.error


def test_the_app_notebook_is_one_hidden_cell_and_the_repository_copy_matches():
    nb = nbformat.read(app.APP_NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1 and "show()" in code[0].source and not code[0].outputs
    assert (ROOT / "notebooks" / "app.ipynb").read_text() == app.APP_NOTEBOOK.read_text(), \
        "notebooks/app.ipynb is a copy of acdc_viz/app.ipynb: cp acdc_viz/app.ipynb notebooks/"


def test_voila_command():
    command = app.voila_command(9123, "127.0.0.1", open_browser=False)
    assert command[1:4] == ["-m", "voila", str(app.APP_NOTEBOOK)]
    assert "--port=9123" in command and "--Voila.ip=127.0.0.1" in command
    assert "--Voila.open_browser=False" in command and "--Voila.port_retries=0" in command


def test_unknown_task_fails_before_any_server_starts(capsys, no_server):
    assert main(["app", "--task", "nope"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert "unknown task 'nope'" in captured.err and "acdc-viz tasks" in captured.err
    assert captured.out == ""


def test_a_taken_port_is_an_error(capsys, no_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["app", "--port", str(port)]) == EXIT_ERROR
    assert f"port {port}" in capsys.readouterr().err


def test_missing_voila_says_what_to_install(monkeypatch, capsys, no_server):
    real = app.importlib.util.find_spec
    monkeypatch.setattr(app.importlib.util, "find_spec",
                        lambda name: None if name == "voila" else real(name))
    assert main(["app"]) == EXIT_ERROR
    assert "pip install 'acdc_viz[app]'" in capsys.readouterr().err


def test_serve_passes_the_task_and_prints_the_address(monkeypatch, capsys, tmp_path):
    started = {}

    class FakeVoila:
        def __init__(self, command, env):
            started.update(command=command, env=env)

        def wait(self):
            return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app.subprocess, "Popen", FakeVoila)
    assert main(["app", "--task", "tracr-reverse", "--no-browser"]) == 0
    out, err = capsys.readouterr()
    port = int(out.strip().rsplit(":", 1)[1].rstrip("/"))
    assert out == f"http://127.0.0.1:{port}/\n" and "tracr-reverse" in err
    assert started["env"][app.TASK_ENV] == "tracr-reverse"
    assert started["env"][app.EXPORT_ENV] == str(tmp_path)
    assert f"--port={port}" in started["command"]
    assert "--Voila.open_browser=False" in started["command"]


def test_demo_opens_the_quickstart(monkeypatch, tmp_path):
    assert app.find_quickstart(tmp_path) == ROOT / "notebooks" / "01_quickstart.ipynb"
    command = app.lab_command(Path("notebooks/01_quickstart.ipynb"), open_browser=False)
    assert command[1:] == ["-m", "jupyter", "lab", "notebooks/01_quickstart.ipynb", "--no-browser"]
    assert app.lab_command(Path("nb.ipynb"), open_browser=True, as_root=True)[-1] == "--allow-root"
    monkeypatch.setattr(app, "__file__", str(tmp_path / "site-packages" / "acdc_viz" / "app.py"))
    with pytest.raises(app.AppError, match="comes with the repository"):
        app.find_quickstart(tmp_path)


def test_headless_demo_writes_the_trace_and_the_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["demo", "--headless", "--out-dir", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("edges tested 81,") and "complete" in out[0]
    assert out[1].startswith(f"wrote {tmp_path / 'out' / 'circuit.html'}")
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert trace["status"]["state"] == "complete"
    assert (tmp_path / "out" / "circuit.html").stat().st_size > 1000
