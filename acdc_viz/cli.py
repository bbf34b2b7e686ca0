"""``acdc-viz``: run ACDC from the terminal, and render traces. Same code path as the library.

    acdc-viz run [--model DIR|NAME] [--data FILE] --tau 0.01 --out trace.json
    acdc-viz run --resume trace.json --out trace.json      # continue a stopped run
    acdc-viz render trace.json --out circuit.html [--step i] [--layout seq]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "tiny-gpt2"
"""Built locally on first use (random weights, seed 0), so that the CLI works offline."""

EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acdc-viz", description="Automatic Circuit Discovery, step by step.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run ACDC and write a trace")
    run.add_argument("--model", default=DEFAULT_MODEL,
                     help="a local HF-format model directory, a hub name (e.g. gpt2), or "
                          f"'{DEFAULT_MODEL}' (default: a small random GPT-2 built locally)")
    run.add_argument("--data", help="clean/corrupt token ids: .json {'clean': [[...]], 'corrupt': [[...]]}, "
                                    ".safetensors or .pt (weights_only). Default with the built-in "
                                    "model: 16 random prompt pairs")
    run.add_argument("--tau", default="0.01", help="removal threshold (default 0.01)")
    run.add_argument("--metric", default="kl", choices=["kl", "mse"])
    run.add_argument("--all-positions", action="store_true", help="metric over all positions, not the last")
    run.add_argument("--ablation", default="resample", choices=["resample", "zero", "mean"])
    run.add_argument("--positions", action="store_true", help="split every edge by token position")
    run.add_argument("--abs-delta", action="store_true", help="remove when |delta| < tau")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    run.add_argument("--out", default="trace.json", help="where to write the trace (default trace.json)")
    run.add_argument("--resume", help="a stopped trace to continue (same model, data and settings)")
    run.add_argument("--max-steps", type=int, help="stop after this many steps (the trace can be resumed)")
    run.add_argument("--test-mode", action="store_true", help="re-check every step with a hooked full forward")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    render = sub.add_parser("render", help="draw a trace's seq-graph to HTML, PNG, SVG or JSON")
    render.add_argument("trace")
    render.add_argument("--out", required=True, help="output file: .html, .png, .svg or .json")
    render.add_argument("--step", type=int, help="draw the state after this step (default: the last)")
    render.add_argument("--layout", default="seq")
    return p


def _default_model_dir() -> Path:
    from acdc_viz.models.loading import build_tiny_gpt2

    directory = Path.home() / ".cache" / "acdc_viz" / "tiny-gpt2-seed0"
    if not (directory / "config.json").exists():
        build_tiny_gpt2(directory)
    return directory


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from acdc_viz.data import DataError, load_token_pairs, random_token_pairs
    from acdc_viz.models.loading import load_model

    name = args.model
    source = _default_model_dir() if name == DEFAULT_MODEL else name
    model = load_model(str(source), device=args.device)
    if args.data:
        pairs = load_token_pairs(args.data)
    elif name == DEFAULT_MODEL:
        pairs = random_token_pairs(16, 8, int(model.cfg.d_vocab), seed=0)
    else:
        raise DataError("--data is required with --model: give a .json/.safetensors file of clean and "
                        "corrupt token ids of equal shape (see `acdc-viz run --help`)")
    return model, pairs, name


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from acdc_viz.acdc import Acdc, check_tau
    from acdc_viz.errors import RunOutOfMemory
    from acdc_viz.trace import load_trace, save_trace

    tau = check_tau(args.tau)                      # fail before loading anything
    resume = load_trace(args.resume) if args.resume else None
    model, pairs, name = _load(args)
    acdc = Acdc(model, pairs, tau=tau, metric=args.metric, ablation=args.ablation,
                positions=args.positions, all_positions=args.all_positions, abs_delta=args.abs_delta,
                device=args.device, dtype=args.dtype, test_mode=args.test_mode, resume=resume,
                model_name=name)
    start = time.perf_counter()
    tested = 0
    bar = tqdm(total=acdc.n_edges, initial=acdc.trace.resume_from, unit="edge",
               disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    status = 0
    try:
        for step in acdc.steps():
            tested += 1
            bar.update(1)
            bar.set_postfix(kept=step.kept_edges, metric=f"{acdc.current_metric:.4g}", refresh=False)
            if args.max_steps is not None and tested >= args.max_steps:
                break
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except RunOutOfMemory as exc:
        print(f"acdc-viz: {exc}", file=sys.stderr)
        status = EXIT_OOM
    finally:
        bar.close()
        save_trace(acdc.trace, args.out)
    seconds = time.perf_counter() - start
    state = "complete" if acdc.done else f"stopped at edge {acdc.trace.resume_from} (resume with --resume {args.out})"
    print(f"edges tested {tested}, edges kept {acdc.kept_edges} of {acdc.n_edges}, "
          f"final metric {acdc.current_metric:.6g} ({acdc.metric.name}), {seconds:.1f} s; "
          f"{state}; trace written to {args.out}")
    return status


def _render(args: argparse.Namespace) -> int:
    from acdc_viz.export import render_file

    out = render_file(args.trace, args.out, step=args.step, layout=args.layout)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="acdc-viz: %(message)s")
    for noisy in ("transformers", "transformer_lens", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from acdc_viz.data import DataError
    from acdc_viz.errors import AcdcVizError
    from acdc_viz.models.loading import ModelLoadError

    try:
        return {"run": _run, "render": _render}[args.command](args)
    except (AcdcVizError, DataError, ModelLoadError, ValueError, OSError) as exc:
        print(f"acdc-viz: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
