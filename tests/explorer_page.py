"""Reading the Explorer's state off a browser page (shared by the JupyterLab and Voila tests)."""

from __future__ import annotations

import re

STATUS = re.compile(r"step (\d+) / (\d+)\s*·\s*edges kept (\d+)")


def explorer_status(explorer) -> tuple[int, int, int] | None:
    """(step, edges, kept) from the status line of the Explorer under ``explorer`` (a locator)."""
    match = STATUS.search(explorer.locator(".acdc-status").inner_text().replace("\xa0", " "))
    return None if match is None else tuple(int(g) for g in match.groups())


def edge_paths(explorer) -> list[str]:
    """The ``d`` of every line path drawn in the seq-graph (not the small history plot)."""
    return explorer.locator(".acdc-figure .js-plotly-plot .scatterlayer path.js-line").evaluate_all(
        "paths => paths.map(p => p.getAttribute('d') || '')")
