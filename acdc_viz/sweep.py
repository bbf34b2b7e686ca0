"""Tau sweeps: one ACDC run per tau (and per task, metric and ablation), locally or on Ray.

ACDC's circuit depends on tau, and ROC curves need a circuit at each of a few dozen taus. The
runs share nothing but their inputs, so they are independent jobs:

- ``executor="local"`` runs them one after another in this process;
- ``executor="ray"`` makes each one a Ray task. The model's weights and the prompts go into
  Ray's object store once per model, and every task reads them from there.

Both executors run the same function, ``run_job``, so a sweep's traces are the traces that
single runs (``Acdc(...).run()``) give with the same settings.

A job that raises, or whose worker dies (a crash, the out-of-memory killer), is retried once.
If it fails again, its error is reported and the other jobs still finish. The driver counts the
attempts itself instead of leaving retries to Ray, so each run records how many attempts it took
and why the earlier ones failed.

With ``out_dir``, each trace is written (atomically, by ``save_trace``) as soon as its run
finishes, and ``summary.json`` is written when the sweep ends. A later sweep into the same
folder skips every job whose trace loads, is complete and was recorded with the same settings.
This module never imports ray unless ``executor="ray"`` is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from acdc_viz.acdc import Acdc
from acdc_viz.data import TokenPairs, data_hash
from acdc_viz.errors import AcdcVizError, DataError, ModelSupportError, SettingsError, describe
from acdc_viz.files import write_json_atomic
from acdc_viz.metrics import Metric, resolve_metric
from acdc_viz.models.adapter import TransformerWeights, from_model, model_config, model_hash
from acdc_viz.patching import ABLATIONS
from acdc_viz.runtime import (
    display_name,
    machine_info,
    model_device,
    resolve_device,
    resolve_dtype,
    torch_threads,
)
from acdc_viz.tasks.base import PreparedTask
from acdc_viz.taus import check_tau, parse_taus
from acdc_viz.trace import Trace, TraceError, load_trace, save_trace

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
MAX_ATTEMPTS = 2
"""Attempts per job: the first, and one retry."""
SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = 1
"""Version of the ``summary.json`` layout (see docs/sweep.md)."""
_MAX_ERROR = 500


class SweepError(AcdcVizError, RuntimeError):
    """Some runs of a sweep failed twice; the message names them and their last error."""


class SweepCancelled(AcdcVizError):
    """The sweep's ``cancel`` event was set while a run was in progress."""


@dataclass(frozen=True)
class SweepJob:
    """One ACDC run of a sweep: every setting except the model and the prompts.

    ``task`` names the model and prompts: the task's name, or the model's name for a sweep over
    your own model. ``metric`` is the metric's key (``"kl"``, ``"mse"``, a task metric such as
    ``"kl_repeated"``, or a custom metric's name).
    """

    task: str
    tau: float
    metric: str
    ablation: str
    positions: bool = False
    all_positions: bool = False
    abs_delta: bool = False
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def file_name(self) -> str:
        """The trace's file name: stable, unique per job setting that can vary within a sweep,
        and safe on any filesystem (``repr`` of the tau round-trips exactly)."""
        parts = [_safe(self.task), _safe(self.metric), _safe(self.ablation)]
        if self.positions:
            parts.append("pos")
        return "-".join(parts) + f"-tau{self.tau!r}.json"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


@dataclass(frozen=True)
class SweepRun:
    """The outcome of one job.

    Attributes:
        job: what ran.
        status: ``"done"`` (ran in this sweep), ``"skipped"`` (a complete trace with the same
            settings was already in ``out_dir``) or ``"failed"`` (both attempts failed).
        trace: the complete trace; None when failed.
        error: the last attempt's error, when failed.
        errors: the errors of all failed attempts; a run that succeeded on its retry has one.
        attempts: 1 or 2 (0 when skipped).
        seconds: wall time of the successful attempt; for a skipped run, the sum of its
            recorded steps' seconds.
        path: where the trace was written, when the sweep had an ``out_dir``.
    """

    job: SweepJob
    status: str
    trace: Trace | None
    error: str | None = None
    errors: tuple[str, ...] = ()
    attempts: int = 1
    seconds: float = 0.0
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.trace is not None

    @property
    def kept_edges(self) -> int | None:
        return None if self.trace is None else len(self.trace.final_kept_edges)

    @property
    def final_metric(self) -> float | None:
        return None if self.trace is None else self.trace.final_metric

    def to_dict(self) -> dict[str, Any]:
        """The run's row in ``summary.json``."""
        job = self.job
        return {
            "task": job.task, "metric": job.metric, "ablation": job.ablation,
            "positions": job.positions, "tau": job.tau, "status": self.status,
            "kept_edges": self.kept_edges,
            "edges": None if self.trace is None else self.trace.n_edges,
            "final_metric": self.final_metric,
            "trace_metric": None if self.trace is None else self.trace.settings.get("metric"),
            "seconds": round(self.seconds, 4), "attempts": self.attempts,
            "error": self.error, "errors": list(self.errors),
            "trace": None if self.path is None else self.path.name,
        }


