"""``acdc-viz``: run ACDC from the terminal, and render traces. Same code path as the library.

    acdc-viz run [--model DIR|NAME] [--data FILE] --tau 0.01 --out trace.json
    acdc-viz run --resume trace.json --out trace.json      # continue a stopped run
    acdc-viz render trace.json --out circuit.html [--step i] [--layout seq]
    acdc-viz sweep --task NAME --taus 1e-5:1e-1:20 --out DIR [--executor ray]  # one trace per tau
    acdc-viz app [--task NAME]                             # the Explorer alone, in a browser page
    acdc-viz demo [--headless]                             # quickstart, or the main job headless

Results go to stdout, progress and errors to stderr; the exit status is one of ``EXIT_CODES``.
The options, help and examples of every command are in ``acdc_viz.cli_parser``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acdc_viz.cli_parser import (
    DEFAULT_MODEL,
    DEFAULT_TASK,
    EXIT_BUG,
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OOM,
    build_parser,
)

if TYPE_CHECKING:
    from acdc_viz.tasks.base import Task

__all__ = ["DEFAULT_MODEL", "DEFAULT_TASK", "EXIT_BUG", "EXIT_CODES", "EXIT_ERROR",
           "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_OOM", "build_parser", "main"]


def _default_model_dir() -> Path:
    from acdc_viz.models.loading import build_tiny_gpt2

    directory = Path.home() / ".cache" / "acdc_viz" / "tiny-gpt2-seed0"
    if not (directory / "config.json").exists():
        build_tiny_gpt2(directory)
    return directory


def _task_settings(task: Task, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """A task's model, prompts and the run settings it implies (explicit options win)."""
    prepared = task.prepare(args.device, args.prompts, args.seed)
    metric_name = args.metric or task.default_metric
    settings = {
        "tau": args.tau or task.default_tau,
        "metric": prepared.metrics.get(metric_name, metric_name),
        "ablation": args.ablation or task.default_ablation,
        "tokens": prepared.tokens,
    }
    return prepared.model, prepared.pairs, settings


def _load(args: argparse.Namespace) -> tuple[Any, Any, str, dict[str, Any]]:
    """The model, prompt pairs, name and run settings of ``acdc-viz run``: a task's, or those of
    ``--model`` and ``--data`` (the built-in random model brings random pairs)."""
    from acdc_viz.data import DataError, load_token_pairs
    from acdc_viz.models.loading import load_model
    from acdc_viz.tasks import all_tasks, get_task

    task_name = args.task or (None if args.model else DEFAULT_TASK)
    if task_name is not None and (task_name in all_tasks() or args.task):
        if args.model or args.data:
            raise DataError("--task brings its own model and prompts: give either --task, or "
                            "--model with --data")
        model, pairs, settings = _task_settings(get_task(task_name), args)
        return model, pairs, task_name, settings
    name = args.model or DEFAULT_MODEL
    model = load_model(str(_default_model_dir() if name == DEFAULT_MODEL else name),
                       device=args.device)
    if args.data:
        pairs = load_token_pairs(args.data)
    elif name == DEFAULT_MODEL:
        from acdc_viz.data import random_token_pairs

        pairs = random_token_pairs(16, 8, int(model.cfg.d_vocab), seed=0)
    else:
        raise DataError("--data is required with --model: give a .json/.safetensors file of "
                        "clean and corrupt token ids of equal shape (see `acdc-viz run --help`)")
    settings = {"tau": args.tau or 0.01, "metric": args.metric or "kl",
                "ablation": args.ablation or "resample", "tokens": None}
    return model, pairs, name, settings


