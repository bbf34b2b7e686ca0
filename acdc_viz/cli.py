"""``acdc-viz``: run ACDC from the terminal, and render traces. Same code path as the library.

    acdc-viz run [--model DIR|NAME] [--data FILE] --tau 0.01 --out trace.json
    acdc-viz run --resume trace.json --out trace.json      # continue a stopped run
    acdc-viz render trace.json --out circuit.html [--step i] [--layout seq]
    acdc-viz sweep --task NAME --taus 1e-5:1e-1:20 --out DIR [--executor ray]  # one trace per tau
    acdc-viz app [--task NAME]                             # the Explorer alone, in a browser page
    acdc-viz demo [--headless]                             # the quickstart, or the main job headless

Results go to stdout, progress and errors to stderr; the exit status is one of ``EXIT_CODES``.
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

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_BUG: "an unexpected error: a bug in acdc_viz or a library (please report the traceback)",
    EXIT_ERROR: "bad input or usage, or a sweep with failed runs (stderr says what to fix)",
    EXIT_OOM: "out of memory during a run; the trace so far was saved and can be resumed",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C; `run` saved the trace so far (continue with --resume)",
}
"""Exit statuses, documented in ``acdc-viz --help`` and the README (a test keeps them equal)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    from acdc_viz import __version__

    mine = of("acdc_viz")
    return (f"acdc-viz {__version__ if mine == 'not installed' else mine} (torch {of('torch')}, "
            f"transformer-lens {of('transformer-lens')}, Python {sys.version.split()[0]})")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


_EPILOG = "\n\n".join([
    _examples(
        "acdc-viz tasks                                  # what can run, offline or from the hub",
        "acdc-viz run --task induction --out trace.json  # ACDC on a bundled model (seconds)",
        "acdc-viz render trace.json --out circuit.html   # draw the circuit it found",
        "acdc-viz roc --task tracr-reverse --ablation zero",
        "acdc-viz sweep --task induction --taus 1e-5:1e-1:20 --out sweep/  # [--executor ray]",
        "acdc-viz app --task induction                   # the Explorer alone, in a browser page",
        "acdc-viz demo --headless                        # the main job: trace.json + circuit.html",
    ),
    "Results go to stdout; progress bars, notes and errors go to stderr.",
    "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items()),
    "Each command has its own help: acdc-viz COMMAND --help",
])
_FORMAT = argparse.RawDescriptionHelpFormatter
_ABLATIONS = ["resample", "zero", "mean"]