@dataclass
class SweepResult:
    """Every run of a sweep, in job order (task, metric, ablation, tau).

    ``jobs`` is how many runs the sweep was asked for; ``runs`` lacks the ones that had not
    finished when it was cancelled or interrupted. ``canonical`` holds each task's canonical
    circuit (edge names) where it has one, for the AUCs of ``summary()``. ``cancelled`` is set
    when the ``cancel`` event stopped the sweep; the runs that had not finished are then absent.
    """

    runs: list[SweepRun]
    executor: str
    wall_seconds: float
    jobs: int
    canonical: dict[str, frozenset[str]] = field(default_factory=dict)
    cancelled: bool = False
    interrupted: bool = False

    @property
    def failed(self) -> list[SweepRun]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """Every job has a complete trace."""
        return len(self.runs) == self.jobs and not self.failed

    @property
    def traces(self) -> dict[SweepJob, Trace]:
        return {r.job: r.trace for r in self.runs if r.trace is not None}

    def kept_by_tau(self, task: str | None = None, metric: str | None = None,
                    ablation: str | None = None) -> dict[float, list[str]]:
        """tau -> kept edge names, over the successful runs that match the given filters."""
        return {r.job.tau: r.trace.final_kept_edges for r in self.runs
                if r.trace is not None and (task is None or r.job.task == task)
                and (metric is None or r.job.metric == metric)
                and (ablation is None or r.job.ablation == ablation)}

    def raise_for_failures(self) -> None:
        """Raise ``SweepError`` naming each failed job and its last error."""
        if self.failed:
            lines = [f"tau={r.job.tau!r} ({r.job.task}, {r.job.metric}, {r.job.ablation}): "
                     f"{r.error}" for r in self.failed]
            raise SweepError(f"{len(lines)} of {len(self.runs)} sweep runs failed after "
                             f"{MAX_ATTEMPTS} attempts: " + "; ".join(lines))

    def aucs(self) -> list[dict[str, Any]]:
        """Edge and node AUC of each (task, metric, ablation) group against its canonical circuit.

        A group needs a canonical circuit and at least one successful run; a circuit that does
        not fit the graph (for example a canonical circuit without positions, in a position
        split) gives an ``error`` entry instead of numbers.
        """
        from acdc_viz.evaluate import sweep_rocs

        groups: dict[tuple[str, str, str, bool], list[tuple[float, Trace]]] = {}
        for run in self.runs:
            if run.trace is not None and run.job.task in self.canonical:
                job = run.job
                key = (job.task, job.metric, job.ablation, job.positions)
                groups.setdefault(key, []).append((job.tau, run.trace))
        out = []
        for (task, metric, ablation, positions), traces in groups.items():
            row: dict[str, Any] = {"task": task, "metric": metric, "ablation": ablation,
                                   "positions": positions, "taus": len(traces),
                                   "canonical_edges": len(self.canonical[task])}
            kept = {tau: trace.final_kept_edges for tau, trace in traces}
            edges = [e.name for e in traces[0][1].graph.edges]
            try:
                rocs = sweep_rocs(kept, edges, self.canonical[task])
            except ValueError as exc:
                row["error"] = str(exc)
            else:
                row["edge_auc"] = round(rocs["edge"].auc, 6)
                row["node_auc"] = round(rocs["node"].auc, 6)
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds: one row per run, the AUCs, and the machine."""
        return {
            "format": "acdc_viz sweep summary", "format_version": SUMMARY_FORMAT,
            "executor": self.executor, "wall_seconds": round(self.wall_seconds, 3),
            "complete": self.ok, "cancelled": self.cancelled, "interrupted": self.interrupted,
            "jobs": self.jobs,
            "counts": {s: sum(r.status == s for r in self.runs)
                       for s in ("done", "skipped", "failed")},
            "runs": [r.to_dict() for r in self.runs],
            "auc": self.aucs(),
            "machine": machine_info(),
        }


# ----- the one function both executors run --------------------------------------------------------


def run_job(job: SweepJob, model: Any, pairs: TokenPairs, metric: str | Metric, *,
            model_name: str | None = None, tokens: list[str] | None = None,
            model_hash: str | None = None, test_mode: bool = False,
            cancel: threading.Event | None = None) -> Trace:
    """Run one job to the end and return its trace (the same as ``Acdc(...).run()``).

    ``model`` is a TransformerLens model or its ``TransformerWeights``. Ray workers get the
    weights (they serialise reliably and are all the engine needs), and ``model_hash`` then
    gives the trace the model's config hash, so that it equals a run on the model.
    ``cancel``, when set between two steps, raises ``SweepCancelled``.
    """
    acdc = Acdc(model, pairs, tau=job.tau, metric=metric, ablation=job.ablation,
                positions=job.positions, all_positions=job.all_positions,
                abs_delta=job.abs_delta, device=job.device, dtype=job.dtype,
                test_mode=test_mode, model_name=model_name, tokens=tokens,
                config_hash=model_hash)
    for _ in acdc.steps():
        if cancel is not None and cancel.is_set():
            raise SweepCancelled(f"cancelled at tau={job.tau!r}, step {acdc.trace.resume_from}")
    return acdc.trace


# ----- preparing the inputs ---------------------------------------------------------------------


@dataclass
class _Problem:
    """One model with its prompts and metrics: what a sweep's jobs on one task share."""

    name: str
    model: Any                    # a TL model, or TransformerWeights
    pairs: TokenPairs
    metrics: dict[str, Any]       # key -> what Acdc's metric= takes
    tokens: list[str] | None
    model_hash: str
    data_hash: str
    canonical: frozenset[str] | None = None
    default_metric: str = "kl"
    default_ablation: str = "resample"


