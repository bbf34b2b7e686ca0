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
DEFAULT_TASK = "induction"
"""The bundled task that `acdc-viz run` uses when given neither --task nor --model."""

EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acdc-viz", description="Automatic Circuit Discovery, step by step.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run ACDC and write a trace")
    run.add_argument("--task", help="a task from `acdc-viz tasks` (its model, prompts and defaults); "
                                    f"the default, without --model, is {DEFAULT_TASK!r}")
    run.add_argument("--model", help="a local HF-format model directory, a hub name (e.g. gpt2), or "
                                     f"'{DEFAULT_MODEL}' (a small random GPT-2 built locally)")
    run.add_argument("--data", help="clean/corrupt token ids: .json {'clean': [[...]], 'corrupt': [[...]]}, "
                                    ".safetensors or .pt (weights_only); required with --model")
    run.add_argument("--prompts", type=int, help="with --task: how many prompt pairs (default: the task's)")
    run.add_argument("--seed", type=int, default=0, help="with --task: the prompts' seed (default 0)")
    run.add_argument("--tau", help="removal threshold (default: the task's, else 0.01)")
    run.add_argument("--metric", help="kl, mse, or a task metric (default: the task's, else kl)")
    run.add_argument("--all-positions", action="store_true", help="metric over all positions, not the last")
    run.add_argument("--ablation", choices=["resample", "zero", "mean"],
                     help="default: the task's, else resample")
    run.add_argument("--positions", action="store_true", help="split every edge by token position")
    run.add_argument("--abs-delta", action="store_true", help="remove when |delta| < tau")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    run.add_argument("--out", default="trace.json", help="where to write the trace (default trace.json)")
    run.add_argument("--resume", help="a stopped trace to continue (same model, data and settings)")
    run.add_argument("--max-steps", type=int, help="stop after this many steps (the trace can be resumed)")
    run.add_argument("--test-mode", action="store_true", help="re-check every step with a hooked full forward")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("tasks", help="list the tasks: bundled or hub, model, prompts, edges")

    roc = sub.add_parser("roc", help="tau sweep on a task; ROC and AUC against its canonical circuit (JSON)")
    roc.add_argument("--task", required=True)
    roc.add_argument("--taus", default="1e-5:1e-1:20", help="LOW:HIGH:COUNT (log-spaced) or a comma list")
    roc.add_argument("--ablation", choices=["resample", "zero", "mean"])
    roc.add_argument("--metric")
    roc.add_argument("--positions", action="store_true")
    roc.add_argument("--prompts", type=int)
    roc.add_argument("--device", default="cpu")
    roc.add_argument("--out", help="also write the ROC figure (.html) here")

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


