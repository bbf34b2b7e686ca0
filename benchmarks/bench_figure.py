"""Seq-graph figure speed: build time and one in-place update per step (issue 4; not a test).

Traces are fabricated (consistent, via Trace.record) for graphs of about 500, 2,000 and 10,000
edges, half of the edges tested, about 70% of those removed. For each:

- build: ``build_figure`` with the geometry cache cold (first figure of that graph shape) and
  warm (the widget's case after the first figure);
- update: ``update_figure`` from one step to the next, on a ``go.FigureWidget`` (what the
  widget calls per step; the Python side only, no browser attached) and on a ``go.Figure``;
  also with a highlighted node. Median of ``--repeats`` consecutive steps;
- encode: JSON-encoding all the traces' data, an upper bound on what a notebook adds per
  step to send the update to the browser.

Target (docs/architecture.md): an update takes <= 30 ms for 2,000 drawn edges.

    python benchmarks/bench_figure.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

SHAPES = {  # name: (n_layers, n_heads, n_positions)
    "500 edges (3 layers x 6 heads)": (3, 6, None),
    "2,000 edges (8 layers x 4 heads)": (8, 4, None),
    "1,519 edges (4 layers x 8 heads, the engine benchmark's GPT-2)": (4, 8, None),
    "10,000 edges (8 layers x 10 heads)": (8, 10, None),
    "12,152 edges (4 layers x 8 heads x 8 positions)": (4, 8, 8),
}


def fake_trace(n_layers: int, n_heads: int, n_positions: int | None, seed: int = 0):
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.trace import Trace

    graph = CircuitGraph(n_layers, n_heads, n_positions=n_positions)
    settings = {"model": {"name": "bench", "config_hash": "bench", "n_layers": n_layers,
                          "n_heads": n_heads, "d_model": 64, "attn_only": False},
                "tau": 0.01, "metric": "kl", "positions": n_positions is not None}
    trace = Trace(settings, graph, [], initial_metric=0.5)
    rng = np.random.default_rng(seed)
    for i in range(len(graph.edges) // 2):
        removed = bool(rng.random() < 0.7)
        delta = 0.01 * (rng.uniform(0, 0.9) if removed else 10 ** rng.uniform(0, 3))
        trace.record(trace.metric_after(i - 1) + delta, removed)
    return trace


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_shape(
    n_layers: int, n_heads: int, n_positions: int | None, repeats: int
) -> dict[str, Any]:
    import plotly.graph_objects as go

    from acdc_viz import figure, layout
    from acdc_viz.figure import build_figure, update_figure

    trace = fake_trace(n_layers, n_heads, n_positions)
    layout._cached_layout.cache_clear()
    figure._geometry.cache_clear()
    build_cold = timed(lambda: build_figure(trace))
    build_warm = statistics.median(timed(lambda: build_figure(trace)) for _ in range(3))
    widget_build = timed(lambda: build_figure(trace, widget=True))

    start = len(trace.steps) // 2
    result: dict[str, Any] = {
        "edges": trace.n_edges,
        "nodes": len(trace.graph.nodes),
        "build_cold_s": round(build_cold, 4),
        "build_warm_s": round(build_warm, 4),
        "build_widget_s": round(widget_build, 4),
    }
    highlight = "A1.0" if n_positions is None else "A1.0@0"
    for kind, fig in (("widget", build_figure(trace, start, widget=True)),
                      ("figure", build_figure(trace, start))):
        assert isinstance(fig, go.FigureWidget if kind == "widget" else go.Figure)
        times = [timed(lambda i=i, f=fig: update_figure(f, trace, start + i))
                 for i in range(1, repeats + 1)]
        hl = [timed(lambda i=i, f=fig: update_figure(f, trace, start + i, highlight=highlight))
              for i in range(1, 4)]
        result[f"update_{kind}_ms"] = round(1000 * statistics.median(times), 2)
        result[f"update_{kind}_max_ms"] = round(1000 * max(times), 2)
        result[f"update_{kind}_highlight_ms"] = round(1000 * statistics.median(hl), 2)
    # what a notebook also pays per step: encoding the figure's data for the browser
    from plotly.io.json import to_json_plotly

    data = fig.to_plotly_json()["data"]
    result["encode_data_json_ms"] = round(
        1000 * statistics.median(timed(lambda: to_json_plotly(data)) for _ in range(5)), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import plotly

    results = {name: bench_shape(*shape, args.repeats) for name, shape in SHAPES.items()}
    print(json.dumps({
        "benchmark": "figure",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "plotly": plotly.__version__, "numpy": np.__version__},
        "target_update_ms_at_2000_edges": 30,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