def _task_problem(prepared: PreparedTask, positions: bool) -> _Problem:
    """A prepared task as a sweep's problem (its canonical circuit with or without positions)."""
    task = prepared.task
    return _Problem(task.name, prepared.model, prepared.pairs, prepared.metrics, prepared.tokens,
                    model_hash(prepared.model), data_hash(prepared.pairs),
                    prepared.canonical(positions), task.default_metric, task.default_ablation)


def _problems(model_or_task: Any, pairs: Any, *, device: str, prompts: int | None, seed: int,
              positions: bool, model_name: str | None, tokens: list[str] | None) -> list[_Problem]:
    """What the sweep runs on: each task's model and prompts, or the one model with ``pairs``."""
    from acdc_viz.tasks import get_task
    from acdc_viz.tasks.base import Task

    items = (list(model_or_task) if isinstance(model_or_task, (list, tuple))
             else [model_or_task])
    if all(isinstance(x, (str, Task)) for x in items):
        if pairs is not None:
            raise SettingsError("a task brings its own prompts: give either task names, or a "
                                "model with pairs")
        problems = [_task_problem((get_task(x) if isinstance(x, str) else x)
                                  .prepare(device, prompts, seed), positions) for x in items]
        names = [p.name for p in problems]
        if len(set(names)) != len(names):
            raise SettingsError(f"a task is named twice in {names}; name each task once")
        return problems
    if len(items) != 1:
        raise SettingsError("sweep takes one model (with its pairs), or a task name, or a list "
                            "of task names; not a list of models")
    model = items[0]
    if pairs is None:
        raise SettingsError("sweep(model, taus, pairs): give clean and corrupt token ids for "
                            "your model (TokenPairs or (clean, corrupt))")
    pairs = pairs if isinstance(pairs, TokenPairs) else TokenPairs.from_batch(pairs)
    if not isinstance(model, TransformerWeights):
        pairs.check_vocab(int(model_config(model).d_vocab))
    return [_Problem(display_name(model, model_name), model, pairs, {"kl": "kl", "mse": "mse"},
                     tokens, model_hash(model), data_hash(pairs))]


