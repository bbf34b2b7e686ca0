"""ACDC as a generator of steps (Conmy et al. 2023, Algorithm 1).

Each step tests one edge, in the graph's visit order: the metric of the current circuit without
that edge is compared with the metric of the current circuit, and the edge is removed for good if
the metric grows by less than tau. A caller can stop between any two steps (the trace so far is
kept, with the position to resume from), pause by simply not asking for the next step, or run to
the end with ``run()``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from acdc_viz.data import TokenPairs, data_hash
from acdc_viz.errors import AcdcVizError, RunOutOfMemory, SettingsError
from acdc_viz.graph import Edge
from acdc_viz.hooked import unsupported_features
from acdc_viz.metrics import Metric, MetricFn, resolve_metric
from acdc_viz.models.adapter import TransformerWeights, from_model, model_config, model_hash
from acdc_viz.patching import ABLATIONS, CircuitRunner
from acdc_viz.runtime import (
    display_name,
    model_device,
    resolve_device,
    resolve_dtype,
    run_versions,
)
from acdc_viz.taus import check_tau
from acdc_viz.trace import Step, Trace

log = logging.getLogger(__name__)

APPROXIMATE_DTYPES = (torch.bfloat16, torch.float16)
MAX_HYPOTHESES = 256          # the most hypotheses per pass that automatic K uses on a GPU
MAX_HYPOTHESES_CPU = 32
MEMORY_SHARE = 0.5            # the share of the free GPU memory that automatic K plans to fill
DENSE_BLOCKS = 2              # blocks recomputed per hypothesis in the pass K is sized for


class HypothesisMemory(NamedTuple):
    """The bytes one more hypothesis adds to a pass, by what holds them (``hypothesis_memory``)."""

    dependent_outputs: int
    growing: int
    attention: int
    mlp: int
    logits: int

    @property
    def total(self) -> int:
        """The pass's peak per hypothesis: the dependent outputs stay for the whole pass; the
        other terms are moments of it, each freed before the next."""
        return self.dependent_outputs + max(self.growing, self.attention, self.mlp, self.logits)


def hypothesis_memory(weights: TransformerWeights, batch: int, seq_len: int, *,
                      last_position_only: bool = True, positions: bool = False,
                      dtype: torch.dtype | None = None,
                      blocks: int = DENSE_BLOCKS) -> HypothesisMemory:
    """What one more hypothesis costs a pass in memory, at the batch's size, in bytes.

    Hypotheses are stacked along the batch, so each tensor that a pass computes per hypothesis
    grows by ``batch`` rows per hypothesis. The estimate is for a dense pass: in the tested block
    and the ``blocks - 1`` above it, every destination has some edges removed and keeps edges
    from sources that differ between hypotheses, so all they compute is per hypothesis. (A sparse
    circuit shares most of it, and the logits, between hypotheses; a denser pass that does not
    fit halves K.) With P the prompt's length, d = d_model, H query heads, G key/value heads
    (``n_kv_heads``: fewer than H with grouped- or multi-query attention), D = H + 2 G the
    destinations of a block's attention (a query per head, a key and a value per key/value
    head), e = d_head, F = d_mlp and V the vocabulary, the terms per prompt are:

    - ``dependent_outputs``, kept for the whole pass: ``ablated - output`` of each source computed
      per hypothesis (H heads and the MLP per block, P x d each), which later destinations read,
      in a buffer that grows to the larger of what is needed and twice its size
      (``_dependent_rows``: 2 (H + 1) rows for two blocks). With ``positions`` (the causal-prefix
      cache), also the keys and values each block stashes (2 G x P x e).
    - ``growing``: the buffer's old copy while it grows (H + 1 rows for two blocks).
    - ``attention``, the largest of four moments of a block: making its destinations' inputs
      (D rows of P x d) and the correction subtracted from them (D more); projecting them, with
      H rows gathered and normalised (a norm holds up to three temporaries, in float32 where it
      upcasts); the attention itself: q, k and v (H + 2 G rows of P x e), keys and values
      repeated for each query head when grouped (2 H), the mixed values (H) and two copies of
      the scores (H x P x P; one of them in float32 where the model takes its softmax in
      float32); and the heads' outputs with their ``ablated - output`` (2 H rows of P x d),
      computed only when the next block's D inputs are being made.
    - ``mlp``, also computed while the next block's D inputs are being made: its input and
      output (2 P x d), its norm's two temporaries, and its hidden activations, F wide: before
      and after the activation (2), or for a gated MLP (three matrices) the gate, its
      activation, the linear branch and their product (4).
    - ``logits``, at the last position (at all P with a metric over all positions): the logits
      before and after the unembedding's bias (2 V in the run's dtype), and the metric's copy
      (float32 when the run is in bfloat16/float16), log-softmax and the pointwise KL's three
      temporaries (5 V in the metric's dtype).

    Each moment's temporaries are freed before the next moment's are made, so the peak
    (``total``) is the dependent outputs plus the largest moment. Checked against the measured
    peak of dense passes in ``tests/test_hypothesis_memory.py``.
    """
    dtype = weights.dtype if dtype is None else dtype
    value = _itemsize(dtype)
    layer = weights.layers[0]
    P, d, V = seq_len, int(weights.W_E.shape[1]), int(weights.d_vocab)
    H, G, e = weights.n_heads, weights.n_kv_heads, int(layer.W_Q.shape[-1])
    row, head_row = P * d * value, P * e * value          # a d-wide / d_head-wide row per position
    norm_row = P * d * (max(value, 4) if getattr(layer.ln1, "upcast", "") else value)
    has_mlp = not weights.attn_only and layer.W_in is not None

    size, old = _dependent_rows(H, has_mlp, blocks)
    dependent = size * row + (blocks * 2 * G * head_row if positions else 0)

    D = H + 2 * G
    making = 2 * D * row
    projecting = D * row + H * (row + 3 * norm_row)
    softmax = (_itemsize(weights.softmax_dtype) if weights.softmax_dtype is not None
               else value)
    repeated = 2 * H if G < H else 0
    attending = (H + 2 * G + repeated + H) * head_row + H * P * P * (value + softmax)
    outputs = (D + 2 * H) * row
    attention = max(making, projecting, attending, outputs)

    mlp = 0
    if has_mlp and layer.W_in is not None:
        hidden = 4 if layer.W_gate is not None else 2
        mlp = (D + 2) * row + 2 * norm_row + hidden * int(layer.W_in.shape[1]) * P * value

    metric = 4 if dtype in APPROXIMATE_DTYPES else value
    logits = (1 if last_position_only else P) * V * (2 * value + 5 * metric)
    terms = (dependent, old * row, attention, mlp, logits)
    return HypothesisMemory(*(batch * term for term in terms))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dependent_rows(n_heads: int, has_mlp: bool, blocks: int) -> tuple[int, int]:
    """The (P x d) rows per prompt of the buffer of dependent outputs in a pass that recomputes
    ``blocks`` blocks per hypothesis, and of its old copy at its last growth; it grows as
    ``acdc_viz.pass_inputs.InputBuilder.dep_values`` grows it."""
    need = size = old = 0
    for _ in range(blocks):
        for sources in (n_heads, 1 if has_mlp else 0):
            need += sources
            if need > size:
                old, size = size, max(need, 2 * size, n_heads + 1)
    return size, old


class ApproximateWarning(UserWarning):
    """A run in bfloat16/float16: decisions whose delta sits near tau can differ from float32."""


class DecisionMismatch(AcdcVizError, AssertionError):
    """``test_mode`` found the fast engine and the hooked slow path disagreeing."""


@dataclass
class _ChainCursor:
    """The chain of hypotheses being walked, and how far the steps have walked it."""

    start: int                      # the index of its first edge in the visit order
    edges: tuple[Edge, ...]
    metrics: list[float]            # the metric of each hypothesis
    seconds: float                  # the chain's time, booked on the first step recorded
    next: int = 0                   # the next edge to walk


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
            kept, up to a maximum from the device: 32 on CPU; on a GPU, as many hypotheses of
            a dense pass (``hypothesis_memory``) as fit in half the free memory, at most 256.
            Hypotheses that nothing above the tested block can tell apart (most of them, in a
            sparse circuit) share their computation, so long chains are cheap there; in a dense
            circuit, short ones waste less. K halves after an out-of-memory error instead of
            failing.
        test_mode: re-check every step through a full hooked forward pass of ``model``, and raise
            ``DecisionMismatch`` if it disagrees.
        resume: a stopped ``Trace`` of the same model, data and settings to continue.
        model_name: how the trace names the model.
        config_hash: the model's config hash for the trace, when ``model`` is
            ``TransformerWeights`` of a known model (sweeps on Ray), so that the trace equals a
            run on the model itself; by default the model's own hash, or ``"weights"``.
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
        config_hash: str | None = None,
    ) -> None:
        """Check the settings, build the engine on ``device`` and record the initial metric
        (see the class for the arguments)."""
        self.tau = check_tau(tau)
        if ablation not in ABLATIONS:
            raise SettingsError(f"unknown ablation {ablation!r}: expected one of {list(ABLATIONS)}")
        self.metric = resolve_metric(metric, all_positions=all_positions)
        self.abs_delta = bool(abs_delta)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if batch_hypotheses is not None and (isinstance(batch_hypotheses, bool)
                                             or not isinstance(batch_hypotheses, int)
                                             or batch_hypotheses < 1):
            raise SettingsError("batch_hypotheses must be a whole number >= 1 or None, "
                                f"got {batch_hypotheses!r}")
        if self.dtype in APPROXIMATE_DTYPES:
            warnings.warn(
                f"ACDC in {self.dtype} is approximate: an edge whose delta is within rounding of "
                "tau can be decided differently than in float32 (see benchmarks/bench_engine.py "
                "--flips).",
                ApproximateWarning, stacklevel=2)
        pairs = pairs if isinstance(pairs, TokenPairs) else TokenPairs.from_batch(pairs)
        self.pairs = pairs
        self.model = None if isinstance(model, TransformerWeights) else model
        if isinstance(model, TransformerWeights):
            weights = model
        else:
            pairs.check_vocab(int(model_config(model).d_vocab))
            check_tokens = pairs.clean[: min(4, pairs.batch_size)].to(model_device(model))
            weights = from_model(model, check_tokens)
        if positions and pairs.seq_len > weights.n_ctx:
            raise SettingsError(f"prompts of {pairs.seq_len} tokens exceed the model's context "
                                f"of {weights.n_ctx}")
        self.weights = weights.to(self.device, self.dtype)
        self.graph = weights.circuit_graph(pairs.seq_len if positions else None)
        self.ablation = ablation
        self.test_mode = test_mode
        if test_mode and unsupported_features(self.weights):
            raise SettingsError(
                "test_mode's hooked slow path covers GPT-2-style models only; this model has "
                f"{', '.join(unsupported_features(self.weights))}. The engine's exactness on such "
                "models is proven against the brute-force reference (tests/reference_acdc.py; "
                "docs/model-families.md).")
        if test_mode and self.model is None:
            raise SettingsError("test_mode needs the TransformerLens model itself, "
                                "not TransformerWeights")
        clean, corrupt = (t.pin_memory().to(self.device, non_blocking=True)
                          if self.device.type == "cuda" else t.to(self.device)
                          for t in (pairs.clean, pairs.corrupt))
        self._clean, self._corrupt = clean, corrupt
        self.runner = CircuitRunner(self.weights, self.graph, clean, corrupt, ablation,
                                    last_position_only=self.metric.last_position_only)
        self.adaptive = batch_hypotheses is None
        self.batch_hypotheses = batch_hypotheses or self._auto_hypotheses()
        self._chain_length = 1 if self.adaptive else self.batch_hypotheses
        self._chain: _ChainCursor | None = None
        self._resume_at: int | None = None      # where a resumed run's first chain starts
        # Metrics of half-precision runs are computed in float32: a KL of bfloat16 logits is
        # noise at the size of a typical tau.
        full = self.runner.full_logits
        self._full = full.float() if self.dtype in APPROXIMATE_DTYPES else full
        initial = self.metric(self._full, self._full)
        self.trace = Trace(
            settings={
                "model": {"name": display_name(model, model_name),
                          "config_hash": model_hash(model) if config_hash is None else config_hash,
                          "n_layers": weights.n_layers,
                          "n_heads": weights.n_heads, "d_model": int(weights.W_E.shape[1]),
                          "attn_only": weights.attn_only, "causal": weights.causal},
                "tau": self.tau, "metric": self.metric.name, "ablation": ablation,
                "positions": bool(positions), "abs_delta": self.abs_delta,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "approximate": self.dtype in APPROXIMATE_DTYPES,
                "batch_size": pairs.batch_size, "seq_len": pairs.seq_len,
                "data_hash": data_hash(pairs), "versions": run_versions(),
            },
            graph=self.graph, steps=[], initial_metric=initial, status="stopped", tokens=tokens,
        )
        self.current_metric = initial
        if resume is not None:
            self._replay(resume)

    # ----- resume ------------------------------------------------------------------------------

    def _replay(self, old: Trace) -> None:
        """Continue a stopped trace: check that it has this run's settings, then remove the
        edges it removed, up to the chain that the stop cut."""
        keys = ("model", "tau", "metric", "ablation", "positions", "abs_delta", "data_hash",
                "dtype")
        for key in keys:
            recorded, current = old.settings.get(key), self.trace.settings.get(key)
            if key == "model":
                recorded = {k: v for k, v in (recorded or {}).items() if k != "name"}
                current = {k: v for k, v in (current or {}).items() if k != "name"}
            if recorded != current:
                raise SettingsError(
                    f"cannot resume: the trace was recorded with {key}={recorded!r}, this run "
                    f"has {key}={current!r}. "
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
        """The most hypotheses per pass for automatic K: 32 on CPU; on a GPU, as many dense
        hypotheses (``hypothesis_memory``) as fit in ``MEMORY_SHARE`` of the free memory, at
        most 256 (a denser pass that does not fit halves K, see ``_evaluate``)."""
        if self.device.type != "cuda":
            return MAX_HYPOTHESES_CPU
        free, _ = torch.cuda.mem_get_info(self.device)
        need = hypothesis_memory(self.weights, self.pairs.batch_size, self.pairs.seq_len,
                                 last_position_only=self.metric.last_position_only,
                                 positions=self.graph.n_positions is not None,
                                 dtype=self.dtype)
        k = max(1, min(MAX_HYPOTHESES, int(MEMORY_SHARE * free / need.total)))
        log.info("automatic K: at most %d hypotheses per pass (%.1f MiB each of %.0f MiB free)",
                 k, need.total / 2**20, free / 2**20)
        return k

    def _chain_metrics(self, chain: tuple[Edge, ...]) -> list[float]:
        """The metric of each hypothesis of the chain, with one device-to-host copy."""
        logits = self.runner.chain_logits(chain)
        if len(chain) > 1 and logits.stride(0) == 0:      # every hypothesis has the same logits
            metric = self.metric.many(logits[:1].to(self._full.dtype), self._full)
            return metric.double().tolist() * len(chain)
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
                    f"out of memory while testing edge {index} ({self.graph.edges[index].name}) on "
                    f"{self.device}: {exc}. The {index} steps so far are kept (exception.trace; "
                    f"save it and resume). Try a smaller batch than {self.pairs.batch_size} "
                    "prompts, or a shorter prompt.",
                    trace=self.trace,
                ) from exc

    def _decide(self, delta: float) -> bool:
        return (abs(delta) if self.abs_delta else delta) < self.tau

    def _chain_at(self, index: int) -> tuple[Edge, ...]:
        """The next chain from ``index``: at most K edges, within one destination group (a pass
        starts at its lowest destination, so no hypothesis is recomputed from below its block)."""
        chain = self.graph.edges[index: index + min(self._chain_length, self.batch_hypotheses)]
        start = self.runner.start_of(chain[0])
        end = next((i for i, e in enumerate(chain) if self.runner.start_of(e) != start),
                   len(chain))
        return chain[:end]

    def _adapt(self, kept_at: int | None) -> None:
        """Automatic K after a chain: double it while whole chains are removed, else fall back to
        the run of removals that the kept edge (at chain position ``kept_at``) ended."""
        if self.adaptive:
            self._chain_length = (min(2 * self._chain_length, self.batch_hypotheses)
                                  if kept_at is None else max(1, kept_at))

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
                started = time.perf_counter()
                start = self._resume_at if self._resume_at is not None else len(self.trace.steps)
                self._resume_at = None
                chain, metrics = self._evaluate(start)
                self._chain = _ChainCursor(start, chain, metrics, time.perf_counter() - started)
            cursor = self._chain
            for i in range(cursor.next, len(cursor.edges)):
                edge, after, index = cursor.edges[i], cursor.metrics[i], cursor.start + i
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
                cursor.next = i + 1
                if not removed:       # the later hypotheses assumed it removed: the chain ends
                    self._adapt(i)
                    self._chain = None
                if index >= len(self.trace.steps):
                    step = self.trace.record(after, removed, cursor.seconds)
                    cursor.seconds = 0.0
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
        """test_mode: recompute the circuit without ``edge`` by a hooked full forward pass and
        raise ``DecisionMismatch`` where it disagrees with the engine."""
        from acdc_viz.hooked import hooked_logits

        removed_edges = [self.graph.edge(s.edge) for s in self.trace.steps if s.removed] + [edge]
        logits = hooked_logits(self.model, self._clean, self._corrupt,
                               removed_edges, self.ablation,
                               last_position_only=self.metric.last_position_only)
        slow_after = self.metric(logits.to(self.dtype).to(self._full.dtype), self._full)
        tol = 1e-4 * max(1.0, abs(slow_after))
        slow_removed = self._decide(slow_after - self.current_metric)
        near_tau = abs(fast_after - self.current_metric - self.tau) <= tol
        if abs(slow_after - fast_after) > tol or (slow_removed != removed and not near_tau):
            raise DecisionMismatch(
                f"test_mode: edge {edge.name}: the engine measured {fast_after!r} "
                f"(removed={removed}), "
                f"the hooked full forward pass {slow_after!r} (removed={slow_removed})."
            )

    def final_metric_from_scratch(self) -> float:
        """Recompute the kept circuit's metric with one full forward pass from the embeddings."""
        return self.metric(self.runner.logits_from(0, "attn").to(self._full.dtype), self._full)


def run_acdc(model: Any, pairs: Any, **kwargs: Any) -> Trace:
    """Run ACDC to the end; keyword arguments as for ``Acdc``."""
    return Acdc(model, pairs, **kwargs).run()
