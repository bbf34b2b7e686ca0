"""The execution of a pass: attention and MLP blocks run on the inputs of ``pass_inputs``.

``full_run`` is the plain forward pass that records what the passes start from.
``PassRunner.run`` evaluates a stack of hypotheses from one block and stage up, computing once
what all hypotheses share and per hypothesis only what differs (see ``acdc_viz.patching``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from acdc_viz.graph import QKV, CircuitGraph, Edge
from acdc_viz.models.adapter import LayerWeights, TransformerWeights
from acdc_viz.pass_inputs import (
    Activations,
    GroupInputs,
    InputBuilder,
    LazyOutputs,
    PassState,
    StashedKV,
    WorkBuffers,
)
from acdc_viz.removed_edges import ChainEntry, GroupKey, RemovedEdges

Stage = Literal["attn", "mlp", "out"]
STAGE_ORDER = {"attn": 0, "mlp": 1, "out": 2}


def stage_of(edge: Edge) -> tuple[int, Stage]:
    """Where a pass that tests ``edge`` starts: its destination's block and stage."""
    kind = edge.dest.kind
    return edge.dest.layer, ("out" if kind == "out" else "mlp" if kind == "mlp" else "attn")


class FullRun(NamedTuple):
    """What a plain forward pass records."""

    sources: torch.Tensor                 # (sources, batch, pos, d): every source's output
    resid_pre: list[torch.Tensor]         # per layer (batch, pos, d)
    resid_mid: list[torch.Tensor]
    resid_final: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer (batch, kv heads, pos, d_head)
    logits: torch.Tensor


def unembed(weights: TransformerWeights, resid: torch.Tensor,
            last_position_only: bool) -> torch.Tensor:
    """The logits of a final stream: at the last position only, or at every position."""
    if last_position_only:
        resid = resid[:, -1]
    return weights.unembed(resid)


def full_run(weights: TransformerWeights, tokens: torch.Tensor,
             last_position_only: bool) -> FullRun:
    """A plain forward pass that records every source's output, the streams, keys and values.

    In a parallel block the MLP reads the block's input (``resid_pre``), as the attention does;
    ``resid_mid`` is then the stream after the attention, which no destination reads.
    """
    resid = weights.embed(tokens)
    sources = [resid]
    resid_pre, resid_mid, kv = [], [], []
    parallel = weights.parallel and not weights.attn_only
    for layer, layer_weights in enumerate(weights.layers):
        resid_pre.append(resid)
        block_input = resid
        q, k, v = weights.qkv(layer, layer_weights.ln1(resid))
        kv.append((k, v))
        heads = weights.attention(layer, q, k, v)
        if weights.sandwich:                        # the layer's normed output is one source
            attention = layer_weights.attention_output(heads)
            sources.append(attention)
            resid = resid + attention
        else:
            sources.extend(heads.unbind(0))
            resid = resid + heads.sum(0) + layer_weights.b_O
        resid_mid.append(resid)
        if not weights.attn_only:
            out = layer_weights.mlp(block_input if parallel else resid, weights.act)
            sources.append(out)
            resid = resid + out
    return FullRun(torch.stack(sources), resid_pre, resid_mid, resid, kv,
                   unembed(weights, resid, last_position_only))


def _chain(steps: list[Callable[[torch.Tensor], torch.Tensor]], t: torch.Tensor) -> torch.Tensor:
    for step in steps:
        t = step(t)
    return t


def _norm_proj(norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, W: torch.Tensor,
               b: torch.Tensor, *, per_row: bool) -> torch.Tensor:
    """q, k or v (batch, heads, pos, d_head): one input for all heads, or one per head."""
    if per_row:
        return torch.einsum("rbpd,rde->brpe", norm(x), W) + b[None]
    return torch.einsum("bpd,hde->bhpe", norm(x), W) + b[None]


class PassOutput(NamedTuple):
    """A pass's logits: (batch, ...) when ``shared`` by every hypothesis, else (n * batch, ...)."""

    logits: torch.Tensor
    shared: bool
    state: PassState