def _metric_keys(problem: _Problem, metric: Any) -> list[str]:
    """Register custom metrics on the problem and return the keys the jobs use."""
    wanted = metric if isinstance(metric, (list, tuple)) else [metric]
    keys = []
    for m in wanted:
        if m is None:
            m = problem.default_metric
        if isinstance(m, str):
            if m not in problem.metrics:
                raise SettingsError(f"unknown metric {m!r} for {problem.name!r}: expected one of "
                                    f"{sorted(problem.metrics)}, a Metric or a callable")
            keys.append(m)
            continue
        key = m.name if isinstance(m, Metric) else getattr(m, "__name__", "custom")
        resolve_metric(m)                          # fail early on something that is not a metric
        problem.metrics[key] = m
        keys.append(key)
    return list(dict.fromkeys(keys))


def _taus(taus: str | Iterable[float]) -> list[float]:
    if isinstance(taus, str):
        taus = parse_taus(taus)
    out = sorted({check_tau(t) for t in taus})
    if not out:
        raise SettingsError("a sweep needs at least one tau")
    return out


# ----- resume -----------------------------------------------------------------------------------


def _expected_metric_name(problem: _Problem, job: SweepJob) -> str:
    return resolve_metric(problem.metrics[job.metric], all_positions=job.all_positions).name


def _matches(trace: Trace, job: SweepJob, problem: _Problem) -> str | None:
    """Why ``trace`` is not the result of ``job`` on ``problem``, or None when it is."""
    s = trace.settings
    expected = {
        "tau": job.tau, "metric": _expected_metric_name(problem, job), "ablation": job.ablation,
        "positions": job.positions, "abs_delta": job.abs_delta, "dtype": job.dtype,
        "data_hash": problem.data_hash,
    }
    for key, value in expected.items():
        if s.get(key) != value:
            return f"it was recorded with {key}={s.get(key)!r}, this sweep has {value!r}"
    got_hash = (s.get("model") or {}).get("config_hash")
    if got_hash != problem.model_hash:
        return f"it was recorded on another model (config hash {got_hash!r})"
    return None


def _completed(path: Path, job: SweepJob, problem: _Problem) -> Trace | None:
    """The trace at ``path`` when it is complete and matches the job; None means: run it."""
    if not path.exists():
        return None
    try:
        trace = load_trace(path)
    except TraceError as exc:
        log.warning("%s cannot be used (%s); running tau=%r again", path, exc, job.tau)
        return None
    if not trace.is_complete:
        log.warning("%s is not complete; running tau=%r again", path, job.tau)
        return None
    why = _matches(trace, job, problem)
    if why is not None:
        log.warning("%s does not belong to this sweep (%s); running tau=%r again", path, why,
                    job.tau)
        return None
    return trace


# ----- executors --------------------------------------------------------------------------------

BeforeJob = Callable[[SweepJob, int], None]
"""``before_job(job, attempt)``: called where the job runs (a Ray worker, or this process) just
before each attempt; ``attempt`` is 1, then 2 for the retry. For logging, seeding, or injecting
faults in tests."""


def _describe(exc: BaseException) -> str:
    """A failed attempt's error, as the run records it; a Ray error names the worker's."""
    cause = getattr(exc, "cause", None)           # a RayTaskError wraps the worker's exception
    return describe(cause if isinstance(cause, BaseException) else exc, _MAX_ERROR)


_INPUT_ERRORS = (SettingsError, ModelSupportError, DataError)
"""Errors in the sweep's inputs, which every job would hit: raised at once, never retried."""

Pending = list[tuple[SweepJob, _Problem]]


class Executor(Protocol):
    """Runs a sweep's pending jobs, each up to ``MAX_ATTEMPTS`` times, and yields their runs
    (done or failed) as they finish; it stops early when the sweep's ``cancel`` is set."""

    def runs(self, pending: Pending) -> Generator[SweepRun, None, None]: ...


