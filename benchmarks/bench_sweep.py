"""Wall time of a tau sweep: the local executor against Ray on this machine (not a test).

Runs the same sweep (default: 20 taus on the bundled induction task) with ``executor="local"``
and with ``executor="ray"`` on a local Ray instance of ``--ray-cpus`` CPUs, and checks that all
give identical traces. Each is timed twice, "cold" (the first sweep: for Ray, the first after
``ray.init``, which starts the worker processes and imports torch and acdc_viz in each) and
"warm" (the same sweep again). The local executor is timed with torch's default intra-op threads
and with one thread (Ray tasks use as many threads as CPUs they declare). Ray's own cost per
task is measured with no-op tasks: one at a time (the round trip) and all at once (the
throughput). Every sweep loads the task's model and prompts itself, as a user's would.
Prints JSON.

    python benchmarks/bench_sweep.py [--task induction] [--taus 1e-5:1e-1:20] [--positions]
                                     [--ray-cpus 2] [--cpus-per-task 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _noop() -> int:
    return 0


def _ray_task_overhead(ray, n: int) -> dict[str, float]:
    """Milliseconds per no-op task: sequential round trips, and a batch submitted at once."""
    noop = ray.remote(num_cpus=1)(_noop)
    ray.get([noop.remote() for _ in range(4)])            # warm the workers
    start = time.perf_counter()
    for _ in range(n):
        ray.get(noop.remote())
    round_trip = (time.perf_counter() - start) / n
    start = time.perf_counter()
    ray.get([noop.remote() for _ in range(n)])
    batch = (time.perf_counter() - start) / n
    return {
        "round_trip_ms": round(1e3 * round_trip, 2),
        "batched_ms_per_task": round(1e3 * batch, 2),
    }


def _timed_sweep(task: str, taus: str, **kwargs) -> tuple[float, object]:
    from acdc_viz.sweep import sweep

    start = time.perf_counter()
    result = sweep(task, taus, progress=False, **kwargs)
    result.raise_for_failures()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="induction")
    parser.add_argument("--taus", default="1e-5:1e-1:20")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--cpus-per-task", type=float, default=1, help="num_cpus of each Ray task")
    parser.add_argument("--noop-tasks", type=int, default=200)
    parser.add_argument("--positions", action="store_true",
                        help="split edges by token position: far more work per run")
    args = parser.parse_args()

    import ray
    import torch

    from acdc_viz.runtime import machine_info
    from acdc_viz.tasks import get_task

    load_before = os.getloadavg()
    get_task(args.task).load_model("cpu")                  # imports and file cache, outside timings
    local_runs = {}
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        options = {"executor": "local", "positions": args.positions, "num_cpus": threads}
        cold_local_s, local = _timed_sweep(args.task, args.taus, **options)
        local_s, local = _timed_sweep(args.task, args.taus, **options)
        local_runs[threads] = (cold_local_s, local_s, local)

    start = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="ERROR")
    init_s = time.perf_counter() - start
    try:
        ray_options = {"executor": "ray", "num_cpus": args.cpus_per_task,
                       "positions": args.positions}
        cold_s, cold = _timed_sweep(args.task, args.taus, **ray_options)   # workers start
        warm_s, warm = _timed_sweep(args.task, args.taus, **ray_options)   # workers reused
        overhead = _ray_task_overhead(ray, args.noop_tasks)
    finally:
        ray.shutdown()

    def key(result):
        return {r.job.tau: r.trace.canonical_json() for r in result.runs}

    # Bit-identical traces need equal torch thread counts (see acdc_viz.runtime.torch_threads).
    same_threads = local_runs.get(max(1, int(args.cpus_per_task)))
    identical = key(cold) == key(warm) and (
        same_threads is None or key(same_threads[2]) == key(cold)
    )
    n = len(local.runs)
    best_local = min(s for _, s, _ in local_runs.values())
    slots = max(1, int(args.ray_cpus // args.cpus_per_task))
    in_task = sum(r.seconds for r in warm.runs)
    print(
        json.dumps(
            {
                "benchmark": "sweep_local_vs_ray",
                "task": args.task,
                "taus": n,
                "positions": args.positions,
                "edges": local.runs[0].trace.n_edges,
                "identical_traces_at_equal_threads": identical,
                "local": [
                    {
                        "torch_threads": t,
                        "cold_wall_seconds": round(c, 2),
                        "warm_wall_seconds": round(w, 2),
                        "warm_seconds_per_run": round(w / n, 3),
                        "same_decisions_as_ray": [
                            [s.removed for s in x.trace.steps] for x in r.runs
                        ]
                        == [[s.removed for s in x.trace.steps] for x in warm.runs],
                    }
                    for t, (c, w, r) in local_runs.items()
                ],
                "ray": {
                    "cpus": args.ray_cpus,
                    "cpus_per_task": args.cpus_per_task,
                    "parallel_tasks": slots,
                    "init_seconds": round(init_s, 2),
                    "cold_wall_seconds": round(cold_s, 2),
                    "warm_wall_seconds": round(warm_s, 2),
                    "warm_in_task_seconds": round(in_task, 2),
                    "warm_overhead_ms_per_task": round(
                        1e3 * max(0.0, warm_s - in_task / slots) / n * slots, 1
                    ),
                    "noop": overhead,
                },
                "ray_speedup_warm_vs_best_local": round(best_local / warm_s, 2),
                "ray_speedup_cold_with_init_vs_best_local": round(
                    best_local / (cold_s + init_s), 2
                ),
                "machine": machine_info()
                | {
                    "load_average_1min_before_after": [
                        round(load_before[0], 2),
                        round(os.getloadavg()[0], 2),
                    ]
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
