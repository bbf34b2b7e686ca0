"""Reading the Explorer's state off a browser page, and stopping the servers behind it (shared by
the JupyterLab and Voila tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

STATUS = re.compile(r"step (\d+) / (\d+)\s*·\s*edges kept (\d+)")


def explorer_status(explorer) -> tuple[int, int, int] | None:
    """(step, edges, kept) from the status line of the Explorer under ``explorer`` (a locator)."""
    match = STATUS.search(explorer.locator(".acdc-status").inner_text().replace("\xa0", " "))
    return None if match is None else tuple(int(g) for g in match.groups())


def edge_paths(explorer) -> list[str]:
    """The ``d`` of every line path drawn in the seq-graph (not the small history plot)."""
    return explorer.locator(".acdc-figure .js-plotly-plot .scatterlayer path.js-line").evaluate_all(
        "paths => paths.map(p => p.getAttribute('d') || '')")


def stop_process_group(process: subprocess.Popen, first: signal.Signals, timeout: float) -> None:
    """Send ``first`` to the process group we started (a server and its kernels), then SIGKILL
    if it lingers past ``timeout`` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, first)
        process.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(5)