class LocalExecutor:
    """One job after another, in this process; an exception is retried once."""

    def __init__(self, *, test_mode: bool, threads: int | None, before_job: BeforeJob | None,
                 cancel: threading.Event | None) -> None:
        self.test_mode, self.threads = test_mode, threads
        self.before_job, self.cancel = before_job, cancel

    def runs(self, pending: Pending) -> Generator[SweepRun, None, None]:
        """Run the jobs in order; an input error (the same for every job) is raised at once."""
        cancel = self.cancel
        for job, problem in pending:
            if cancel is not None and cancel.is_set():
                return
            errors: list[str] = []
            for attempt in range(1, MAX_ATTEMPTS + 1):
                start = time.perf_counter()
                try:
                    if self.before_job is not None:
                        self.before_job(job, attempt)
                    with torch_threads(self.threads):
                        trace = run_job(job, problem.model, problem.pairs,
                                        problem.metrics[job.metric], model_name=problem.name,
                                        tokens=problem.tokens, test_mode=self.test_mode,
                                        cancel=cancel)
                except SweepCancelled:
                    return
                except _INPUT_ERRORS:
                    raise                              # the same for every tau: no sweep can run
                except Exception as exc:  # noqa: BLE001 - reported in the run, after one retry
                    errors.append(_describe(exc))
                    log.warning("tau=%r, attempt %d of %d failed: %s", job.tau, attempt,
                                MAX_ATTEMPTS, errors[-1])
                    continue
                yield SweepRun(job, "done", trace, errors=tuple(errors), attempts=attempt,
                               seconds=time.perf_counter() - start)
                break
            else:
                yield SweepRun(job, "failed", None, error=errors[-1], errors=tuple(errors),
                               attempts=MAX_ATTEMPTS)


@dataclass
class _WorkerInputs:
    """What a Ray task reads from the object store: put there once per model."""

    weights: TransformerWeights
    pairs: TokenPairs
    metrics: dict[str, Any]
    name: str
    tokens: list[str] | None
    model_hash: str


def _ray_task(job: SweepJob, inputs: _WorkerInputs, attempt: int, threads: int,
              before_job: BeforeJob | None) -> tuple[Trace, float]:
    """The body of a Ray task (Ray resolves ``inputs`` from the object store)."""
    with torch_threads(threads):                 # the CPUs this task declared, no more
        if before_job is not None:
            before_job(job, attempt)
        start = time.perf_counter()
        trace = run_job(job, inputs.weights, inputs.pairs, inputs.metrics[job.metric],
                        model_name=inputs.name, tokens=inputs.tokens,
                        model_hash=inputs.model_hash)
        return trace, time.perf_counter() - start


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SettingsError("executor='ray' needs Ray: pip install 'acdc_viz[ray]' (or "
                            "pip install ray), or use executor='local'") from None
    return ray


def _ensure_ray(address: str | None) -> Any:
    """Ray, connected: to the running instance, else to ``address``, else a new local one."""
    ray = _import_ray()
    if ray.is_initialized():
        if address is not None:
            log.info("Ray is already initialised; address=%r is not used", address)
        return ray
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return ray