class PassRunner:
    """Runs the blocks of a pass for one model and one batch of prompt pairs."""

    def __init__(self, weights: TransformerWeights, graph: CircuitGraph, edges: RemovedEdges,
                 acts: Activations, batch: int, seq_len: int, last_position_only: bool) -> None:
        """Index the sources of each layer and set up the input builder and work buffers."""
        self.weights, self.edges, self.acts = weights, edges, acts
        self.batch, self.seq_len = batch, seq_len
        self.last_position_only = last_position_only
        self.n_layers, self.n_heads = weights.n_layers, weights.n_heads
        self.n_kv_heads = weights.n_kv_heads
        self.group_of = weights.kv_group or tuple(range(self.n_heads))  # a head's key/value head
        self.n_sources = len(graph.sources)
        # each layer's first attention source: its first head, or with sandwich norms its one
        # normed attention output
        self.first_head = [graph.sources.index(next(s for s in graph.sources if s.layer == layer))
                           for layer in range(self.n_layers)]
        self.sandwich = graph.sandwich
        self.mlp_source = [first + (1 if self.sandwich else self.n_heads)
                           for first in self.first_head]
        self.index = edges.index
        self.parallel = weights.parallel and not weights.attn_only
        self.buffers = WorkBuffers(weights.dtype, weights.device)
        self.inputs = InputBuilder(edges, acts, self.buffers, batch, seq_len)

    def run(self, layer: int, stage: Stage, n_hypotheses: int, first_pos: int,
            entries: dict[GroupKey, list[ChainEntry]], *, stash: bool) -> PassOutput:
        """One batched pass from ``stage`` of block ``layer`` up, from position ``first_pos``
        (earlier logits come from the current circuit's cache). ``stash`` keeps the computed
        keys, values and logits, for ``adopt``."""
        top = self.n_layers - 1
        last = self.seq_len - 1 if self.last_position_only else first_pos
        below = self.n_layers > layer
        first_recomputed = {"out": self.n_sources,
                            "mlp": self.mlp_source[layer] if below else 0,
                            "attn": self.first_head[layer] if below else 0}[stage]
        acts = self.acts
        if stage == "out":
            base = acts.resid_final[:, first_pos:]
        elif stage == "mlp":
            base = acts.resid_mid[layer][:, first_pos:]
        else:
            base = acts.resid_pre[layer][:, first_pos:]
        shape = (self.n_sources - first_recomputed, self.batch, self.seq_len - first_pos,
                 acts.diff_clean.shape[-1])
        state = PassState(n_hypotheses, first_pos, entries, first_recomputed, base.clone(),
                          self.buffers.get("work", shape), torch.zeros_like(base),
                          {} if stash else None)
        for block in range(layer, self.n_layers) if stage != "out" else ():
            query_from = last if block == top else first_pos
            if self.parallel:
                self._parallel_block(state, block, query_from,
                                     with_attention=block > layer or stage == "attn")
                continue
            if block > layer or stage == "attn":
                self._attention(state, block, query_from)
            if not self.weights.attn_only:
                self._mlp(state, block, query_from)
        x, dep = self.inputs.inputs(state, (self.n_layers, "out"), self.n_sources, last).single()
        logits = unembed(self.weights, x, self.last_position_only)
        if stash and not self.last_position_only:
            state.logits = (logits, dep)
        if not self.last_position_only and first_pos > 0:
            prefix = acts.logits_current[:, :first_pos]
            logits = torch.cat([prefix.repeat(n_hypotheses, 1, 1) if dep else prefix, logits], 1)
        return PassOutput(logits, not dep, state)

    def adopt(self, state: PassState, hypothesis: int) -> None:
        """A hypothesis of a stashed pass is the current circuit: cache its keys, values, logits."""
        rows = slice(hypothesis * self.batch, (hypothesis + 1) * self.batch)
        for layer, parts in (state.stash or {}).items():
            for units, k, v, per_hypothesis in parts:
                for cached, new in zip(self.acts.kv_current[layer], (k, v), strict=True):
                    cached[:, units, state.first_pos:] = new[rows] if per_hypothesis else new
        if state.logits is not None:
            logits, per_hypothesis = state.logits
            current = self.acts.logits_current
            current[:, state.first_pos:] = logits[rows] if per_hypothesis else logits

    def _attention(self, state: PassState, layer: int, query_from: int) -> None:
        """The attention of ``layer``: keys and values at positions >= the pass's ``first_pos``
        (earlier ones from the current circuit's cache), queries and outputs at >= ``query_from``.
        Heads whose q, k and v are the same for all hypotheses are computed once, the others per
        hypothesis. Keys and values are projected once per key/value head (a KV group's, with
        grouped-query attention) and repeated for its query heads only at the attention."""
        layer_weights, n_heads, n_kv = self.weights.layers[layer], self.n_heads, self.n_kv_heads
        first_pos, group_of = state.first_pos, self.group_of
        inp = self.inputs.inputs(state, (layer, "qkv"), self.first_head[layer], first_pos)
        rows = {letter: self.edges.letter_rows(layer, letter) for letter in QKV}

        def differs(letter: str) -> set[int]:
            return {unit for unit, row in enumerate(rows[letter])
                    if inp.kind(row) in ("plain_dep", "own_dep")}

        dep_groups = differs("k") | differs("v")
        dep_heads = sorted(differs("q") | {h for h in range(n_heads) if group_of[h] in dep_groups})
        shared_heads = [h for h in range(n_heads) if h not in dep_heads]
        kv_of = {False: sorted({group_of[h] for h in shared_heads}),   # key/value heads read
                 True: sorted({group_of[h] for h in dep_heads})}
        units = {"q": (range(n_heads), dep_heads), "k": (range(n_kv), kv_of[True]),
                 "v": (range(n_kv), kv_of[True])}
        biases = self.weights.qkv_biases(layer, query_from, first_pos, self.seq_len)
        weights = (layer_weights.W_Q, layer_weights.W_K, layer_weights.W_V)
        # q's rows are positions query_from.., k's and v's first_pos..
        finish = (self._finish(layer_weights, "q", query_from),
                  self._finish(layer_weights, "k", first_pos), self._finish(layer_weights, "v", 0))
        shared, dependent = [], []
        for i, (letter, W, b) in enumerate(zip(QKV, weights, biases, strict=True)):
            positions = slice(query_from - first_pos, None) if letter == "q" else slice(None)
            args = (state, layer_weights.ln1, W, b, positions, inp, rows[letter], finish[i])
            every, dep_units = units[letter]
            out = self._project(*args, every, per_hypothesis=False, shared=None)
            shared.append(out)
            if dep_heads:
                dependent.append(self._project(*args, dep_units, per_hypothesis=True, shared=out))

        shared_out: torch.Tensor | None = None
        dependent_out: Callable[[], torch.Tensor] | None = None
        for heads, qkv, per_hypothesis in ((shared_heads, shared, False),
                                           (dep_heads, dependent, True)):
            if not heads:
                continue
            head_index, kv_units = self.index(heads), kv_of[per_hypothesis]
            kv_index = self.index(kv_units)
            q, k, v = qkv
            assert q is not None and k is not None and v is not None
            if not per_hypothesis:      # the shared projections hold every head; keep these
                q = q if len(heads) == n_heads else q[:, head_index]
                if len(kv_units) < n_kv:
                    k, v = k[:, kv_index], v[:, kv_index]
            if state.stash is not None:
                state.stash.setdefault(layer, []).append(StashedKV(kv_index, k, v,
                                                                   per_hypothesis))
            kv_slots = [kv_units.index(group_of[h]) for h in heads]
            heads_out = partial(self._heads_out, state, layer, head_index, kv_index, kv_slots,
                                q, k, v, n_hypotheses=state.n_hypotheses if per_hypothesis else 1,
                                query_from=query_from)
            if per_hypothesis:
                dependent_out = heads_out
            else:
                shared_out = heads_out()
        first_head = self.first_head[layer]
        if self.sandwich:
            self._store_normed(state, layer, query_from, shared_out, dependent_out)
            return
        self._store(state, query_from,
                    shared_sources=[first_head + h for h in shared_heads], shared_out=shared_out,
                    dep_sources=[first_head + h for h in dep_heads], dep_out=dependent_out,
                    bias=layer_weights.b_O)

    def _store_normed(self, state: PassState, layer: int, from_pos: int,
                      shared_out: torch.Tensor | None,
                      dependent_out: Callable[[], torch.Tensor] | None) -> None:
        """Record a layer's normed attention output (sandwich norms: the layer's one attention
        source) from its heads' outputs: shared when no head differs between hypotheses, else
        per hypothesis, the shared heads' outputs repeated for each."""
        output, source = self.weights.layers[layer].attention_output, self.first_head[layer]
        if dependent_out is None:
            assert shared_out is not None
            self._store(state, from_pos, shared_sources=[source],
                        shared_out=output(shared_out).unsqueeze(0))
            return
        n = state.n_hypotheses

        def per_hypothesis() -> torch.Tensor:
            heads = dependent_out()
            if shared_out is not None:
                heads = torch.cat([heads, shared_out.repeat(1, n, 1, 1)])
            return output(heads).unsqueeze(0)

        self._store(state, from_pos, dep_sources=[source], dep_out=per_hypothesis)

    def _finish(self, layer_weights: LayerWeights, letter: str,
                start: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What follows the projection of q, k or v rows at positions ``start..``, in Hugging
        Face's order: clipping (OLMo's clip_qkv), then for q and k their per-head norm (Qwen3)
        and the rotary embedding; None when there is nothing."""
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        clip = layer_weights.clip_qkv
        if clip is not None:
            steps.append(partial(torch.clamp, min=-clip, max=clip))
        if letter != "v":
            norm = layer_weights.q_norm if letter == "q" else layer_weights.k_norm
            if norm is not None:
                steps.append(norm)
            if self.weights.rotary is not None:
                steps.append(partial(self.weights.rotary.rotate, start=start,
                                     seq_len=self.seq_len))
        if not steps:
            return None
        return steps[0] if len(steps) == 1 else partial(_chain, steps)

    def _heads_out(self, state: PassState, layer: int, head_index: slice | torch.Tensor,
                   kv_index: slice | torch.Tensor, kv_slots: list[int], q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, *, n_hypotheses: int,
                   query_from: int) -> torch.Tensor:
        """The heads' outputs (heads, n * batch, positions >= query_from, d) from q (one per
        head) and k, v (one per key/value head of ``kv_index``; head i reads ``kv_slots[i]``)."""
        layer_weights, first_pos = self.weights.layers[layer], state.first_pos
        if first_pos > 0:
            prefix_k, prefix_v = (t[:, kv_index, :first_pos].repeat(n_hypotheses, 1, 1, 1)
                                  for t in self.acts.kv_current[layer])
            k, v = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
        if kv_slots != list(range(k.shape[1])):          # grouped-query: one copy per head
            slots = self.index(kv_slots)
            k, v = k[:, slots], v[:, slots]
        scale, weights = 1.0 / layer_weights.attn_scale, self.weights
        if weights.eager(layer_weights):
            # Hugging Face's eager attention with its float32 steps (sliding window, soft caps),
            # as the clean run computes it. Keys cover positions 0..seq_len-1 and queries
            # query_from..seq_len-1, so its causal mask (the bottom-right triangle) lines them up.
            z = weights.eager_attention(q, k, v, scale, layer_weights.window,
                                        weights.alibi(head_index, k.shape[2]))
            return torch.einsum("bhpe,hed->hbpd", z, layer_weights.W_O[head_index])
        mask, causal = None, False
        if self.weights.causal and q.shape[2] > 1:
            if query_from == 0:
                causal = True
            else:
                keys = torch.arange(self.seq_len, device=q.device)
                queries = query_from + torch.arange(q.shape[2], device=q.device)
                mask = keys[None, :] <= queries[:, None]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=scale)
        return torch.einsum("bhpe,hed->hbpd", z, layer_weights.W_O[head_index])

    def _project(self, state: PassState, norm: Callable[[torch.Tensor], torch.Tensor],
                 W: torch.Tensor, b: torch.Tensor, positions: slice, inp: GroupInputs,
                 rows: list[int], finish: Callable[[torch.Tensor], torch.Tensor] | None,
                 heads: Sequence[int], *, per_hypothesis: bool,
                 shared: torch.Tensor | None) -> torch.Tensor | None:
        """One of q, k, v for ``heads`` at ``positions``: without ``per_hypothesis``, (batch,
        heads, pos, d_head) for the rows that all hypotheses share (None if there are none);
        with it, (n * batch, heads, pos, d_head), the shared rows copied from ``shared``.
        ``finish`` (q and k: a per-head norm, the rotary embedding) applies to each projection
        as it is computed; ``shared`` is finished already."""
        def proj(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, per_row: bool) -> torch.Tensor:
            out = _norm_proj(norm, x, W, b, per_row=per_row)
            return out if finish is None else finish(out)

        by_kind: dict[str, list[tuple[int, int]]] = {}
        for slot, head in enumerate(heads):
            kind = inp.kind(rows[head])
            if not per_hypothesis and kind in ("plain_dep", "own_dep"):
                continue
            by_kind.setdefault(kind, []).append((slot, head))
        if not by_kind:
            return None
        kind = next(iter(by_kind))
        if (not per_hypothesis and len(by_kind) == 1 and kind in ("plain", "ablated")
                and len(by_kind[kind]) == len(heads)):
            return proj(inp.stream(kind)[:, positions], W, b, False)
        n = state.n_hypotheses if per_hypothesis else 1
        some = next(t for t in (inp.x, inp.ablated, inp.plain, inp.x_dep, inp.plain_dep)
                    if t is not None)
        n_positions = some[..., positions, :].shape[-2]
        out = W.new_empty(n * self.batch, len(heads), n_positions, W.shape[-1])
        for kind, items in by_kind.items():
            slot_index, head_index = (self.index(list(t)) for t in zip(*items, strict=True))
            if per_hypothesis and kind in ("plain", "own", "ablated"):
                assert shared is not None
                out[:, slot_index] = shared[:, head_index].repeat(n, 1, 1, 1)
            elif kind in ("plain", "plain_dep", "ablated"):
                out[:, slot_index] = proj(inp.stream(kind)[:, positions], W[head_index],
                                          b[head_index], False)
            else:
                x, order = (inp.x, inp.active) if kind == "own" else (inp.x_dep, inp.dep_rows)
                assert x is not None
                x = x[self.index([order.index(rows[h]) for _, h in items])][..., positions, :]
                out[:, slot_index] = proj(x, W[head_index], b[head_index], True)
        return out

    def _store(self, state: PassState, from_pos: int, *, shared_sources: list[int] | None = None,
               shared_out: torch.Tensor | None = None, dep_sources: list[int] | None = None,
               dep_out: Callable[[], torch.Tensor] | None = None,
               bias: torch.Tensor | None = None) -> None:
        """Record sources' outputs (sources, batch, positions >= from_pos, d): their ``ablated -
        output`` for later corrections, and the stream ``base``. The outputs of dependent
        sources (n * batch) come from ``dep_out()``, called only when a kept edge reads them
        (in a sparse circuit, none does)."""
        offset, first_recomputed = from_pos - state.first_pos, state.first_recomputed
        base = state.base[:, offset:]
        if shared_sources:
            assert shared_out is not None
            slots = self.index([s - first_recomputed for s in shared_sources])
            work = self.acts.ablated[self.index(shared_sources), :, from_pos:] - shared_out
            state.work[slots, :, offset:] = work
            state.work_total[:, offset:] += work.sum(0)
            base += shared_out.sum(0)
        if dep_sources:
            assert dep_out is not None
            state.work[self.index([s - first_recomputed for s in dep_sources])] = 0.0
            for i, source in enumerate(dep_sources):
                state.dep_slot[source] = len(state.dep_sources) + i
            state.dep_sources.extend(dep_sources)
            state.lazy.append(LazyOutputs(dep_sources, from_pos, dep_out))
            base += self.acts.ablated[self.index(dep_sources), :, from_pos:].sum(0)
        if bias is not None:
            base += bias

    def _parallel_block(self, state: PassState, layer: int, from_pos: int, *,
                        with_attention: bool) -> None:
        """A parallel block: its MLP reads the block's input stream (sources below the block),
        so its input is taken before the attention adds the heads to ``base``. A pass that
        starts at the MLP (``with_attention`` False, ``base`` = ``resid_mid``, the heads clean)
        reads that input from ``resid_pre``: every source it reads is below the pass's start,
        so all of them hold their clean outputs and only ``base`` differs."""
        if with_attention:
            mlp_input = self._mlp_input(state, layer, from_pos)
            self._attention(state, layer, from_pos)
        else:
            after_heads = state.base
            state.base = self.acts.resid_pre[layer][:, state.first_pos:].clone()
            try:
                mlp_input = self._mlp_input(state, layer, from_pos)
            finally:
                state.base = after_heads
        self._mlp(state, layer, from_pos, mlp_input)

    def _mlp_input(self, state: PassState, layer: int,
                   from_pos: int) -> tuple[torch.Tensor, bool]:
        """The input of ``layer``'s MLP from the sources below ``layer``'s heads, and whether it
        is per hypothesis; a copy (the shared input may be a view of ``base``, which changes in
        place when the heads are stored; per-hypothesis inputs are new tensors already)."""
        x, dep = self.inputs.inputs(state, (layer, "mlp"), self.first_head[layer],
                                    from_pos).single()
        return (x, dep) if dep else (x.clone(), dep)

    def _mlp(self, state: PassState, layer: int, from_pos: int,
             mlp_input: tuple[torch.Tensor, bool] | None = None) -> None:
        """The MLP of ``layer`` at positions >= ``from_pos`` (from ``mlp_input`` when given:
        a parallel block's input)."""
        layer_weights, source = self.weights.layers[layer], self.mlp_source[layer]
        x, dep = mlp_input or self.inputs.inputs(state, (layer, "mlp"), source,
                                                 from_pos).single()
        if dep:
            self._store(state, from_pos, dep_sources=[source],
                        dep_out=lambda: layer_weights.mlp(x, self.weights.act).unsqueeze(0))
        else:
            self._store(state, from_pos, shared_sources=[source],
                        shared_out=layer_weights.mlp(x, self.weights.act).unsqueeze(0))
