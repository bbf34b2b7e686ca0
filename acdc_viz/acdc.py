"""ACDC as a generator of steps (Conmy et al. 2023, Algorithm 1).

Each step tests one edge, in the graph's visit order: the metric of the current circuit without
that edge is compared with the metric of the current circuit, and the edge is removed for good if
the metric grows by less than tau. A caller can stop between any two steps (the trace so far is
kept, with the position to resume from), pause by simply not asking for the next step, or run to
the end with ``run()``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from acdc_viz.data import TokenPairs
from acdc_viz.errors import AcdcVizError, RunOutOfMemory, SettingsError
from acdc_viz.graph import CircuitGraph, Edge
from acdc_viz.metrics import Metric, MetricFn, resolve_metric
from acdc_viz.models.adapter import TransformerWeights, config_hash, from_model, model_config
from acdc_viz.patching import ABLATIONS, CircuitRunner
from acdc_viz.taus import check_tau
from acdc_viz.trace import Step, Trace

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


APPROXIMATE_DTYPES = (torch.bfloat16, torch.float16)
MAX_HYPOTHESES = 256          # the most hypotheses per pass that automatic K uses on a GPU
MAX_HYPOTHESES_CPU = 32


class ApproximateWarning(UserWarning):
    """A run in bfloat16/float16: decisions whose delta sits near tau can differ from float32."""


class DecisionMismatch(AcdcVizError, AssertionError):
    """``test_mode`` found the fast engine and the hooked slow path disagreeing."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {str(device)!r} was asked for, but CUDA is not available here; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("acdc_viz", "torch", "transformer_lens"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def data_hash(pairs: TokenPairs) -> str:
    h = hashlib.sha256()
    for t in (pairs.clean, pairs.corrupt):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class Acdc:
    """One ACDC run over a model and a batch of prompt pairs.

    Args:
        model: a TransformerLens model (4.x ``TransformerBridge`` or 3.x ``HookedTransformer``),
            or ready ``TransformerWeights``.
        pairs: clean and corrupt token ids of equal shape (``TokenPairs`` or anything
            ``TokenPairs.from_batch`` takes).
        tau: the removal threshold, finite and >= 0.
        metric: ``"kl"`` (default), ``"mse"``, a ``Metric`` or a callable
            ``fn(circuit_logits, full_logits)``.
        ablation: ``"resample"`` (default), ``"zero"`` or ``"mean"``.
        positions: split every edge by token position.
        all_positions: the built-in metrics average over all positions instead of the last.
        abs_delta: remove when ``|delta| < tau`` instead of ``delta < tau``.
        device, dtype: where and in what precision to run (float32 by default). bfloat16 and
            float16 are approximate: decisions near tau can flip (``ApproximateWarning``; the
            trace's settings say ``"approximate": true``).
        batch_hypotheses: K, how many edges to test speculatively in one batched pass: the
            hypotheses "circuit minus e1", "minus e1 and e2", ... are stacked along the batch and
            walked in order until the first kept edge; a chain stays within one destination
            block and stage. The result is identical for every K.
            ``None`` (the default) adapts K as the run goes: it doubles while whole chains are
            removed and falls back to the length of the last run of removals when an edge is
            kept, up to a maximum from the device (free GPU memory, at most 256; 32 on CPU).
            Hypotheses that nothing above the tested block can tell apart (most of them, in a
            sparse circuit) share their computation, so long chains are cheap there; in a dense
            circuit, short ones waste less. K halves after an out-of-memory error instead of
            failing.
        test_mode: re-check every step through a full hooked forward pass of ``model``, and raise
            ``DecisionMismatch`` if it disagrees.
        resume: a stopped ``Trace`` of the same model, data and settings to continue.
        model_name: how the trace names the model.
        tokens: token strings of one prompt, for the figure's column labels.
    """

    def __init__(
        self,
        model: Any,
        pairs: Any,
        *,
        tau: float,
        metric: str | Metric | MetricFn = "kl",
        ablation: str = "resample",
        positions: bool = False,
        all_positions: bool = False,
        abs_delta: bool = False,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = torch.float32,
        test_mode: bool = False,
        resume: Trace | None = None,
        model_name: str | None = None,
        tokens: list[str] | None = None,
        batch_hypotheses: int | None = None,
    ) -> None:
        self.tau = check_tau(tau)
        if ablation not in ABLATIONS:
            raise SettingsError(f"unknown ablation {ablation!r}: expected one of {list(ABLATIONS)}")
        self.metric = resolve_metric(metric, all_positions=all_positions)
        self.abs_delta = bool(abs_delta)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if batch_hypotheses is not None and (isinstance(batch_hypotheses, bool)
                                             or not isinstance(batch_hypotheses, int) or batch_hypotheses < 1):
            raise SettingsError(f"batch_hypotheses must be a whole number >= 1 or None, got {batch_hypotheses!r}")
        if self.dtype in APPROXIMATE_DTYPES:
            warnings.warn(
                f"ACDC in {self.dtype} is approximate: an edge whose delta is within rounding of tau "
                "can be decided differently than in float32 (see benchmarks/bench_engine.py --flips).",
                ApproximateWarning, stacklevel=2)
        pairs = pairs if isinstance(pairs, TokenPairs) else TokenPairs.from_batch(pairs)
        self.pairs = pairs
        self.model = None if isinstance(model, TransformerWeights) else model
        if isinstance(model, TransformerWeights):
            weights = model
            cfg_hash = "weights"
        else:
            pairs.check_vocab(int(model_config(model).d_vocab))
            weights = from_model(model, pairs.clean[: min(4, pairs.batch_size)].to(_model_device(model)))
            cfg_hash = config_hash(model.cfg)
        if positions and pairs.seq_len > weights.n_ctx:
            raise SettingsError(f"prompts of {pairs.seq_len} tokens exceed the model's context of {weights.n_ctx}")
        self.weights = weights.to(self.device, self.dtype)
        self.graph = CircuitGraph(
            weights.n_layers, weights.n_heads, attn_only=weights.attn_only,
            n_positions=pairs.seq_len if positions else None,
        )
        self.ablation = ablation
        self.test_mode = test_mode
        if test_mode and self.model is None:
            raise SettingsError("test_mode needs the TransformerLens model itself, not TransformerWeights")
        clean, corrupt = (t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda"
                          else t.to(self.device) for t in (pairs.clean, pairs.corrupt))
        self._clean, self._corrupt = clean, corrupt
        self.runner = CircuitRunner(self.weights, self.graph, clean, corrupt, ablation,  # type: ignore[arg-type]
                                    last_position_only=self.metric.last_position_only)
        self.adaptive = batch_hypotheses is None
        self.batch_hypotheses = batch_hypotheses or self._auto_hypotheses()
        self._chain_length = 1 if self.adaptive else self.batch_hypotheses
        self._chain: list | None = None         # the chain being walked: start, edges, metrics, seconds, next
        self._resume_at: int | None = None      # where a resumed run's first chain starts
        # Metrics of half-precision runs are computed in float32: a KL of bfloat16 logits is
        # noise at the size of a typical tau.
        self._full = self.runner.full_logits.float() if self.dtype in APPROXIMATE_DTYPES else self.runner.full_logits
        initial = self.metric(self._full, self._full)
        self.trace = Trace(
            settings={
                "model": {"name": model_name or getattr(getattr(model, "cfg", None), "model_name", None) or "model",
                          "config_hash": cfg_hash, "n_layers": weights.n_layers,
                          "n_heads": weights.n_heads, "d_model": int(weights.W_E.shape[1]),
                          "attn_only": weights.attn_only, "causal": weights.causal},
                "tau": self.tau, "metric": self.metric.name, "ablation": ablation,
                "positions": bool(positions), "abs_delta": self.abs_delta,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "approximate": self.dtype in APPROXIMATE_DTYPES,
                "batch_size": pairs.batch_size, "seq_len": pairs.seq_len,
                "data_hash": data_hash(pairs), "versions": _versions(),
            },
            graph=self.graph, steps=[], initial_metric=initial, status="stopped", tokens=tokens,
        )
        self.current_metric = initial
        if resume is not None:
            self._replay(resume)

    # ----- resume ------------------------------------------------------------------------------

    def _replay(self, old: Trace) -> None:
        keys = ("model", "tau", "metric", "ablation", "positions", "abs_delta", "data_hash", "dtype")
        for key in keys:
            a, b = old.settings.get(key), self.trace.settings.get(key)
            if key == "model":
                a = {k: v for k, v in (a or {}).items() if k != "name"}
                b = {k: v for k, v in b.items() if k != "name"}
            if a != b:
                raise SettingsError(
                    f"cannot resume: the trace was recorded with {key}={a!r}, this run has {key}={b!r}. "
                    "Resume with the same model, data and settings, or start a new run."
                )
        start = self._interrupted_chain(old.steps)
        for step in old.steps[:start]:
            if step.removed:
                self.runner.set_removed(self.graph.edge(step.edge), True)
        self.trace.steps = list(old.steps)
        self.trace.tokens = self.trace.tokens or old.tokens
        self.current_metric = old.metric_after(start - 1)
        self._resume_at = start
        if len(old.steps) == len(self.graph.edges):
            self.trace.finish()

    # ----- the algorithm -----------------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        return len(self.graph.edges)

    @property
    def kept_edges(self) -> int:
        return self.trace.steps[-1].kept_edges if self.trace.steps else self.n_edges

    @property
    def done(self) -> bool:
        return self.trace.is_complete

    def _auto_hypotheses(self) -> int:
        """The most hypotheses per pass for automatic K: 32 on CPU; on a GPU, as many as fit in
        half the free memory when a few blocks' worth of activations differ per hypothesis (a
        denser pass that does not fit halves K)."""
        if self.device.type != "cuda":
            return MAX_HYPOTHESES_CPU
        free, _ = torch.cuda.mem_get_info(self.device)
        w, p = self.weights, self.pairs
        d, elt = int(w.W_E.shape[1]), torch.finfo(self.dtype).bits // 8
        per_position = d * (4 * w.n_heads + 8) + w.n_heads * p.seq_len
        outputs = w.d_vocab * 3 * (1 if self.metric.last_position_only else p.seq_len)
        per_hypothesis = elt * p.batch_size * (p.seq_len * per_position + outputs)
        return max(1, min(MAX_HYPOTHESES, int(0.5 * free / per_hypothesis)))

    def _chain_metrics(self, chain: tuple[Edge, ...]) -> list[float]:
        """The metric of each hypothesis of the chain, with one device-to-host copy."""
        logits = self.runner.chain_logits(chain)
        if len(chain) > 1 and logits.stride(0) == 0:      # every hypothesis has the same logits
            return self.metric.many(logits[:1].to(self._full.dtype), self._full).double().tolist() * len(chain)
        return self.metric.many(logits.to(self._full.dtype), self._full).double().tolist()

    def _evaluate(self, index: int) -> tuple[tuple[Edge, ...], list[float]]:
        """Evaluate the chain of edges from ``index``; on out-of-memory, halve K and retry."""
        while True:
            chain = self._chain_at(index)
            try:
                return chain, self._chain_metrics(chain)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                if len(chain) > 1:
                    self.batch_hypotheses = max(1, len(chain) // 2)
                    self._chain_length = min(self._chain_length, self.batch_hypotheses)
                    log.warning("out of memory with %d hypotheses per pass; retrying with %d",
                                len(chain), self.batch_hypotheses)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                raise RunOutOfMemory(
                    f"out of memory while testing edge {index} ({chain[0].name}) on {self.device}: "
                    f"{exc}. The {index} steps so far are kept (exception.trace; save it and resume). "
                    f"Try a smaller batch than {self.pairs.batch_size} prompts, or a shorter prompt.",
                    trace=self.trace,
                ) from exc

    def _decide(self, delta: float) -> bool:
        return (abs(delta) if self.abs_delta else delta) < self.tau

    def _chain_at(self, index: int) -> tuple[Edge, ...]:
        """The next chain from ``index``: at most K edges, within one destination group (a pass
        starts at its lowest destination, so no hypothesis is recomputed from below its block)."""
        chain = self.graph.edges[index: index + min(self._chain_length, self.batch_hypotheses)]
        start = self.runner.start_of(chain[0])
        return chain[: next((i for i, e in enumerate(chain) if self.runner.start_of(e) != start), len(chain))]

    def _adapt(self, kept_at: int | None) -> None:
        """Automatic K after a chain: double it while whole chains are removed, else fall back to
        the run of removals that the kept edge (at chain position ``kept_at``) ended."""
        if self.adaptive:
            self._chain_length = (min(2 * self._chain_length, self.batch_hypotheses) if kept_at is None
                                  else max(1, kept_at))

    def _interrupted_chain(self, steps: list[Step]) -> int:
        """Replays the chain schedule over recorded steps: where the chain that the stop cut
        began. A resumed run evaluates that chain again, so that its floating-point sums are
        those of an uninterrupted run."""
        i = 0
        while i < len(steps):
            chain = self._chain_at(i)
            if i + len(chain) > len(steps) and all(s.removed for s in steps[i:]):
                return i
            kept = next((j for j in range(len(chain)) if not steps[i + j].removed), None)
            self._adapt(kept)
            i += len(chain) if kept is None else kept + 1
        return i

    def steps(self) -> Iterator[Step]:
        """Test the remaining edges one at a time, yielding a ``Step`` after each.

        Edges are evaluated in chains of hypotheses (see ``batch_hypotheses``), but the steps come
        out one per edge, in the visit order, exactly as with K = 1. A chain's time is booked on
        its first step. Stopping between steps and calling ``steps()`` again goes on with the
        same chain.
        """
        edges = self.graph.edges
        while len(self.trace.steps) < len(edges):
            if self._chain is None:
                t0 = time.perf_counter()
                start = self._resume_at if self._resume_at is not None else len(self.trace.steps)
                self._resume_at = None
                chain, afters = self._evaluate(start)
                self._chain = [start, chain, afters, time.perf_counter() - t0, 0]
            start, chain, afters, seconds, first = self._chain
            for i in range(first, len(chain)):
                edge, after, index = chain[i], afters[i], start + i
                if not math.isfinite(after):
                    self._chain = None
                    raise AcdcVizError(
                        f"the metric is {after} without edge {edge.name}; check the metric and the "
                        "model's dtype (float16 can overflow). The steps so far are kept in .trace."
                    )
                if index < len(self.trace.steps):     # recorded before a resume: walk it again
                    removed = self.trace.steps[index].removed
                else:
                    removed = self._decide(after - self.current_metric)
                    if self.test_mode:
                        self._check(edge, after, removed)
                if removed:
                    self.runner.accept(edge)
                    self.current_metric = after
                self._chain[4] = i + 1
                if not removed:       # the later hypotheses assumed this edge removed: the chain ends
                    self._adapt(i)
                    self._chain = None
                if index >= len(self.trace.steps):
                    step = self.trace.record(after, removed, seconds)
                    seconds = 0.0
                    if self._chain is not None:
                        self._chain[3] = 0.0
                    if len(self.trace.steps) == len(edges):
                        self.trace.finish()
                    yield step
                if not removed:
                    break
            else:
                self._adapt(None)
                self._chain = None

    def run(self, callback: Callable[[Step], None] | None = None) -> Trace:
        """Run to the end and return the trace."""
        for step in self.steps():
            if callback is not None:
                callback(step)
        return self.trace

    # ----- test mode ---------------------------------------------------------------------------

    def _check(self, edge: Edge, fast_after: float, removed: bool) -> None:
        from acdc_viz.hooked import hooked_logits

        removed_edges = [self.graph.edge(s.edge) for s in self.trace.steps if s.removed] + [edge]
        logits = hooked_logits(self.model, self._clean, self._corrupt,
                               removed_edges, self.ablation,
                               last_position_only=self.metric.last_position_only)
        slow_after = self.metric(logits.to(self.dtype).to(self._full.dtype), self._full)
        tol = 1e-4 * max(1.0, abs(slow_after))
        slow_removed = self._decide(slow_after - self.current_metric)
        if abs(slow_after - fast_after) > tol or (slow_removed != removed and abs(fast_after - self.current_metric - self.tau) > tol):
            raise DecisionMismatch(
                f"test_mode: edge {edge.name}: the engine measured {fast_after!r} (removed={removed}), "
                f"the hooked full forward pass {slow_after!r} (removed={slow_removed})."
            )

    def final_metric_from_scratch(self) -> float:
        """Recompute the kept circuit's metric with one full forward pass from the embeddings."""
        return self.metric(self.runner.logits_from(0, "attn").to(self._full.dtype), self._full)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def run_acdc(model: Any, pairs: Any, **kwargs: Any) -> Trace:
    """Run ACDC to the end; keyword arguments as for ``Acdc``."""
    return Acdc(model, pairs, **kwargs).run()


EdgeScores = dict[str, float]
"""ACDC scores keyed by edge name (``"A0.3->A1.2.k"``, with ``"@pos"`` in position mode).

An edge's score is the smallest tau at which ACDC removed it, or ``+inf`` if no tau removed it.
Higher means more important, as with auto-circuit's ``PruneScores`` (which keys tensors by module
instead: here every edge has its own entry, so a score is looked up by the name a trace uses).
"""

_FAITHFULNESS = {"kl_div": "kl", "kl": "kl", "mse": "mse"}


def acdc_prune_scores(
    model: Any,
    dataloader: Any,
    official_edges: Any = None,
    tao_exps: list[int] | tuple[int, ...] = (-5, -4, -3, -2),
    tao_bases: list[int] | tuple[int, ...] = (1, 3, 5, 7, 9),
    faithfulness_target: str = "kl_div",
    test_mode: bool = False,
    *,
    ablation: str = "resample",
    positions: bool = False,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = torch.float32,
    callback: Callable[[float, Trace], None] | None = None,
    executor: str = "local",
) -> EdgeScores:
    """auto-circuit's entry point: run ACDC at every tau = base * 10**exp and score the edges.

    Args:
        model: a TransformerLens model (4.x bridge or 3.x HookedTransformer).
        dataloader: an iterable of batches with ``.clean``/``.corrupt`` token tensors (auto-circuit's
            ``PromptDataLoader``), dicts or tuples; only the first batch is used, as in auto-circuit.
        official_edges: edge names of a known circuit, or None; only used for logging how many of
            them each tau keeps.
        tao_exps, tao_bases: the grid of thresholds (auto-circuit's spelling).
        faithfulness_target: ``"kl_div"`` or ``"mse"``.
        test_mode: re-check every decision with a hooked full forward pass (slow).
        callback: called with ``(tau, trace)`` after each run, e.g. to save the traces.
        executor: ``"local"`` (one run after another) or ``"ray"`` (see ``acdc_viz.sweep``).

    Returns:
        ``EdgeScores``: edge name -> smallest tau that removed it, ``+inf`` if none did.
    """
    if faithfulness_target not in _FAITHFULNESS:
        raise SettingsError(
            f"unknown faithfulness_target {faithfulness_target!r}: expected 'kl_div' or 'mse'"
        )
    pairs = TokenPairs.from_dataloader(dataloader)
    taus = sorted({check_tau(float(f"{base}e{exp}")) for exp in tao_exps for base in tao_bases})
    if not taus:
        raise SettingsError("tao_exps and tao_bases give no thresholds")
    official = {getattr(e, "name", e) for e in official_edges} if official_edges else set()
    from acdc_viz.sweep import sweep

    result = sweep(model, taus, pairs, metric=_FAITHFULNESS[faithfulness_target],
                   ablation=ablation, positions=positions, device=device, dtype=dtype,
                   test_mode=test_mode, executor=executor, progress=False)
    result.raise_for_failures()
    scores: EdgeScores = {}
    for run in result.runs:                       # in tau order
        tau, trace = run.job.tau, run.trace
        assert trace is not None
        if not scores:
            scores = {e.name: math.inf for e in trace.graph.edges}
        for step in trace.steps:
            if step.removed and scores[step.edge] == math.inf:
                scores[step.edge] = tau
        kept = set(trace.final_kept_edges)
        log.info("tau=%g: %d edges kept%s", tau, len(kept),
                 f", {len(kept & official)}/{len(official)} official" if official else "")
        if callback is not None:
            callback(tau, trace)
    return scores