class RayExecutor:
    """All jobs as Ray tasks at once (Ray queues them by resources); results as they finish."""

    def __init__(self, *, address: str | None, num_cpus: float, num_gpus: float,
                 before_job: BeforeJob | None, cancel: threading.Event | None) -> None:
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.before_job, self.cancel = before_job, cancel

    def _put_inputs(self, ray: Any, pending: Pending) -> dict[int, Any]:
        """Each problem's weights, prompts and metrics in the object store, once per problem."""
        inputs: dict[int, Any] = {}
        for _, problem in pending:
            if id(problem) not in inputs:
                weights = problem.model
                if not isinstance(weights, TransformerWeights):
                    check_tokens = problem.pairs.clean[:4].to(model_device(problem.model))
                    weights = from_model(problem.model, check_tokens)
                inputs[id(problem)] = ray.put(_WorkerInputs(
                    weights.to("cpu"), problem.pairs, problem.metrics, problem.name,
                    problem.tokens, problem.model_hash))
        return inputs

    def runs(self, pending: Pending) -> Generator[SweepRun, None, None]:
        """Submit every job, resubmit a failed attempt once, and cancel what is still running
        when the sweep is cancelled, interrupted or left."""
        ray = _ensure_ray(self.address)
        remote = ray.remote(_ray_task)
        inputs = self._put_inputs(ray, pending)
        threads = max(1, int(self.num_cpus))
        in_flight: dict[Any, tuple[SweepJob, _Problem, int, tuple[str, ...]]] = {}

        def submit(job: SweepJob, problem: _Problem, attempt: int,
                   errors: tuple[str, ...]) -> None:
            ref = remote.options(
                num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0,
                retry_exceptions=False,
                name=f"acdc_viz.sweep {job.task} tau={job.tau:g} attempt {attempt}",
            ).remote(job, inputs[id(problem)], attempt, threads, self.before_job)
            in_flight[ref] = (job, problem, attempt, errors)

        for job, problem in pending:
            submit(job, problem, 1, ())
        try:
            while in_flight:
                if self.cancel is not None and self.cancel.is_set():
                    return
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in ready:
                    job, problem, attempt, errors = in_flight.pop(ref)
                    try:
                        trace, seconds = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        errors = (*errors, _describe(exc))
                        log.warning("tau=%r, attempt %d of %d failed: %s", job.tau, attempt,
                                    MAX_ATTEMPTS, errors[-1])
                        if attempt < MAX_ATTEMPTS:
                            submit(job, problem, attempt + 1, errors)
                        else:
                            yield SweepRun(job, "failed", None, error=errors[-1], errors=errors,
                                           attempts=attempt)
                        continue
                    yield SweepRun(job, "done", trace, errors=errors, attempts=attempt,
                                   seconds=seconds)
        finally:
            for ref in in_flight:                 # cancelled, interrupted, or the caller left
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)


# ----- the entry point ----------------------------------------------------------------------------


