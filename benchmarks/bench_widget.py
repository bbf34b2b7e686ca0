"""What the Explorer adds to ACDC's own time, on the bundled induction task (not a test).

Runs the same ACDC twice: bare (``Acdc.run``) and through ``Explorer.run`` with its coalesced
redraws (headless: the FigureWidget's messages go nowhere, so this is the Python-side cost).
Prints JSON: steps per second with and without the widget, redraws and seconds per redraw.

    python benchmarks/bench_widget.py [--task induction] [--positions]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="induction")
    parser.add_argument("--positions", action="store_true")
    parser.add_argument("--tau", type=float, default=None)
    args = parser.parse_args()

    from acdc_viz.acdc import Acdc
    from acdc_viz.tasks import get_task
    from acdc_viz.trace import steps_equal
    from acdc_viz.widget import Explorer

    # The widget's run thread uses one PyTorch thread; so does the bare run, so that both sum in
    # the same order and their traces are bit-identical (the check below).
    torch.set_num_threads(1)
    explorer = Explorer(args.task, tau=args.tau, positions=args.positions)
    key = explorer.run_key()
    task = get_task(args.task)
    bare = Acdc(explorer.model, explorer.pairs, tau=key.tau, metric=explorer._metrics[key.metric],
                ablation=key.ablation, positions=key.positions)
    t0 = time.perf_counter()
    bare.run()
    bare_s = time.perf_counter() - t0

    explorer.redraws, explorer.redraw_seconds = 0, 0.0
    t0 = time.perf_counter()
    explorer.run()
    explorer.wait()
    widget_s = time.perf_counter() - t0
    n = len(explorer.trace.steps)
    assert steps_equal(bare.trace, explorer.trace), "the widget changed the run"
    print(
        json.dumps(
            {
                "benchmark": "explorer_overhead",
                "task": task.name,
                "positions": args.positions,
                "edges": n,
                "bare_seconds": round(bare_s, 3),
                "widget_seconds": round(widget_s, 3),
                "bare_steps_per_second": round(n / bare_s, 1),
                "widget_steps_per_second": round(n / widget_s, 1),
                "overhead_percent": round(100 * (widget_s / bare_s - 1), 1),
                "redraws": explorer.redraws,
                "ms_per_redraw": round(1e3 * explorer.redraw_seconds / max(1, explorer.redraws), 2),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