def _run(args: argparse.Namespace) -> int:
    """``acdc-viz run``: step through every edge with a progress bar; the trace is saved even
    after Ctrl-C or running out of memory."""
    from tqdm import tqdm

    from acdc_viz.acdc import Acdc
    from acdc_viz.errors import RunOutOfMemory
    from acdc_viz.taus import check_tau
    from acdc_viz.trace import load_trace, save_trace

    if args.tau is not None:
        check_tau(args.tau)                        # fail before loading anything
    resume = load_trace(args.resume) if args.resume else None
    model, pairs, name, settings = _load(args)
    acdc = Acdc(model, pairs, tau=check_tau(settings["tau"]), metric=settings["metric"],
                ablation=settings["ablation"], positions=args.positions,
                all_positions=args.all_positions, abs_delta=args.abs_delta, device=args.device,
                dtype=args.dtype, test_mode=args.test_mode, resume=resume, model_name=name,
                tokens=settings["tokens"])
    start = time.perf_counter()
    tested = 0
    bar = tqdm(total=acdc.n_edges, initial=acdc.trace.resume_from, unit="edge",
               disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    status = 0
    try:
        for step in acdc.steps():
            tested += 1
            bar.update(1)
            bar.set_postfix(kept=step.kept_edges, metric=f"{acdc.current_metric:.4g}",
                            refresh=False)
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
    state = ("complete" if acdc.done else
             f"stopped at edge {acdc.trace.resume_from} (resume with --resume {args.out})")
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
    """``acdc-viz tasks``: one row per task, with its model and its graph's edge count."""
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.tasks import all_tasks

    rows = [("task", "where", "model", "prompts", "edges", "description")]
    for task in all_tasks().values():
        shape = task.graph_shape or _bundled_shape(task)
        n_kv = shape[3] if shape and len(shape) > 3 else None
        edges = "?" if not shape else str(len(CircuitGraph(shape[0], shape[1],
                                                           attn_only=shape[2], n_kv_heads=n_kv)))
        rows.append((task.name, "bundled" if task.bundled else "hub", task.model_name,
                     str(task.default_prompts), edges, task.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[5])
    return 0


def _roc(args: argparse.Namespace) -> int:
    """``acdc-viz roc``: sweep tau on a task and print the ROC AUC against its canonical
    circuit as JSON (and write the figure with ``--out``)."""
    import json

    from acdc_viz.errors import SettingsError
    from acdc_viz.evaluate import roc_figure, sweep_rocs
    from acdc_viz.sweep import sweep
    from acdc_viz.tasks import get_task

    task = get_task(args.task)
    if task.canonical_edges is None:
        raise SettingsError(f"task {task.name!r} has no canonical circuit to compare with")
    start = time.perf_counter()
    result = sweep(task, args.taus, metric=args.metric, ablation=args.ablation,
                   positions=args.positions, prompts=args.prompts, device=args.device,
                   executor=args.executor, address=args.address, num_cpus=args.num_cpus,
                   num_gpus=args.num_gpus, progress=not args.quiet)
    result.raise_for_failures()
    kept = result.kept_by_tau()
    trace = result.runs[0].trace
    assert trace is not None
    all_edges = [e.name for e in trace.graph.edges]
    canonical = result.canonical[task.name]
    rocs = sweep_rocs(kept, all_edges, canonical)
    canonical_set = set(canonical)
    print(json.dumps({
        "task": task.name, "ablation": result.runs[0].job.ablation,
        "metric": trace.settings["metric"], "positions": args.positions,
        "edge_auc": round(rocs["edge"].auc, 4), "node_auc": round(rocs["node"].auc, 4),
        "canonical_edges": len(canonical_set), "edges": len(all_edges),
        "points": [{"tau": t, "kept": len(k), "canonical_kept": len(canonical_set & set(k))}
                   for t, k in kept.items()],
        "seconds": round(time.perf_counter() - start, 2),
        "figure": args.out,
    }, indent=1))
    if args.out:
        roc_figure(rocs, f"{task.name}: ACDC against the canonical circuit").write_html(args.out)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """``acdc-viz sweep``: one trace per tau in ``--out``, a JSON summary on stdout; exit 2 if a
    run failed twice."""
    import json

    from acdc_viz.sweep import SUMMARY_FILE, sweep

    try:
        result = sweep(args.task if len(args.task) > 1 else args.task[0], args.taus,
                       metric=args.metric, ablation=args.ablation, positions=args.positions,
                       all_positions=args.all_positions, abs_delta=args.abs_delta,
                       prompts=args.prompts, seed=args.seed, device=args.device, dtype=args.dtype,
                       executor=args.executor, address=args.address, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, out_dir=args.out, resume=not args.no_resume,
                       progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"acdc-viz: interrupted; the finished traces and {SUMMARY_FILE} are in {args.out}: "
              "run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(result.summary() | {"out": str(args.out)}, indent=1))
    for run in result.failed:
        job = run.job
        print(f"acdc-viz: tau={job.tau!r} ({job.task}, {job.metric}, {job.ablation}) "
              f"failed after {run.attempts} attempts: {run.error}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_ERROR


def _render(args: argparse.Namespace) -> int:
    from acdc_viz.export import render_file

    out = render_file(args.trace, args.out, step=args.step, layout=args.layout)
    print(f"wrote {out}")
    return 0


def _app(args: argparse.Namespace) -> int:
    from acdc_viz.app import serve

    status = serve(args.task, port=args.port, host=args.host,
                   open_browser=False if args.no_browser else None)
    return EXIT_OK if status == 0 else EXIT_ERROR


def _demo(args: argparse.Namespace) -> int:
    """``acdc-viz demo``: the quickstart in JupyterLab, or ``run`` and ``render`` headless."""
    if not args.headless:
        from acdc_viz.app import open_quickstart

        status = open_quickstart(open_browser=False if args.no_browser else None)
        return EXIT_OK if status == 0 else EXIT_ERROR
    from acdc_viz.export import render_file

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace, figure = out_dir / "trace.json", out_dir / "circuit.html"
    status = _run(build_parser().parse_args(["run", "--task", DEFAULT_TASK, "--out", str(trace)]
                                            + (["--quiet"] if args.quiet else [])))
    if status != EXIT_OK:
        return status
    print(f"wrote {render_file(trace, figure)}: open it in a browser (the Explorer: acdc-viz app)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command, and return its exit status (one of ``EXIT_CODES``).

    Expected errors become one line on stderr and exit status 2; anything else is a bug and
    keeps its traceback (exit status 1).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="acdc-viz: %(message)s")
    for noisy in ("transformers", "transformer_lens", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from acdc_viz.errors import AcdcVizError

    try:
        return {"run": _run, "render": _render, "tasks": _tasks, "roc": _roc, "app": _app,
                "demo": _demo, "sweep": _sweep}[args.command](args)
    except (AcdcVizError, ValueError, OSError) as exc:  # DataError, ModelLoadError, TraceError...
        print(f"acdc-viz: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("acdc-viz: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