def sweep(
    model_or_task: Any,
    taus: str | Iterable[float],
    pairs: Any = None,
    *,
    metric: str | Metric | Callable | Sequence[Any] | None = None,
    ablation: str | Sequence[str] | None = None,
    positions: bool = False,
    all_positions: bool = False,
    abs_delta: bool = False,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    prompts: int | None = None,
    seed: int = 0,
    model_name: str | None = None,
    tokens: list[str] | None = None,
    test_mode: bool = False,
    executor: str = "local",
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    on_result: Callable[[SweepRun], None] | None = None,
    before_job: BeforeJob | None = None,
    cancel: threading.Event | None = None,
) -> SweepResult:
    """Run ACDC once per tau (and per task, metric and ablation) and collect the traces.

    Args:
        model_or_task: a task name from ``acdc-viz tasks`` (or a ``Task``), a list of them, or a
            TransformerLens model (then ``pairs`` is required).
        taus: thresholds, or a spec: ``"1e-5:1e-1:20"`` (log-spaced) or ``"0.01,0.03"``.
        pairs: the model's clean and corrupt token ids (``TokenPairs`` or ``(clean, corrupt)``).
        metric: a metric key (``"kl"``, ``"mse"``, a task metric), a ``Metric`` or a callable,
            or a list of them; default: each task's default metric, else ``"kl"``.
        ablation: ``"resample"``, ``"zero"``, ``"mean"``, or a list; default: the task's.
        positions, all_positions, abs_delta, device, dtype, test_mode: as for ``Acdc``
            (``test_mode`` needs ``executor="local"``: it runs the model's own hooked forward).
        prompts, seed: how many prompt pairs a task generates, and their seed.
        model_name, tokens: how traces of your own model name it and label its columns.
        executor: ``"local"`` (one run after another, here) or ``"ray"``.
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``); None starts a
            local Ray instance. Unused when Ray is already initialised in this process.
        num_cpus: CPUs per run: torch's intra-op threads during each run (see
            ``acdc_viz.runtime.torch_threads``) and, on Ray, the task's CPU request. Default:
            locally, torch's current setting; on Ray, 1. Runs with the same value give
            bit-identical traces on either executor.
        num_gpus: GPUs per Ray task; default 1 on CUDA and 0 otherwise (fractions pack several
            runs on one GPU).
        out_dir: write each trace there as it finishes, and ``summary.json`` at the end.
        resume: with ``out_dir``, skip jobs whose trace there is complete and matches.
        progress: a progress bar on stderr, one tick per run.
        on_result: called in this process with each ``SweepRun`` as it finishes (skipped runs
            first), e.g. to plot it.
        before_job: see ``BeforeJob``.
        cancel: set it (from another thread) to stop the sweep: a local run stops after its
            current step, Ray tasks are cancelled; the result then has ``cancelled=True``.

    Returns:
        A ``SweepResult``. Failed runs are in it with their errors (``result.failed``;
        ``result.raise_for_failures()`` turns them into an exception); the others are complete.
    """
    from tqdm import tqdm

    if executor not in EXECUTORS:
        raise SettingsError(f"unknown executor {executor!r}: expected one of {list(EXECUTORS)}")
    if executor == "ray" and test_mode:
        raise SettingsError("test_mode re-checks every step with the model's own hooked forward "
                            "pass, which Ray workers do not have; use executor='local' for it")
    tau_list = _taus(taus)
    dev = resolve_device(device)
    dtype_name = str(resolve_dtype(dtype)).removeprefix("torch.")
    load_device = str(dev) if executor == "local" else "cpu"
    problems = _problems(model_or_task, pairs, device=load_device, prompts=prompts, seed=seed,
                         positions=positions, model_name=model_name, tokens=tokens)
    ablations = [ablation] if ablation is None or isinstance(ablation, str) else list(ablation)
    for abl in ablations:
        if abl is not None and abl not in ABLATIONS:
            raise SettingsError(f"unknown ablation {abl!r}: expected one of {list(ABLATIONS)}")
    jobs: list[tuple[SweepJob, _Problem]] = []
    for problem in problems:
        for key in _metric_keys(problem, metric):
            for abl in dict.fromkeys(a or problem.default_ablation for a in ablations):
                jobs.extend((SweepJob(problem.name, tau, key, abl, positions, all_positions,
                                      abs_delta, str(dev), dtype_name), problem)
                            for tau in tau_list)
    directory = None if out_dir is None else Path(out_dir)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)

    runs: dict[SweepJob, SweepRun] = {}
    cancelled = interrupted = False
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), disable=not progress, file=sys.stderr, unit="run",
               dynamic_ncols=True, desc=f"sweep ({executor})")

    def record(run: SweepRun) -> None:
        if run.trace is not None and directory is not None and run.status == "done":
            trace, path = run.trace, directory / run.job.file_name
            run = replace(run, path=path)
            save_trace(trace, path)
        runs[run.job] = run
        bar.set_postfix_str(f"tau={run.job.tau:.3g} "
                            + (f"kept={run.kept_edges}" if run.ok else "FAILED"), refresh=False)
        bar.update(1)
        if on_result is not None:
            on_result(run)

    try:
        pending = []
        for job, problem in jobs:
            path = None if directory is None else directory / job.file_name
            done = _completed(path, job, problem) if path is not None and resume else None
            if done is None:
                pending.append((job, problem))
            else:
                record(SweepRun(job, "skipped", done, attempts=0,
                                seconds=sum(s.seconds for s in done.steps), path=path))
        if pending:
            runner: Executor
            if executor == "local":
                threads = None if num_cpus is None else max(1, int(num_cpus))
                runner = LocalExecutor(test_mode=test_mode, threads=threads,
                                       before_job=before_job, cancel=cancel)
            else:
                gpus = num_gpus if num_gpus is not None else (1.0 if dev.type == "cuda" else 0.0)
                runner = RayExecutor(address=address, num_cpus=num_cpus or 1, num_gpus=gpus,
                                     before_job=before_job, cancel=cancel)
            stream = runner.runs(pending)
            with contextlib.closing(stream):
                for run in stream:
                    record(run)
        cancelled = cancel is not None and cancel.is_set() and len(runs) < len(jobs)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        bar.close()
        result = SweepResult([runs[j] for j, _ in jobs if j in runs], executor,
                             time.perf_counter() - start, len(jobs),
                             {p.name: p.canonical for p in problems if p.canonical is not None},
                             cancelled=cancelled, interrupted=interrupted)
        if directory is not None:
            write_json_atomic(result.summary(), directory / SUMMARY_FILE)
    return result


__all__ = [
    "EXECUTORS",
    "MAX_ATTEMPTS",
    "BeforeJob",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "SweepCancelled",
    "SweepError",
    "SweepJob",
    "SweepResult",
    "SweepRun",
    "run_job",
    "sweep",
]