def _names(text: str) -> list[str]:
    """A comma-separated list of names (tasks, metrics)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated names, got {text!r}")
    return names


def _ablation_names(text: str) -> list[str]:
    names = _names(text)
    bad = [n for n in names if n not in _ABLATIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown ablation {bad[0]!r}: expected {', '.join(_ABLATIONS)}")
    return names


def _add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where a sweep's runs go: here, or Ray (see docs/sweep.md)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after another in this process (default); ray: one Ray task "
                        "per run (pip install 'acdc_viz[ray]')")
    p.add_argument("--address", help="with --executor ray: the cluster to join (auto, "
                                     "ray://HOST:10001); default: start a local Ray instance")
    p.add_argument("--num-cpus", type=float, metavar="N",
                   help="CPUs per run: torch threads, and Ray's request (default: torch's "
                        "setting locally, 1 on Ray)")
    p.add_argument("--num-gpus", type=float, metavar="N",
                   help="with --executor ray: GPUs per run; fractions share a GPU "
                        "(default 1 with --device cuda, else 0)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acdc-viz", formatter_class=_FORMAT, epilog=_EPILOG,
        description="Automatic Circuit Discovery (ACDC, Conmy et al. 2023) on TransformerLens models, "
                    "step by step:\nrun it, resume it, draw the circuit it finds, score it against a "
                    "known circuit,\nor explore it in a browser.")
    p.add_argument("--version", action="version", version=_version(),
                   help="print the versions of acdc-viz, torch, TransformerLens and Python, and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (acdc-viz COMMAND --help for each)")

    run = sub.add_parser(
        "run", help="run ACDC and write a trace (the main job)", formatter_class=_FORMAT,
        description="Run ACDC on a bundled task, or on your own model and prompt pairs, and write the "
                    "trace:\nevery tested edge with its metric, and the circuit that is kept. Prints a "
                    "progress bar (stderr)\nand a one-line summary (stdout).",
        epilog=_examples(
            "acdc-viz run                                          # the bundled induction task",
            "acdc-viz run --task tracr-reverse --ablation zero --out reverse.json",
            "acdc-viz run --task induction --positions --tau 0.1  # split edges by token position",
            "acdc-viz run --model ./my-gpt2 --data pairs.json --tau 0.01 --out trace.json",
            "acdc-viz run --max-steps 20 --out trace.json          # stop early ...",
            "acdc-viz run --resume trace.json --out trace.json     # ... and continue",
        ) + "\n\nCtrl-C saves the trace so far (exit status 130); --resume continues it."
    )
    run.add_argument("--task", help="a task from `acdc-viz tasks`: it brings its model, prompts, "
                                    f"metric, ablation and tau (default, without --model: {DEFAULT_TASK})")
    run.add_argument("--model", help="instead of a task: a local HF-format model directory, a hub name "
                                     f"(e.g. gpt2), or '{DEFAULT_MODEL}' (a small random GPT-2 built locally)")
    run.add_argument("--data", help="with --model: clean/corrupt token ids of equal shape, as .json "
                                    "{'clean': [[...]], 'corrupt': [[...]]}, .safetensors, or .pt "
                                    "(read with weights_only)")
    run.add_argument("--prompts", type=int, metavar="N",
                     help="with --task: how many prompt pairs (default: the task's)")
    run.add_argument("--seed", type=int, default=0, help="with --task: the prompts' random seed (default 0)")
    run.add_argument("--tau", help="removal threshold: an edge is removed when the metric grows by less "
                                   "than tau (default: the task's, else 0.01)")
    run.add_argument("--metric", help="kl, mse, or one of the task's metrics (default: the task's, "
                                      "else kl: KL divergence from the full model at the last position)")
    run.add_argument("--all-positions", action="store_true",
                     help="average the metric over all positions, not just the last")
    run.add_argument("--ablation", choices=_ABLATIONS,
                     help="what a removed edge carries instead: the corrupt prompts' activation "
                          "(resample), zero, or its mean over the batch (default: the task's, else resample)")
    run.add_argument("--positions", action="store_true",
                     help="split every edge by token position (many more edges)")
    run.add_argument("--abs-delta", action="store_true",
                     help="remove an edge when |metric change| < tau (default: signed change < tau)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                     help="precision of the run (default float32)")
    run.add_argument("--out", default="trace.json", help="where to write the trace (default trace.json)")
    run.add_argument("--resume", metavar="TRACE",
                     help="a stopped trace to continue (same model, data and settings)")
    run.add_argument("--max-steps", type=int, metavar="N",
                     help="stop after testing N edges (the trace can be resumed)")
    run.add_argument("--test-mode", action="store_true",
                     help="re-check every step against the model's own hooked forward pass (slow)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser(
        "tasks", help="list the tasks: bundled or hub, model, prompts, edges", formatter_class=_FORMAT,
        description="List every task `run`, `roc` and `app` accept: whether its model ships with "
                    "acdc_viz (bundled,\noffline) or comes from the Hugging Face hub, its default "
                    "number of prompts, and its edge count.",
        epilog=_examples("acdc-viz tasks"))

    roc = sub.add_parser(
        "roc", help="sweep tau on a task; print ROC AUC against its canonical circuit (JSON)",
        formatter_class=_FORMAT,
        description="Run ACDC at each tau of a sweep on a task that has a canonical circuit, and "
                    "print (stdout, JSON)\nthe edge and node ROC AUC of the kept circuits against it, "
                    "with each tau's edge counts.",
        epilog=_examples(
            "acdc-viz roc --task tracr-reverse --ablation zero          # edge AUC 1.0, as in the paper",
            "acdc-viz roc --task induction --taus 1e-3:1:10 --out roc.html",
            "acdc-viz roc --task tracr-proportion --taus 1e-4,1e-2,1"))
    roc.add_argument("--task", required=True, help="a task with a canonical circuit (see `acdc-viz tasks`)")
    roc.add_argument("--taus", default="1e-5:1e-1:20",
                     help="LOW:HIGH:COUNT (COUNT log-spaced values) or a comma-separated list "
                          "(default 1e-5:1e-1:20)")
    roc.add_argument("--ablation", choices=_ABLATIONS, help="default: the task's")
    roc.add_argument("--metric", help="kl, mse, or one of the task's metrics (default: the task's)")
    roc.add_argument("--positions", action="store_true", help="split every edge by token position")
    roc.add_argument("--prompts", type=int, metavar="N", help="how many prompt pairs (default: the task's)")
    roc.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    roc.add_argument("--out", metavar="FILE.html", help="also write the ROC figure (.html) here")
    roc.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_executor_arguments(roc)

    sweep = sub.add_parser(
        "sweep", help="run ACDC at many taus, locally or on Ray; write one trace per tau and a summary",
        formatter_class=_FORMAT,
        description="Run ACDC once per tau (and per task, metric and ablation given), one run after "
                    "another here,\nor as Ray tasks on a local or remote cluster. Writes each trace to "
                    "DIR as it finishes and\nDIR/summary.json at the end (tau, kept edges, final metric, "
                    "AUC where the task has a\ncanonical circuit), which is also printed (stdout). "
                    "Running the same command again skips\nevery tau whose trace in DIR is complete.",
        epilog=_examples(
            "acdc-viz sweep --task induction --taus 1e-5:1e-1:20 --out sweeps/induction",
            "acdc-viz sweep --task tracr-reverse --ablation zero,resample --taus 1e-4,1e-2,1 --out s",
            "acdc-viz sweep --task induction --executor ray --num-cpus 1 --out s      # local Ray",
            "acdc-viz sweep --task ioi --executor ray --address auto --device cuda --out s",
        ) + "\n\nA run that fails is retried once; if it fails again, the others still finish and "
            "the exit\nstatus is 2 (the summary names the failed taus and their errors). Ctrl-C keeps "
            "the finished\ntraces (exit status 130): run the same command to resume.")
    sweep.add_argument("--task", required=True, type=_names,
                       help="a task from `acdc-viz tasks`, or several, comma-separated")
    sweep.add_argument("--taus", default="1e-5:1e-1:20",
                       help="LOW:HIGH:COUNT (COUNT log-spaced values) or a comma-separated list "
                            "(default 1e-5:1e-1:20)")
    sweep.add_argument("--out", required=True, metavar="DIR", help="where the traces and summary.json go")
    sweep.add_argument("--metric", type=_names,
                       help="kl, mse, or the task's metrics, comma-separated (default: the task's)")
    sweep.add_argument("--ablation", type=_ablation_names,
                       help="resample, zero or mean, comma-separated (default: the task's)")
    sweep.add_argument("--positions", action="store_true", help="split every edge by token position")
    sweep.add_argument("--all-positions", action="store_true",
                       help="average the metric over all positions, not just the last")
    sweep.add_argument("--abs-delta", action="store_true", help="remove when |metric change| < tau")
    sweep.add_argument("--prompts", type=int, metavar="N", help="how many prompt pairs (default: the task's)")
    sweep.add_argument("--seed", type=int, default=0, help="the prompts' random seed (default 0)")
    sweep.add_argument("--device", default="cpu", help="cpu or cuda, where each run runs (default cpu)")
    sweep.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                       help="precision of the runs (default float32)")
    sweep.add_argument("--no-resume", action="store_true",
                       help="run every tau again, even those with a complete trace in DIR")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_executor_arguments(sweep)

    render = sub.add_parser(
        "render", help="draw a trace's seq-graph to HTML, PNG, SVG or JSON", formatter_class=_FORMAT,
        description="Draw the circuit of a trace as a seq-graph (no model needed). PNG and SVG need "
                    "kaleido and\nChromium (BROWSER_PATH=/usr/bin/chromium); HTML needs nothing.",
        epilog=_examples(
            "acdc-viz render trace.json --out circuit.html",
            "acdc-viz render trace.json --out start.png --step -1     # the full graph, before any step",
            "acdc-viz render trace.json --out circuit.svg --layout kamada_kawai"))
    render.add_argument("trace", help="a trace written by `acdc-viz run`, the widget or save_trace")
    render.add_argument("--out", required=True, help="output file: .html, .png, .svg or .json")
    render.add_argument("--step", type=int, help="draw the state after this step (-1: before any "
                                                 "step; default: the last)")
    render.add_argument("--layout", default="seq",
                        help="seq (layers by token positions, the default), multipartite, spring, "
                             "kamada_kawai or spectral")

    app = sub.add_parser(
        "app", help="serve the Explorer alone (no code) as a web page, with Voila",
        formatter_class=_FORMAT,
        description="Serve the Explorer widget on its own, with no code cells, as a local web page "
                    "(Voila). Prints its\naddress (stdout) and serves until Ctrl-C. The page's "
                    "address takes settings:\n?task=NAME&tau=T&positions=1&layout=NAME. Needs "
                    "Voila: pip install 'acdc_viz[app]'.",
        epilog=_examples(
            "acdc-viz app                               # the bundled induction task, on port 8866",
            "acdc-viz app --task tracr-reverse --port 9000 --no-browser"))
    app.add_argument("--task", default=DEFAULT_TASK,
                     help=f"the task the page opens with (see `acdc-viz tasks`; default {DEFAULT_TASK})")
    app.add_argument("--port", type=int,
                     help="the port to serve on (default: the first free one from 8866)")
    app.add_argument("--host", default="127.0.0.1",
                     help="the address to listen on (default 127.0.0.1: this machine only)")
    app.add_argument("--no-browser", action="store_true",
                     help="don't open a browser (by default one opens where a display is available)")

    demo = sub.add_parser(
        "demo", help="open the quickstart notebook in JupyterLab, or run the main job with --headless",
        formatter_class=_FORMAT,
        description="Without --headless: open notebooks/01_quickstart.ipynb (from the repository) in "
                    "JupyterLab.\nWith --headless: run ACDC on the bundled induction task and write "
                    "trace.json and circuit.html.",
        epilog=_examples("acdc-viz demo", "acdc-viz demo --headless --out-dir results"))
    demo.add_argument("--headless", action="store_true",
                      help="no JupyterLab: run the main job and write trace.json and circuit.html")
    demo.add_argument("--out-dir", default=".", metavar="DIR",
                      help="with --headless: where to write the files (default: the current folder)")
    demo.add_argument("--no-browser", action="store_true",
                      help="without --headless: start JupyterLab but open no browser")
    demo.add_argument("--quiet", action="store_true", help="with --headless: no progress bar")
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

    from acdc_viz.acdc import Acdc
    from acdc_viz.errors import RunOutOfMemory
    from acdc_viz.taus import check_tau
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
        print(f"acdc-viz: tau={run.job.tau!r} ({run.job.task}, {run.job.metric}, {run.job.ablation}) "
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
    if not args.headless:
        from acdc_viz.app import open_quickstart

        status = open_quickstart(open_browser=False if args.no_browser else None)
        return EXIT_OK if status == 0 else EXIT_ERROR
    from acdc_viz.export import render_file

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace, figure = out_dir / "trace.json", out_dir / "circuit.html"
    status = _run(_parser().parse_args(["run", "--task", DEFAULT_TASK, "--out", str(trace)]
                                       + (["--quiet"] if args.quiet else [])))
    if status != EXIT_OK:
        return status
    print(f"wrote {render_file(trace, figure)}: open it in a browser (the Explorer: acdc-viz app)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="acdc-viz: %(message)s")
    for noisy in ("transformers", "transformer_lens", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from acdc_viz.data import DataError
    from acdc_viz.errors import AcdcVizError
    from acdc_viz.models.loading import ModelLoadError

    try:
        return {"run": _run, "render": _render, "tasks": _tasks, "roc": _roc, "app": _app,
                "demo": _demo, "sweep": _sweep}[args.command](args)
    except (AcdcVizError, DataError, ModelLoadError, ValueError, OSError) as exc:
        print(f"acdc-viz: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("acdc-viz: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
