"""The Explorer in a real JupyterLab, driven by headless chromium (issue 5, part 5).

The test starts JupyterLab on 127.0.0.1 (random free port, a token, every Jupyter config, data,
settings and workspace directory in a temporary folder so that a user's own settings can't
interfere), opens a copy of ``notebooks/01_quickstart.ipynb`` and runs all of it through the Run
menu. The quickstart drives the Explorer from code too (it runs to the end), so the test then
presses ``Reset`` and works on a fresh run:

0. The layout at 1280x800: nothing inside the widget's output scrolls, and the seq-graph is shown
   whole (checked at the start and the end, with JupyterLab's file browser open and closed).
1. ``Step`` three times: the status line must advance to ``step 3 / N``, and the seq-graph's drawn
   edges (the ``d`` of its plotly line paths) must change.
2. ``-1`` typed into the tau box: the box is flagged invalid, and ``Run`` and ``Step`` are disabled.
3. A new tau typed into the tau box (Enter), then ``Run`` to completion: the final ``edges kept``
   must equal ``acdc-viz run --task induction --tau T`` (started in parallel at the beginning).
4. The quickstart's second Explorer, on ``induction-llama`` (grouped-query attention), shows its
   finished run whole: every edge of its 82-edge graph tested, as many kept as its canonical
   circuit has, and key and value edges named by KV group in the figure's hover texts
   (``A0.0->A1.kv0.k``).

Screenshots at 1280x800 go to the test's ``tmp_path/screenshots``: ``start`` (after Reset),
``mid`` (after three steps), ``invalid-tau``, ``running`` (best effort: the run takes seconds),
``end``, ``end-wide`` (the file browser closed) and ``llama``. With
``ACDC_VIZ_SAVE_SCREENSHOTS=1``, start, mid and end are also copied to
``docs/screenshots/explorer-{start,mid,end}.png``.

Run it alone with ``pytest -m browser tests/test_widget_browser.py -s`` (``-s`` prints the timings).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from explorer_page import edge_paths, explorer_status, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "notebooks" / "01_quickstart.ipynb"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}
TAUS = (0.05, 0.03)
"""The tau the test types in: the first one that is not the task's default."""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs /usr/bin/chromium (apt-get install -y chromium; "
                              "`make browser`)"),
]

CLI_SUMMARY = re.compile(r"edges kept (\d+) of (\d+)")


# ----- JupyterLab --------------------------------------------------------------------------------

