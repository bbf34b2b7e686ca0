"""The command line of ``acdc-viz``: one builder per subcommand, with its options, help and
examples, and the exit statuses that ``acdc-viz --help`` documents.

Only argument parsing lives here; ``acdc_viz.cli`` runs the commands.
"""

from __future__ import annotations

import argparse
import sys
from typing import TypeAlias

from acdc_viz.patching import ABLATIONS
from acdc_viz.runtime import package_version

DEFAULT_MODEL = "tiny-gpt2"
"""Built locally on first use (random weights, seed 0), so that the CLI works offline."""
DEFAULT_TASK = "induction"
"""The bundled task that `acdc-viz run` uses when given neither --task nor --model."""
DEFAULT_TAUS = "1e-5:1e-1:20"

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_BUG: "an unexpected error: a bug in acdc_viz or a library (please report the traceback)",
    EXIT_ERROR: "bad input or usage, or a sweep with failed runs (stderr says what to fix)",
    EXIT_OOM: "out of memory during a run; the trace so far was saved and can be resumed",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C; `run` saved the trace so far "
                      "(continue with --resume)",
}
"""Exit statuses, documented in ``acdc-viz --help`` and the README (a test keeps them equal)."""

_FORMAT = argparse.RawDescriptionHelpFormatter
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _version() -> str:
    from acdc_viz import __version__

    def of(package: str) -> str:
        return package_version(package) or "not installed"

    return (f"acdc-viz {package_version('acdc_viz') or __version__} (torch {of('torch')}, "
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


def _names(text: str) -> list[str]:
    """A comma-separated list of names (tasks, metrics)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected one or more comma-separated names, got {text!r}")
    return names


def _ablation_names(text: str) -> list[str]:
    names = _names(text)
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown ablation {bad[0]!r}: expected {', '.join(ABLATIONS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``acdc-viz`` parser: the top-level help, then one subparser per command."""
    p = argparse.ArgumentParser(
        prog="acdc-viz", formatter_class=_FORMAT, epilog=_EPILOG,
        description="Automatic Circuit Discovery (ACDC, Conmy et al. 2023) on TransformerLens "
                    "models, step by step:\nrun it, resume it, draw the circuit it finds, score "
                    "it against a known circuit,\nor explore it in a browser.")
    p.add_argument("--version", action="version", version=_version(),
                   help="print the versions of acdc-viz, torch, TransformerLens and Python, "
                        "and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (acdc-viz COMMAND --help for each)")
    for add in (_add_run, _add_tasks, _add_roc, _add_sweep, _add_render, _add_app, _add_demo):
        add(sub)
    return p


def _add_run(sub: Subparsers) -> None:
    """``acdc-viz run``: the main job."""
    run = sub.add_parser(
        "run", help="run ACDC and write a trace (the main job)", formatter_class=_FORMAT,
        description="Run ACDC on a bundled task, or on your own model and prompt pairs, and "
                    "write the trace:\nevery tested edge with its metric, and the circuit that "
                    "is kept. Prints a progress bar (stderr)\nand a one-line summary (stdout).",
        epilog=_examples(
            "acdc-viz run                                          # the bundled induction task",
            "acdc-viz run --task tracr-reverse --ablation zero --out reverse.json",
            "acdc-viz run --task induction --positions --tau 0.1  # split edges by token position",
            "acdc-viz run --model ./my-gpt2 --data pairs.json --tau 0.01 --out trace.json",
            "acdc-viz run --max-steps 20 --out trace.json          # stop early ...",
            "acdc-viz run --resume trace.json --out trace.json     # ... and continue",
        ) + "\n\nCtrl-C saves the trace so far (exit status 130); --resume continues it."
    )
    run.add_argument("--task", help="a task from `acdc-viz tasks`: it brings its model, "
                                    "prompts, metric, ablation and tau (default, without "
                                    f"--model: {DEFAULT_TASK})")
    run.add_argument("--model", help="instead of a task: a local HF-format model directory, a "
                                     f"hub name (e.g. gpt2), or '{DEFAULT_MODEL}' (a small "
                                     "random GPT-2 built locally)")
    run.add_argument("--data", help="with --model: clean/corrupt token ids of equal shape, as "
                                    ".json {'clean': [[...]], 'corrupt': [[...]]}, .safetensors, "
                                    "or .pt (read with weights_only)")
    run.add_argument("--prompts", type=int, metavar="N",
                     help="with --task: how many prompt pairs (default: the task's)")
    run.add_argument("--seed", type=int, default=0,
                     help="with --task: the prompts' random seed (default 0)")
    run.add_argument("--tau", help="removal threshold: an edge is removed when the metric grows "
                                   "by less than tau (default: the task's, else 0.01)")
    run.add_argument("--metric", help="kl, mse, or one of the task's metrics (default: the "
                                      "task's, else kl: KL divergence from the full model at "
                                      "the last position)")
    run.add_argument("--all-positions", action="store_true",
                     help="average the metric over all positions, not just the last")
    run.add_argument("--ablation", choices=ABLATIONS,
                     help="what a removed edge carries instead: the corrupt prompts' activation "
                          "(resample), zero, or its mean over the batch (default: the task's, "
                          "else resample)")
    run.add_argument("--positions", action="store_true",
                     help="split every edge by token position (many more edges)")
    run.add_argument("--abs-delta", action="store_true",
                     help="remove an edge when |metric change| < tau (default: signed change "
                          "< tau)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                     help="precision of the run (default float32)")
    run.add_argument("--out", default="trace.json",
                     help="where to write the trace (default trace.json)")
    run.add_argument("--resume", metavar="TRACE",
                     help="a stopped trace to continue (same model, data and settings)")
    run.add_argument("--max-steps", type=int, metavar="N",
                     help="stop after testing N edges (the trace can be resumed)")
    run.add_argument("--test-mode", action="store_true",
                     help="re-check every step against the model's own hooked forward pass "
                          "(slow)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_tasks(sub: Subparsers) -> None:
    """``acdc-viz tasks``: what can run."""
    sub.add_parser(
        "tasks", help="list the tasks: bundled or hub, model, prompts, edges",
        formatter_class=_FORMAT,
        description="List every task `run`, `roc` and `app` accept: whether its model ships "
                    "with acdc_viz (bundled,\noffline) or comes from the Hugging Face hub, its "
                    "default number of prompts, and its edge count.",
        epilog=_examples("acdc-viz tasks"))


def _add_roc(sub: Subparsers) -> None:
    """``acdc-viz roc``: a tau sweep scored against a task's canonical circuit."""
    roc = sub.add_parser(
        "roc", help="sweep tau on a task; print ROC AUC against its canonical circuit (JSON)",
        formatter_class=_FORMAT,
        description="Run ACDC at each tau of a sweep on a task that has a canonical circuit, "
                    "and print (stdout, JSON)\nthe edge and node ROC AUC of the kept circuits "
                    "against it, with each tau's edge counts.",
        epilog=_examples(
            "acdc-viz roc --task tracr-reverse --ablation zero          # edge AUC 1.0, as in "
            "the paper",
            "acdc-viz roc --task induction --taus 1e-3:1:10 --out roc.html",
            "acdc-viz roc --task tracr-proportion --taus 1e-4,1e-2,1"))
    roc.add_argument("--task", required=True,
                     help="a task with a canonical circuit (see `acdc-viz tasks`)")
    roc.add_argument("--taus", default=DEFAULT_TAUS,
                     help="LOW:HIGH:COUNT (COUNT log-spaced values) or a comma-separated list "
                          f"(default {DEFAULT_TAUS})")
    roc.add_argument("--ablation", choices=ABLATIONS, help="default: the task's")
    roc.add_argument("--metric",
                     help="kl, mse, or one of the task's metrics (default: the task's)")
    roc.add_argument("--positions", action="store_true",
                     help="split every edge by token position")
    roc.add_argument("--prompts", type=int, metavar="N",
                     help="how many prompt pairs (default: the task's)")
    roc.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    roc.add_argument("--out", metavar="FILE.html", help="also write the ROC figure (.html) here")
    roc.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_executor_arguments(roc)


def _add_sweep(sub: Subparsers) -> None:
    """``acdc-viz sweep``: one trace per tau, here or on Ray."""
    sweep = sub.add_parser(
        "sweep", help="run ACDC at many taus, locally or on Ray; write one trace per tau and a "
                      "summary",
        formatter_class=_FORMAT,
        description="Run ACDC once per tau (and per task, metric and ablation given), one run "
                    "after another here,\nor as Ray tasks on a local or remote cluster. Writes "
                    "each trace to DIR as it finishes and\nDIR/summary.json at the end (tau, "
                    "kept edges, final metric, AUC where the task has a\ncanonical circuit), "
                    "which is also printed (stdout). Running the same command again skips\nevery "
                    "tau whose trace in DIR is complete.",
        epilog=_examples(
            "acdc-viz sweep --task induction --taus 1e-5:1e-1:20 --out sweeps/induction",
            "acdc-viz sweep --task tracr-reverse --ablation zero,resample --taus 1e-4,1e-2,1 "
            "--out s",
            "acdc-viz sweep --task induction --executor ray --num-cpus 1 --out s      # local Ray",
            "acdc-viz sweep --task ioi --executor ray --address auto --device cuda --out s",
        ) + "\n\nA run that fails is retried once; if it fails again, the others still finish "
            "and the exit\nstatus is 2 (the summary names the failed taus and their errors). "
            "Ctrl-C keeps the finished\ntraces (exit status 130): run the same command to "
            "resume.")
    sweep.add_argument("--task", required=True, type=_names,
                       help="a task from `acdc-viz tasks`, or several, comma-separated")
    sweep.add_argument("--taus", default=DEFAULT_TAUS,
                       help="LOW:HIGH:COUNT (COUNT log-spaced values) or a comma-separated list "
                            f"(default {DEFAULT_TAUS})")
    sweep.add_argument("--out", required=True, metavar="DIR",
                       help="where the traces and summary.json go")
    sweep.add_argument("--metric", type=_names,
                       help="kl, mse, or the task's metrics, comma-separated (default: the "
                            "task's)")
    sweep.add_argument("--ablation", type=_ablation_names,
                       help="resample, zero or mean, comma-separated (default: the task's)")
    sweep.add_argument("--positions", action="store_true",
                       help="split every edge by token position")
    sweep.add_argument("--all-positions", action="store_true",
                       help="average the metric over all positions, not just the last")
    sweep.add_argument("--abs-delta", action="store_true",
                       help="remove when |metric change| < tau")
    sweep.add_argument("--prompts", type=int, metavar="N",
                       help="how many prompt pairs (default: the task's)")
    sweep.add_argument("--seed", type=int, default=0,
                       help="the prompts' random seed (default 0)")
    sweep.add_argument("--device", default="cpu",
                       help="cpu or cuda, where each run runs (default cpu)")
    sweep.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                       help="precision of the runs (default float32)")
    sweep.add_argument("--no-resume", action="store_true",
                       help="run every tau again, even those with a complete trace in DIR")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_executor_arguments(sweep)


def _add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where a sweep's runs go: here, or Ray (see docs/sweep.md)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after another in this process (default); ray: one Ray "
                        "task per run (pip install 'acdc_viz[ray]')")
    p.add_argument("--address", help="with --executor ray: the cluster to join (auto, "
                                     "ray://HOST:10001); default: start a local Ray instance")
    p.add_argument("--num-cpus", type=float, metavar="N",
                   help="CPUs per run: torch threads, and Ray's request (default: torch's "
                        "setting locally, 1 on Ray)")
    p.add_argument("--num-gpus", type=float, metavar="N",
                   help="with --executor ray: GPUs per run; fractions share a GPU "
                        "(default 1 with --device cuda, else 0)")


def _add_render(sub: Subparsers) -> None:
    """``acdc-viz render``: a trace's seq-graph to a file, no model needed."""
    render = sub.add_parser(
        "render", help="draw a trace's seq-graph to HTML, PNG, SVG or JSON",
        formatter_class=_FORMAT,
        description="Draw the circuit of a trace as a seq-graph (no model needed). PNG and SVG "
                    "need kaleido and\nChromium (BROWSER_PATH=/usr/bin/chromium); HTML needs "
                    "nothing.",
        epilog=_examples(
            "acdc-viz render trace.json --out circuit.html",
            "acdc-viz render trace.json --out start.png --step -1     # the full graph, before "
            "any step",
            "acdc-viz render trace.json --out circuit.svg --layout kamada_kawai"))
    render.add_argument("trace",
                        help="a trace written by `acdc-viz run`, the widget or save_trace")
    render.add_argument("--out", required=True,
                        help="output file: .html, .png, .svg or .json")
    render.add_argument("--step", type=int, help="draw the state after this step (-1: before "
                                                 "any step; default: the last)")
    render.add_argument("--layout", default="seq",
                        help="seq (layers by token positions, the default), multipartite, "
                             "spring, kamada_kawai or spectral")


def _add_app(sub: Subparsers) -> None:
    """``acdc-viz app``: the Explorer alone, served by Voila."""
    app = sub.add_parser(
        "app", help="serve the Explorer alone (no code) as a web page, with Voila",
        formatter_class=_FORMAT,
        description="Serve the Explorer widget on its own, with no code cells, as a local web "
                    "page (Voila). Prints its\naddress (stdout) and serves until Ctrl-C. The "
                    "page's address takes settings:\n?task=NAME&tau=T&positions=1&layout=NAME. "
                    "Needs Voila: pip install 'acdc_viz[app]'.",
        epilog=_examples(
            "acdc-viz app                               # the bundled induction task, on port "
            "8866",
            "acdc-viz app --task tracr-reverse --port 9000 --no-browser"))
    app.add_argument("--task", default=DEFAULT_TASK,
                     help="the task the page opens with (see `acdc-viz tasks`; default "
                          f"{DEFAULT_TASK})")
    app.add_argument("--port", type=int,
                     help="the port to serve on (default: the first free one from 8866)")
    app.add_argument("--host", default="127.0.0.1",
                     help="the address to listen on (default 127.0.0.1: this machine only)")
    app.add_argument("--no-browser", action="store_true",
                     help="don't open a browser (by default one opens where a display is "
                          "available)")


def _add_demo(sub: Subparsers) -> None:
    """``acdc-viz demo``: the quickstart notebook, or the main job headless."""
    demo = sub.add_parser(
        "demo", help="open the quickstart notebook in JupyterLab, or run the main job with "
                     "--headless",
        formatter_class=_FORMAT,
        description="Without --headless: open notebooks/01_quickstart.ipynb (from the "
                    "repository) in JupyterLab.\nWith --headless: run ACDC on the bundled "
                    "induction task and write trace.json and circuit.html.",
        epilog=_examples("acdc-viz demo", "acdc-viz demo --headless --out-dir results"))
    demo.add_argument("--headless", action="store_true",
                      help="no JupyterLab: run the main job and write trace.json and "
                           "circuit.html")
    demo.add_argument("--out-dir", default=".", metavar="DIR",
                      help="with --headless: where to write the files (default: the current "
                           "folder)")
    demo.add_argument("--no-browser", action="store_true",
                      help="without --headless: start JupyterLab but open no browser")
    demo.add_argument("--quiet", action="store_true", help="with --headless: no progress bar")