def _task_setup(task: Any, args: argparse.Namespace, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """A task's model, prompts and the run settings it implies (explicit options win)."""
    model = task.load_model(device)
    if task.check_model is not None:
        task.check_model(model)
    pairs = task.make_pairs(args.prompts or task.default_prompts, args.seed)
    metric_name = args.metric or task.default_metric
    metric = task.metrics[metric_name](pairs) if metric_name in task.metrics else metric_name
    settings = {
        "tau": getattr(args, "tau", None) or task.default_tau,
        "metric": metric,
        "ablation": args.ablation or task.default_ablation,
        "tokens": task.token_labels(pairs) if task.token_labels else None,
    }
    return model, pairs, settings


def _load(args: argparse.Namespace) -> tuple[Any, Any, str, dict[str, Any]]:
    from acdc_viz.data import DataError, load_token_pairs
    from acdc_viz.models.loading import load_model
    from acdc_viz.tasks import all_tasks, get_task

    task_name = args.task or (None if args.model else DEFAULT_TASK)
    if task_name is not None and (task_name in all_tasks() or args.task):
        if args.model or args.data:
            raise DataError("--task brings its own model and prompts: give either --task, or --model with --data")
        model, pairs, settings = _task_setup(get_task(task_name), args, args.device)
        return model, pairs, task_name, settings
    name = args.model or DEFAULT_MODEL
    model = load_model(str(_default_model_dir() if name == DEFAULT_MODEL else name), device=args.device)
    if args.data:
        pairs = load_token_pairs(args.data)
    elif name == DEFAULT_MODEL:
        from acdc_viz.data import random_token_pairs

        pairs = random_token_pairs(16, 8, int(model.cfg.d_vocab), seed=0)
    else:
        raise DataError("--data is required with --model: give a .json/.safetensors file of clean and "
                        "corrupt token ids of equal shape (see `acdc-viz run --help`)")
    settings = {"tau": args.tau or 0.01, "metric": args.metric or "kl",
                "ablation": args.ablation or "resample", "tokens": None}
    return model, pairs, name, settings


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from acdc_viz.acdc import Acdc, check_tau
    from acdc_viz.errors import RunOutOfMemory
    from acdc_viz.trace import load_trace, save_trace

    if args.tau is not None:
        check_tau(args.tau)                        # fail before loading anything
    resume = load_trace(args.resume) if args.resume else None
    model, pairs, name, settings = _load(args)
    acdc = Acdc(model, pairs, tau=check_tau(settings["tau"]), metric=settings["metric"],
                ablation=settings["ablation"], positions=args.positions, all_positions=args.all_positions,
                abs_delta=args.abs_delta, device=args.device, dtype=args.dtype, test_mode=args.test_mode,
                resume=resume, model_name=name, tokens=settings["tokens"])
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


def _bundled_shape(task: Any) -> tuple[int, int, bool] | None:
    from acdc_viz.tasks.bundled import BundledModelError, bundled_meta

    if not task.bundled:
        return None
    try:
        cfg = bundled_meta(task.model_name)["config"]
    except BundledModelError:
        return None
    return int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("attn_only", False))


def _tasks(args: argparse.Namespace) -> int:
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.tasks import all_tasks

    rows = [("task", "where", "model", "prompts", "edges", "description")]
    for task in all_tasks().values():
        shape = task.graph_shape or _bundled_shape(task)
        edges = str(len(CircuitGraph(shape[0], shape[1], attn_only=shape[2]))) if shape else "?"
        rows.append((task.name, "bundled" if task.bundled else "hub", task.model_name,
                     str(task.default_prompts), edges, task.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    return 0


def _roc(args: argparse.Namespace) -> int:
    import json

    from acdc_viz.acdc import Acdc
    from acdc_viz.errors import SettingsError
    from acdc_viz.evaluate import parse_taus, roc_figure, sweep_rocs
    from acdc_viz.tasks import get_task

    task = get_task(args.task)
    if task.canonical_edges is None:
        raise SettingsError(f"task {task.name!r} has no canonical circuit to compare with")
    taus = parse_taus(args.taus)
    args.seed = 0
    model, pairs, settings = _task_setup(task, args, args.device)
    start = time.perf_counter()
    kept: dict[float, list[str]] = {}
    for tau in taus:
        trace = Acdc(model, pairs, tau=tau, metric=settings["metric"], ablation=settings["ablation"],
                     positions=args.positions, device=args.device, model_name=task.name).run()
        kept[tau] = trace.final_kept_edges
    all_edges = [e.name for e in trace.graph.edges]
    canonical = task.canonical_edges(args.positions, pairs.seq_len)
    rocs = sweep_rocs(kept, all_edges, canonical)
    canonical_set = set(canonical)
    print(json.dumps({
        "task": task.name, "ablation": settings["ablation"],
        "metric": trace.settings["metric"], "positions": args.positions,
        "edge_auc": round(rocs["edge"].auc, 4), "node_auc": round(rocs["node"].auc, 4),
        "canonical_edges": len(canonical_set), "edges": len(all_edges),
        "points": [{"tau": t, "kept": len(k), "canonical_kept": len(canonical_set & set(k))}
                   for t, k in kept.items()],
        "seconds": round(time.perf_counter() - start, 2),
    }, indent=1))
    if args.out:
        roc_figure(rocs, f"{task.name}: ACDC against the canonical circuit").write_html(args.out)
    return 0


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
        return {"run": _run, "render": _render, "tasks": _tasks, "roc": _roc}[args.command](args)
    except (AcdcVizError, DataError, ModelLoadError, ValueError, OSError) as exc:
        print(f"acdc-viz: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
