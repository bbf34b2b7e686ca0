"""ACDC engine speed, as forward-equivalents per tested edge (issue 2's benchmark; not a test).

Model: GPT-2 architecture, 4 layers, 8 heads, d_model 256, vocabulary 1000, random weights from
seed 0, wrapped in a TransformerLens 4 bridge. Data: 32 random prompt pairs of 16 tokens.
ACDC: tau 1e-3 (``--tau``), KL at the last position, resample ablation.

forward-equivalents per edge = (seconds per tested edge) / (seconds of one plain full forward
pass on the same batch), both timed in this run. We report it against the bridge's own forward
(what a TransformerLens user calls) and against the engine's plain forward (a stricter baseline).

    python benchmarks/bench_engine.py [--positions] [--steps N] [--device cpu|cuda] [--k K]
    python benchmarks/bench_engine.py --flips     # float32 against bfloat16: decisions that differ

``--k`` fixes the number of speculative hypotheses per pass (``Acdc(batch_hypotheses=K)``); by
default K adapts during the run, up to 32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import torch


def build_model(directory: str, device: str):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=4, n_head=8, n_embd=256, vocab_size=1000, n_positions=64)
    )
    hf.eval()
    hf.save_pretrained(directory)
    return TransformerBridge.boot_transformers(directory, hf_model=hf, device=device)


def time_call(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flips(model, pairs, args) -> dict:
    """The same run in float32 and in bfloat16: how many decisions differ, and where first."""
    import warnings

    from acdc_viz.acdc import Acdc, ApproximateWarning

    runs = {}
    for dtype in ("float32", "bfloat16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ApproximateWarning)
            t0 = time.perf_counter()
            trace = Acdc(model, pairs, tau=args.tau, positions=args.positions, device=args.device,
                         dtype=dtype, batch_hypotheses=args.k).run()
        runs[dtype] = (trace, time.perf_counter() - t0)
    (a, ta), (b, tb) = runs["float32"], runs["bfloat16"]
    differ = [
        i for i, (x, y) in enumerate(zip(a.steps, b.steps, strict=False)) if x.removed != y.removed
    ]
    kept_a, kept_b = set(a.final_kept_edges), set(b.final_kept_edges)
    return {
        "benchmark": "acdc_bf16_flips", "positions": args.positions, "edges": len(a.steps),
        "decisions_differing": len(differ), "first_differing_step": differ[0] if differ else None,
        "kept_float32": len(kept_a), "kept_bfloat16": len(kept_b),
        "final_circuits_symmetric_difference": len(kept_a ^ kept_b),
        "seconds_float32": round(ta, 1), "seconds_bfloat16": round(tb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="stop after N edges (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--k", type=int, default=None, help="hypotheses per pass (default: auto)")
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--flips", action="store_true",
                        help="run in float32 and in bfloat16 and count the decisions that differ")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from acdc_viz.acdc import Acdc
    from acdc_viz.data import TokenPairs

    with tempfile.TemporaryDirectory() as d:
        model = build_model(d, args.device)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
    corrupt = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
    pairs = TokenPairs(clean, corrupt)

    if args.flips:
        print(json.dumps(count_flips(model, pairs, args), indent=1))
        return
    t0 = time.perf_counter()
    acdc = Acdc(model, pairs, tau=args.tau, positions=args.positions, device=args.device,
                batch_hypotheses=args.k)
    setup = time.perf_counter() - t0
    dev_clean = clean.to(args.device)
    with torch.no_grad():
        bridge_fwd = time_call(lambda: model(dev_clean))
        engine_fwd = time_call(lambda: acdc.weights.forward(dev_clean))

    n = 0
    t0 = time.perf_counter()
    for _ in acdc.steps():
        n += 1
        if args.steps is not None and n >= args.steps:
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    per_edge = elapsed / n
    # Forward passes again, after the run, to average out machine noise.
    with torch.no_grad():
        bridge_fwd = (bridge_fwd + time_call(lambda: model(dev_clean))) / 2
        engine_fwd = (engine_fwd + time_call(lambda: acdc.weights.forward(dev_clean))) / 2
    print(json.dumps({
        "benchmark": "acdc_engine",
        "positions": args.positions,
        "device": args.device,
        "tau": args.tau,
        "k": acdc.batch_hypotheses,
        "k_automatic": acdc.adaptive,
        "edges_total": acdc.n_edges,
        "edges_tested": n,
        "edges_kept": acdc.kept_edges,
        "seconds": round(elapsed, 3),
        "setup_seconds": round(setup, 3),
        "edges_per_second": round(n / elapsed, 1),
        "bridge_forward_ms": round(bridge_fwd * 1e3, 2),
        "engine_forward_ms": round(engine_fwd * 1e3, 2),
        "forward_equivalents_per_edge": round(per_edge / bridge_fwd, 3),
        "forward_equivalents_per_edge_vs_engine_forward": round(per_edge / engine_fwd, 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }, indent=1))


if __name__ == "__main__":
    main()