@dataclass
class Lab:
    base: str
    token: str
    root: Path
    log: Path

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}token={self.token}"

    def api(self, path: str) -> object:
        with urllib.request.urlopen(self.url(path), timeout=5) as response:
            return json.load(response)

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_env(tmp: Path) -> dict[str, str]:
    """Jupyter's own folders in ``tmp``; the announcements plugin (the news toast) disabled."""
    config = tmp / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_DATA_DIR=str(tmp / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"),
        IPYTHONDIR=str(tmp / "ipython"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


def _stop(process: subprocess.Popen, timeout: float = 15) -> None:
    stop_process_group(process, signal.SIGTERM, timeout)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    pytest.importorskip("jupyterlab", reason="needs jupyterlab (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="needs ipykernel (pip install -e '.[dev]')")
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(QUICKSTART, root / QUICKSTART.name)
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=root, env=_lab_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}:\n{server.log_tail()}")
            try:
                server.api("/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within 60 s:\n{server.log_tail()}")
                time.sleep(0.2)
        yield server
    finally:
        _stop(process)


# ----- the browser side --------------------------------------------------------------------------

class Notebook:
    """A JupyterLab page with helpers that wait, dismissing the kernel dialog whenever it shows."""

    def __init__(self, page, lab: Lab, shots: Path) -> None:
        self.page = page
        self.lab = lab
        self.shots = shots
        self.timings: dict[str, float] = {}
        self.t0 = time.monotonic()

    def mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self.t0, 1)

    def dismiss_dialogs(self) -> None:
        # "Select Kernel" shows when cells run before the session is settled: keep Python 3.
        accept = self.page.locator(".jp-Dialog:has-text('Select Kernel') .jp-mod-accept")
        if accept.count():
            accept.first.click()

    def wait_until(self, condition: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while True:
            self.dismiss_dialogs()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot("failure")
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n"
                            f"outputs: {self.errors() or '(no error output)'}\n"
                            f"JupyterLab log:\n{self.lab.log_tail(15)}")
            time.sleep(0.2)

    def errors(self) -> list[str]:
        """Tracebacks in the notebook's outputs (warnings on stderr don't count)."""
        found = self.page.locator(".jp-OutputArea-output[data-mime-type*='stderr'], "
                                  ".jp-OutputArea-output[data-mime-type*='error']")
        return [text[-1500:] for text in found.all_inner_texts()
                if "Traceback" in text or re.search(r"^\w*Error\b", text, re.MULTILINE)]

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.mouse.move(640, 790)   # off the plots (no hover label, no plotly mode bar)
        self.page.wait_for_timeout(800)  # the mode bar fades out
        self.page.screenshot(path=str(path))
        return path

    def kernel_idle(self) -> bool:
        try:
            sessions = self.lab.api("/api/sessions")
        except OSError:
            return False
        # the toolbar says "idle" once before the kernel connects: ask the server too
        idle = [s for s in sessions if s.get("path", "").endswith(QUICKSTART.name)
                and s.get("kernel", {}).get("execution_state") == "idle"]
        indicator = self.page.locator(
            ".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']")
        return bool(idle) and indicator.count() > 0


_SCROLLERS = """e => {
  const out = e.closest('.jp-OutputArea-output') || e;
  const scrolls = (x, axis) => {
    const cs = getComputedStyle(x);
    const over = axis === 'x' ? x.scrollWidth > x.clientWidth + 1
                              : x.scrollHeight > x.clientHeight + 1;
    const overflow = axis === 'x' ? cs.overflowX : cs.overflowY;
    return over && !['hidden', 'visible', 'clip'].includes(overflow);
  };
  const found = [];
  for (const x of [out, ...out.querySelectorAll('*')]) {
    for (const axis of ['x', 'y']) {
      if (scrolls(x, axis)) found.push(`${axis}: ${x.className} ${x.scrollWidth}x${x.scrollHeight} `
                                       + `in ${x.clientWidth}x${x.clientHeight}`);
    }
  }
  return found;
}"""


def _check_layout(explorer) -> None:
    """Nothing in the widget's output scrolls, and the seq-graph is shown whole."""
    scrollers = explorer.evaluate(_SCROLLERS)
    assert not scrollers, f"scrollable boxes inside the notebook: {scrollers}"
    plot = explorer.locator(".acdc-figure .js-plotly-plot").bounding_box()
    box = explorer.locator(".acdc-figure").bounding_box()
    assert plot["width"] <= box["width"] + 1 and plot["height"] <= box["height"] + 1, (plot, box)


def _show_widget(nb: Notebook, explorer) -> None:
    explorer.evaluate("e => e.scrollIntoView({block: 'start'})")
    nb.page.wait_for_timeout(300)


def _new_tau(default: float) -> float:
    return next(t for t in TAUS if not math.isclose(t, default))


def test_quickstart_explorer_in_jupyterlab(lab: Lab, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs playwright (pip install -e '.[dev]')")
    from acdc_viz.tasks import get_task

    tau = _new_tau(get_task("induction").default_tau)
    # the reference run, from the terminal, in parallel with everything below
    cli_trace = tmp_path / f"cli-tau{tau:g}.json"
    acdc_viz_cli = shutil.which("acdc-viz")
    cli_cmd = ([acdc_viz_cli] if acdc_viz_cli else [sys.executable, "-m", "acdc_viz.cli"]) + [
        "run", "--task", "induction", "--tau", f"{tau:g}", "--out", str(cli_trace), "--quiet"]
    cli = subprocess.Popen(cli_cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           start_new_session=True)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(30_000)
                nb = Notebook(page, lab, shots)
                widget_kept = _drive(nb, tau)
            finally:
                browser.close()
        cli_out, _ = cli.communicate(timeout=120)
    finally:
        _stop(cli, timeout=5)
    assert cli.returncode == 0, f"acdc-viz run failed:\n{cli_out}"
    summary = CLI_SUMMARY.search(cli_out)
    assert summary, f"no summary line in the CLI's output:\n{cli_out}"
    cli_kept = int(summary.group(1))
    trace = json.loads(cli_trace.read_text())
    assert trace["steps"][-1]["kept_edges"] == cli_kept == len(trace["final"]["kept_edges"])
    print(f"\nbrowser test timings (s since the page opened): {nb.timings}; screenshots in {shots}")
    assert widget_kept == cli_kept, (f"tau={tau:g}: the widget kept {widget_kept} edges, "
                                     f"`acdc-viz run` kept {cli_kept}")

    if os.environ.get("ACDC_VIZ_SAVE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("start", "mid", "end"):
            shutil.copy(shots / f"{name}.png", SCREENSHOTS / f"explorer-{name}.png")


def _drive(nb: Notebook, tau: float) -> int:
    """Everything in the browser; returns the widget's final ``edges kept`` at ``tau``."""
    page = nb.page
    page.goto(nb.lab.url(f"/lab/tree/{QUICKSTART.name}?reset"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook")
    nb.wait_until(nb.kernel_idle, 60, "the notebook's kernel to be idle")
    nb.mark("kernel idle")

    # Run > Run All Cells
    page.locator(".jp-NotebookPanel").first.click()
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator("li[data-command='runmenu:run-all']").click()
    last_output = page.locator(".jp-OutputArea-output", has_text="induction-llama:")
    nb.wait_until(lambda: last_output.count() or nb.errors(), 150, "the quickstart to finish")
    assert not nb.errors(), f"the quickstart raised:\n{nb.errors()}"
    nb.mark("notebook ran")

    explorer = page.locator(".acdc-explorer").first
    button = {name: explorer.locator("button", has_text=re.compile(f"^{name}$"))
              for name in ("Run", "Step", "Reset")}
    # the quickstart ran the Explorer to the end from code: back to the full graph
    button["Reset"].click()
    status = nb.wait_until(
        lambda: (s := explorer_status(explorer)) and s[0] == 0 and s[1] == s[2] and s,
        30, "Reset to show step 0 and every edge kept")
    n_edges = status[1]
    _show_widget(nb, explorer)
    nb.wait_until(lambda: edge_paths(explorer), 10, "the seq-graph's edges to be drawn")
    nb.screenshot("start")
    before = edge_paths(explorer)
    _check_layout(explorer)

    for k in (1, 2, 3):
        nb.wait_until(button["Step"].is_enabled, 30, f"Step to be enabled (before step {k})")
        button["Step"].click()
        nb.wait_until(lambda k=k: (s := explorer_status(explorer)) and s[0] == k, 30,
                      f"the status to show step {k}")
    status_text = explorer.locator(".acdc-status").inner_text().replace("\xa0", " ")
    assert status_text.startswith(f"step 3 / {n_edges}")
    after = nb.wait_until(lambda: (d := edge_paths(explorer)) != before and d, 10,
                          "the seq-graph's edges to change after three steps")
    assert after != before
    nb.wait_until(button["Step"].is_enabled, 30, "the third step to finish")
    nb.mark("three steps")
    nb.screenshot("mid")

    # a tau that is not a positive number is flagged, and nothing can run
    box = explorer.locator(".acdc-tau-text input")
    box.fill("-1")
    box.press("Enter")
    nb.wait_until(lambda: explorer.locator(".acdc-tau-text.acdc-invalid").count(), 10,
                  "the tau box to be flagged invalid")
    nb.wait_until(lambda: not button["Run"].is_enabled() and not button["Step"].is_enabled(), 10,
                  "Run and Step to be disabled for an invalid tau")
    nb.screenshot("invalid-tau")

    # a new tau, typed exactly (Enter commits it), then Run to the end
    box.fill(f"{tau:g}")
    box.press("Enter")
    nb.wait_until(lambda: f"tau {tau:g}" in explorer.locator(".acdc-status").inner_text()
                  and (s := explorer_status(explorer)) and s[0] == 0, 30,
                  f"the widget to switch to tau {tau:g}")
    assert not explorer.locator(".acdc-tau-text.acdc-invalid").count()
    nb.wait_until(button["Run"].is_enabled, 10, "Run to be enabled")
    button["Run"].click()
    if "complete" not in explorer.locator(".acdc-status").inner_text():
        nb.screenshot("running")   # best effort: the bundled run takes only seconds
    nb.wait_until(lambda: "complete" in explorer.locator(".acdc-status").inner_text(), 90,
                  "the run to complete")
    final = explorer_status(explorer)
    assert final[0] == final[1] == n_edges
    nb.mark("run complete")
    page.wait_for_timeout(300)     # let plotly finish the last redraw
    nb.screenshot("end")
    _check_layout(explorer)
    # the same at the width JupyterLab gives a notebook with its file browser closed
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
    page.wait_for_timeout(500)
    _show_widget(nb, explorer)
    nb.screenshot("end-wide")
    _check_layout(explorer)
    _check_llama(nb)
    return final[2]


_HOVER_TEXTS = """e => e.querySelector('.acdc-figure .js-plotly-plot').data
  .flatMap(t => [].concat(t.hovertext || t.text || []))"""


def _check_llama(nb: Notebook) -> None:
    """The quickstart's Explorer on ``induction-llama``: its run drawn complete, on the
    grouped-query graph's 82 edges, keeping as many as its canonical circuit has (the very same
    edges: ``test_induction_llama.py``), with key and value edges named by KV group."""
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.tasks import get_task, induction

    n_edges = len(CircuitGraph(2, 4, n_kv_heads=2))
    canonical = get_task("induction-llama").canonical_edges(False, induction.SEQ_LEN)
    explorer = nb.page.locator(".acdc-explorer").nth(1)
    _show_widget(nb, explorer)
    nb.wait_until(lambda: explorer_status(explorer) == (n_edges, n_edges, len(canonical)), 30,
                  f"the Llama Explorer to show its complete run ({len(canonical)} edges kept)")
    nb.wait_until(lambda: edge_paths(explorer), 10, "the Llama seq-graph's edges to be drawn")
    texts = " ".join(explorer.evaluate(_HOVER_TEXTS))
    assert "<b>A0.0->A1.kv0.k</b>" in texts and "<b>A1.kv1.v</b>" in texts
    nb.screenshot("llama")
    _check_layout(explorer)

