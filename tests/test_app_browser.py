"""`acdc-viz app`: the Explorer alone, served by Voila, in headless chromium (issue 6, part 3).

The test starts ``acdc-viz app --task induction --port P --no-browser`` (Jupyter's own folders in a
temporary directory, so that a user's settings can't interfere), then checks in the browser:

1. The page shows the Explorer and no code: no input areas, no editor, not the cell's source.
2. The seq-graph is drawn (Voila builds widgets from their state, so this catches figures whose
   content was only ever sent as update messages).
3. ``Step``: the status line goes from ``step 0 / N`` to ``step 1 / N`` and the drawn edges change.
4. ``?task=nope``: an error page that names the task and lists the real ones, and no traceback.

Screenshots go to ``tmp_path/screenshots`` (``app-start``, ``app-step``, ``app-unknown-task``); with
``ACDC_VIZ_SAVE_SCREENSHOTS=1`` they are also copied to ``docs/screenshots/``.

Run it alone with ``pytest -m browser tests/test_app_browser.py -s``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from explorer_page import edge_paths, explorer_status, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs /usr/bin/chromium (apt-get install -y chromium; "
                              "`make browser`)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C to acdc-viz and Voila, as a user would."""
    stop_process_group(process, signal.SIGINT, 20)


class App:
    def __init__(self, url: str, log: Path, process: subprocess.Popen) -> None:
        self.url, self.log, self.process = url, log, process

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    pytest.importorskip("voila", reason="needs voila (pip install -e '.[dev]' or '.[app]')")
    port = _free_port()
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               IPYTHONDIR=str(tmp_path / "ipython"),
               HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "app.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "acdc_viz", "app", "--task", "induction", "--port", str(port),
             "--no-browser"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            start_new_session=True)
    try:
        url = process.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/", \
            f"the address on stdout: {url!r}\n{log.read_text()}"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"acdc-viz app exited with {process.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"acdc-viz app did not listen within 60 s:\n{log.read_text()}")
                time.sleep(0.2)
        yield App(url, log, process)
    finally:
        _stop(process)


def _wait(page, condition, timeout: float, what: str, app: App):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nserver log:\n"
                        f"{app.log_tail()}")
        page.wait_for_timeout(200)


def _shot(page, path: Path) -> None:
    page.mouse.move(640, 790)      # off the plots: no hover label, no mode bar
    page.wait_for_timeout(800)
    page.screenshot(path=str(path))


def test_app_serves_the_explorer_alone(app: App, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(30_000)
            page.goto(app.url, timeout=120_000)
            # the kernel starts, imports torch and loads the model before the page fills in
            page.wait_for_selector(".acdc-explorer .acdc-status", timeout=150_000)
            explorer = page.locator(".acdc-explorer")
            _wait(page, lambda: (s := explorer_status(explorer)) and s[0] == 0 and s, 30,
                  "step 0", app)
            n_edges = explorer_status(explorer)[1]
            before = _wait(page, lambda: edge_paths(explorer), 30,
                           "the seq-graph's edges to be drawn", app)

            # no code: the cell's input is stripped
            code = ".jp-InputArea, .jp-InputArea-editor, .cm-editor, .CodeMirror"
            assert page.locator(code).count() == 0
            text = page.locator("body").inner_text()
            assert "import" not in text and "show()" not in text, text[:500]
            assert page.locator(".acdc-app-header", has_text="induction").count() == 1
            assert page.locator(".jp-OutputArea-output[data-mime-type*='stderr']").count() == 0
            _shot(page, shots / "app-start.png")

            step = page.locator(".acdc-explorer button", has_text=re.compile("^Step$"))
            _wait(page, step.is_enabled, 30, "Step to be enabled", app)
            step.click()
            _wait(page, lambda: (s := explorer_status(explorer)) and s[0] == 1, 60,
                  "the status to show step 1", app)
            assert page.locator(".acdc-explorer .acdc-status").inner_text().replace("\xa0", " ") \
                .startswith(f"step 1 / {n_edges}")
            _wait(page, lambda: (d := edge_paths(explorer)) != before and d, 15,
                  "the seq-graph to change after Step", app)
            _wait(page, step.is_enabled, 30, "the step to finish", app)
            _shot(page, shots / "app-step.png")

            page.goto(app.url + "?task=nope", timeout=120_000)
            error = page.wait_for_selector(".acdc-app-error", timeout=150_000)
            message = error.inner_text()
            assert "Unknown task" in message and "unknown task 'nope'" in message
            assert "tracr-reverse" in message and "induction-gpt2" in message
            assert "Traceback" not in page.locator("body").inner_text()
            assert page.locator(".acdc-explorer").count() == 0
            _shot(page, shots / "app-unknown-task.png")
        finally:
            browser.close()
    assert "Traceback" not in app.log.read_text(errors="replace"), app.log_tail()
    if os.environ.get("ACDC_VIZ_SAVE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("app-start", "app-step", "app-unknown-task"):
            shutil.copy(shots / f"{name}.png", SCREENSHOTS / f"{name}.png")
