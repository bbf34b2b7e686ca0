"""Forward passes of a circuit: the full model with some edges replaced by ablated values.

Removing the edge ``src -> dest`` changes dest's input to

    current input - src's current output + src's ablated output.

So a destination's input is the ordinary residual stream plus a *correction*
``sum over removed sources (ablated - current)``. We keep the removed edges as 0/1 masks
``mask[dest_row, source, position]`` and compute each correction with one matrix product,
only for destinations that have removed edges. Everything else runs as one ordinary batched
forward pass: no per-head hooks on the hot path.

ACDC visits destinations from the output down, so when it tests an edge into a block,
nothing below that block has been changed: a test starts from the cached clean residual stream
at that block. Corrections are split into the part from sources below the starting block
(fixed during a test, cached per destination group) and the part from sources recomputed in
the pass.

**Chains of hypotheses.** ``chain_logits(edges)`` evaluates "the circuit minus edges[0]",
"minus edges[0] and edges[1]", ... in one pass, stacked along the batch dimension
(hypothesis-major: row ``j * batch + b``). Hypothesis j differs from the current circuit by the
first j+1 edges of the chain, which enter the corrections as a cumulative sum over j.

**What differs between hypotheses.** Hypotheses differ only in the chain's edges, so a pass first
computes them per hypothesis only where the chain enters, and then wherever a node *keeps* an
edge from a node that differs. Everything else (in a sparse circuit, nearly all of the layers
above the tested block, often the logits too) is the same for all hypotheses and computed once,
at the batch's size. For that, a pass carries ``base``: the stream with each shared source's
output and each differing source's ablated value. A destination's input is then ``base`` plus its
removed edges from shared sources (as ablated - output), minus its kept edges from differing ones.
When the logits are shared, ``chain_logits`` returns one copy expanded over the hypotheses.

**Causal prefix.** In position mode with a causal model, removing an edge at position p changes
nothing at positions < p. A pass then computes only positions >= the chain's lowest position and
takes the keys and values of the earlier positions (and, for metrics over all positions, their
logits) from a cache of the current circuit. ``accept`` moves an evaluated hypothesis into the
circuit and, lazily, its keys and values into that cache.

**Shortformer positions** (``TransformerWeights.W_pos_qk``) enter q and k after ``ln1``, so
they are a position-dependent bias of q and k (``qkv_biases``); corrections still act on the
stream before ``ln1``, and the positions are no source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from acdc_viz.graph import QKV, CircuitGraph, Edge
from acdc_viz.models.adapter import TransformerWeights

Ablation = Literal["resample", "zero", "mean"]
ABLATIONS: tuple[str, ...] = ("resample", "zero", "mean")
Stage = Literal["attn", "mlp", "out"]
_STAGE_ORDER = {"attn": 0, "mlp": 1, "out": 2}

GroupKey = tuple[int, str]
Entry = tuple[int, int, int, int]       # (hypothesis, mask row, source index, position)


@dataclass
class _Group:
    """Destinations corrected together: one layer's q/k/v inputs, one MLP input, or Out."""

    rows: list[int]            # mask rows that belong to the group
    active: list[int]          # rows with at least one removed edge, ascending
    version: int = 0           # bumped whenever a row's mask changes
    cache_key: tuple[int, int, int] | None = None
    cache: torch.Tensor | None = None


@dataclass
class _Pass:
    """What one batched pass evaluates, and what it has computed so far.

    Positions are counted from ``lo``. A recomputed source is *shared* when its output is the same
    for every hypothesis (computed at the batch's size) and *dependent* otherwise (n * batch).
    """

    n: int                                   # hypotheses stacked along the batch
    lo: int                                  # first position computed (the causal prefix is reused)
    entries: dict[GroupKey, list[Entry]]     # the chain's edges, by destination group
    s0: int                                  # first source recomputed in the pass
    base: torch.Tensor                       # (batch, pos, d): the stream, dependent sources ablated
    work: torch.Tensor                       # (sources >= s0, batch, pos, d): ablated - output; 0 if dependent
    work_total: torch.Tensor                 # (batch, pos, d): the sum of work so far
    stash: dict[int, list] | None = None     # layer -> computed keys and values, per head set
    dep_sources: list[int] = field(default_factory=list)    # dependent sources, in slot order
    dep_slot: dict[int, int] = field(default_factory=dict)
    dep_work: torch.Tensor | None = None     # (slots, n * batch, pos, d): ablated - output
    lazy: list = field(default_factory=list)  # (sources, first position, fn): outputs not computed yet
    logits: tuple[torch.Tensor, bool] | None = None   # computed logits and whether per hypothesis


@dataclass
class _Inputs:
    """A group's destination inputs in one pass (see ``CircuitRunner._inputs``)."""

    active: list[int]                        # rows with an input of their own, ascending
    dep_rows: list[int]                      # those of them that differ between hypotheses
    ablated_rows: set[int]                   # rows with every edge removed
    x: torch.Tensor | None = None            # (active, batch, pos, d): shared part of each
    x_dep: torch.Tensor | None = None        # (dep_rows, n * batch, pos, d)
    ablated: torch.Tensor | None = None      # (batch, pos, d): the input of ablated_rows
    plain: torch.Tensor | None = None        # (batch, pos, d): the stream, for the other rows
    plain_dep: torch.Tensor | None = None    # (n * batch, pos, d): the same, when it differs

    def kind(self, row: int) -> str:
        """How a row's input is made: ``own`` / ``own_dep`` (its own, shared or per hypothesis),
        ``ablated`` (all its edges removed) or ``plain`` / ``plain_dep`` (the stream)."""
        if row in self.dep_rows:
            return "own_dep"
        if row in self.active:
            return "own"
        if row in self.ablated_rows:
            return "ablated"
        return "plain" if self.plain_dep is None else "plain_dep"

    def stream(self, kind: str) -> torch.Tensor:
        """The input that all rows of a stream kind share."""
        out = {"ablated": self.ablated, "plain": self.plain, "plain_dep": self.plain_dep}[kind]
        assert out is not None
        return out


def _stage_of(edge: Edge) -> tuple[int, Stage]:
    kind = edge.dest.kind
    return edge.dest.layer, ("out" if kind == "out" else "mlp" if kind == "mlp" else "attn")


class CircuitRunner:
    """Caches for one model, one batch of prompt pairs and one ablation; runs partial forwards.

    Args:
        weights: the model, as ``TransformerWeights``.
        graph: the computational graph (split by position or not).
        clean, corrupt: token ids, (batch, pos), already on the weights' device.
        ablation: ``resample`` (corrupt activations), ``zero`` or ``mean`` (batch mean of the
            corrupt activations).
        last_position_only: return logits only at the last position.
        reuse_prefix: in position mode, compute only positions from the tested edges' lowest
            one (default: whenever the graph is split by position and the model is causal).
    """

    def __init__(
        self,
        weights: TransformerWeights,
        graph: CircuitGraph,
        clean: torch.Tensor,
        corrupt: torch.Tensor,
        ablation: Ablation = "resample",
        *,
        last_position_only: bool = True,
        reuse_prefix: bool | None = None,
    ) -> None:
        self.w = weights
        self.graph = graph
        self.last_position_only = last_position_only
        self.n_layers, self.n_heads = weights.n_layers, weights.n_heads
        self.n_pos = 1 if graph.n_positions is None else graph.n_positions
        self.batch, self.seq_len = clean.shape
        self.n_src = len(graph.sources)
        self._head0 = [graph.sources.index(next(s for s in graph.sources if s.layer == lay)) for lay in range(self.n_layers)]
        self._mlp_src = [h0 + self.n_heads for h0 in self._head0]
        possible = graph.n_positions is not None and weights.causal
        self.reuse_prefix = possible if reuse_prefix is None else bool(reuse_prefix) and possible

        with torch.no_grad():
            clean_run = self._full_run(clean)
            ablated = self._full_run(corrupt)["sources"]
        if ablation == "zero":
            ablated = torch.zeros_like(ablated[:, :1]).expand_as(ablated)
        elif ablation == "mean":
            ablated = ablated.mean(1, keepdim=True).expand_as(ablated)
        self.resid_pre: list[torch.Tensor] = clean_run["resid_pre"]
        self.resid_mid: list[torch.Tensor] = clean_run["resid_mid"]
        self.resid_final: torch.Tensor = clean_run["resid_final"]
        self.full_logits: torch.Tensor = clean_run["logits"]
        self.ablated = ablated
        self.diff_clean = ablated - clean_run["sources"]          # ablated - current, for clean sources
        # The current circuit's keys, values (and logits), for the causal-prefix reuse.
        self.kv_current: list[tuple[torch.Tensor, torch.Tensor]] = clean_run["kv"]
        self.logits_current = self.full_logits.clone()
        self._pending: tuple[_Pass, int] | None = None   # an accepted hypothesis not yet cached
        self._stale = False                              # the cache misses a set_removed
        self._chain: list[Edge] = []
        self._accepted = 0
        self._pass: _Pass | None = None
        self._last_pass: _Pass | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._diff_totals: dict[int, torch.Tensor] = {}     # s -> diff_clean[:s].sum(0)
        del clean_run

        # One mask row per destination, in forward order: per layer 3*n_heads q/k/v rows
        # (letter-major), then the MLP row; Out last.
        self._row_stride = 3 * self.n_heads + 1
        n_rows = self.n_layers * self._row_stride + 1
        self.mask = torch.zeros(n_rows, self.n_src, self.n_pos, dtype=weights.dtype, device=weights.device)
        self._row_count = [0] * n_rows          # removed edges per row, kept on the host (no syncs)
        self._removed_count = np.zeros((n_rows, self.n_src), dtype=np.int32)   # per row and source
        self._removed: set[tuple[int, int, int]] = set()
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._row_edges = [0] * n_rows          # edges into each row
        for edge in graph.edges:
            self._row_edges[self.row_of(edge)] += 1
        self.groups: dict[GroupKey, _Group] = {}
        for layer in range(self.n_layers):
            base = layer * self._row_stride
            self.groups[(layer, "qkv")] = _Group(list(range(base, base + 3 * self.n_heads)), [])
            self.groups[(layer, "mlp")] = _Group([base + 3 * self.n_heads], [])
        self.groups[(self.n_layers, "out")] = _Group([n_rows - 1], [])

    # ----- the circuit -------------------------------------------------------------------------

    def row_of(self, edge: Edge) -> int:
        d = edge.dest
        if d.kind == "out":
            return self.mask.shape[0] - 1
        base = d.layer * self._row_stride
        if d.kind == "mlp":
            return base + 3 * self.n_heads
        assert d.head is not None
        return base + QKV.index(d.kind) * self.n_heads + d.head

    @staticmethod
    def _group_key(edge: Edge) -> GroupKey:
        d = edge.dest
        return (d.layer, "qkv" if d.kind in QKV else d.kind)

    def _set_mask(self, edge: Edge, removed: bool) -> None:
        row, pos = self.row_of(edge), 0 if edge.position is None else edge.position
        key = (row, edge.src.index, pos)
        if (key in self._removed) == removed:
            return
        (self._removed.add if removed else self._removed.remove)(key)
        self.mask[key] = 1.0 if removed else 0.0
        self._row_count[row] += 1 if removed else -1
        self._removed_count[row, edge.src.index] += 1 if removed else -1
        group = self.groups[self._group_key(edge)]
        group.version += 1
        active = self._row_count[row] > 0
        if active and row not in group.active:
            group.active = sorted([*group.active, row])
        elif not active and row in group.active:
            group.active = [r for r in group.active if r != row]

    def set_removed(self, edge: Edge, removed: bool) -> None:
        """Remove (or restore) one edge."""
        self._set_mask(edge, removed)
        self._stale = True

    def accept(self, edge: Edge) -> None:
        """Remove the next edge of the last chain: its hypothesis becomes the current circuit.

        Equivalent to ``set_removed(edge, True)``, but keeps the causal-prefix cache without
        recomputing it. Edges must be accepted in chain order.
        """
        if self._accepted >= len(self._chain) or self._chain[self._accepted] is not edge:
            self.set_removed(edge, True)
            return
        self._set_mask(edge, True)
        if self.reuse_prefix and self._last_pass is not None:
            self._pending = (self._last_pass, self._accepted)
        self._accepted += 1

    def _idx(self, items: list[int]) -> slice | torch.Tensor:
        """An index for ``items``: a slice when they are a contiguous range, else a cached device
        tensor (indexing with a Python list would copy it to the device, a sync, on every use)."""
        if items and items[-1] - items[0] == len(items) - 1 and items == sorted(items):
            return slice(items[0], items[-1] + 1)
        key = tuple(items)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) > 4096:
                self._indices.clear()
            index = torch.tensor(key, dtype=torch.long)
            if self.mask.is_cuda:
                index = index.pin_memory().to(self.mask.device, non_blocking=True)
            self._indices[key] = index
        return index

    # ----- forward passes ----------------------------------------------------------------------

    def _full_run(self, tokens: torch.Tensor) -> dict:
        """A plain forward pass that records every source's output, the streams, keys and values."""
        w = self.w
        resid = w.embed(tokens)
        sources = [resid]
        resid_pre, resid_mid, kv = [], [], []
        for layer, lw in enumerate(w.layers):
            resid_pre.append(resid)
            q, k, v = w.qkv(layer, lw.ln1(resid))
            kv.append((k, v))
            heads = w.attention(layer, q, k, v)
            sources.extend(heads.unbind(0))
            resid = resid + heads.sum(0) + lw.b_O
            resid_mid.append(resid)
            if not w.attn_only:
                out = lw.mlp(resid, w.act)
                sources.append(out)
                resid = resid + out
        return {
            "sources": torch.stack(sources),
            "resid_pre": resid_pre,
            "resid_mid": resid_mid,
            "resid_final": resid,
            "kv": kv,
            "logits": self._logits(resid),
        }

    def _logits(self, resid: torch.Tensor) -> torch.Tensor:
        if self.last_position_only:
            resid = resid[:, -1]
        return self.w.unembed(resid)

    def _contract(self, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum_s mask[r, s, p] * values[s, b, p, d]  ->  (r, b, p, d)."""
        if self.n_pos == 1:
            return (mask[:, :, 0] @ values.reshape(values.shape[0], -1)).view(mask.shape[0], *values.shape[1:])
        s, b, p, d = values.shape           # one product per position
        out = torch.bmm(mask.permute(2, 0, 1), values.permute(2, 0, 1, 3).reshape(p, s, b * d))
        return out.view(p, -1, b, d).permute(1, 2, 0, 3)

    def _mask(self, rows: list[int], sources: slice | list[int], lo: int) -> torch.Tensor:
        """mask[rows][:, sources] at the positions >= lo (all of them without positions)."""
        m = self.mask[self._idx(rows)]
        m = m[:, sources] if isinstance(sources, slice) else m[:, self._idx(sources)]
        return m[..., lo:] if self.n_pos > 1 else m

    def _removed_sum(self, rows: list[int], s_lo: int, values: torch.Tensor, total: torch.Tensor,
                     lo: int) -> torch.Tensor:
        """sum over sources s of mask[r, s - s_lo, p] * values[s - s_lo] for each row r, positions
        >= lo: (rows, batch, positions, d). ``total`` is ``values.sum(0)``.

        Each row takes the cheaper side: the sources it removes, or ``total`` minus the sources it
        keeps (in a sparse circuit, a finished row keeps a few). Only the sources that some row of
        a side needs are read.
        """
        counts = self._removed_count[np.ix_(rows, range(s_lo, s_lo + values.shape[0]))]
        removes, keeps = counts > 0, counts < self.n_pos
        by_keeping = keeps.sum(1) < removes.sum(1)
        out = values.new_empty(len(rows), *values.shape[1:])
        for side, needs in ((False, removes), (True, keeps)):
            which = [i for i in range(len(rows)) if by_keeping[i] == side]
            if not which:
                continue
            sources = np.flatnonzero(needs[which].any(0)).tolist()
            ri = self._idx(which)
            if not sources:
                out[ri] = total if side else 0.0
                continue
            mask = self._mask([rows[i] for i in which], [s_lo + s for s in sources], lo)
            part = self._contract(1.0 - mask if side else mask, values[self._idx(sources)])
            out[ri] = total - part if side else part
        return out

    def _diff_total(self, s: int) -> torch.Tensor:
        """The sum of (ablated - clean) over the sources below s."""
        total = self._diff_totals.get(s)
        if total is None:
            total = self._diff_totals[s] = self.diff_clean[:s].sum(0)
        return total

    def _fixed(self, group: _Group, rows: list[int], s_fixed: int, lo: int) -> torch.Tensor:
        """Corrections of the group's ``rows`` (its active rows that keep an edge) from the
        sources below ``s_fixed``, which hold their clean outputs in this pass: cached until the
        group's mask changes."""
        key = (s_fixed, group.version, lo)
        if group.cache_key != key:
            group.cache = self._removed_sum(rows, 0, self.diff_clean[:s_fixed, :, lo:],
                                            self._diff_total(s_fixed)[:, lo:], lo)
            group.cache_key = key
        assert group.cache is not None
        return group.cache

    def _inputs(self, key: GroupKey, s_end: int, lo: int) -> _Inputs:
        """The inputs of a group's destinations (sources [0, s_end)) at positions >= ``lo``.

        With ``base`` the stream whose recomputed sources are shared outputs or, for dependent
        sources, ablated values, a destination's input is

            base + sum over removed sources of (ablated - output)          (shared sources)
                 - sum over kept dependent sources of (ablated - output)   (per hypothesis)
                 + the chain's edges into it, for the hypotheses that remove them.

        Rows without any removed edge read the plain stream, rows without any kept edge the
        stream of ablated values; only rows that keep an edge from a dependent source, or that
        the chain changes, are computed per hypothesis.
        """
        ps, group = self._pass, self.groups[key]
        assert ps is not None
        entries = ps.entries.get(key, [])
        if entries and self.n_pos > 1:
            entries = [e for e in entries if e[3] >= lo]
        chain_rows = {e[1] for e in entries}
        full = {r for r in group.active if self._row_count[r] == self._row_edges[r]} - chain_rows
        active = sorted({*group.active, *chain_rows} - full)
        s0, at = ps.s0, lo - ps.lo
        s_fixed = min(s0, s_end)
        base = ps.base[:, at:]
        dep_sources = [s for s in ps.dep_sources if s < s_end]
        dep = set(chain_rows)
        if dep_sources and active:
            kept = self._removed_count[np.ix_(active, dep_sources)] < self.n_pos
            dep.update(r for r, k in zip(active, kept.any(1)) if k)
        inp = _Inputs(active=active, dep_rows=[r for r in active if r in dep], ablated_rows=full)
        if full:
            inp.ablated = base + self._diff_total(s_fixed)[:, lo:]
            if s_end > s0:
                inp.ablated += ps.work_total[:, at:]
        if len(active) + len(full) < len(group.rows):      # rows that read the plain stream
            if not dep_sources:
                inp.plain = base
            else:
                total = self._dep_values(dep_sources)[: len(dep_sources), :, at:].sum(0)
                inp.plain_dep = (base.unsqueeze(0) - total.view(ps.n, self.batch, *base.shape[1:])
                                 ).view(-1, *base.shape[1:])
        if not active:
            return inp

        x = base.expand(len(active), *base.shape).clone()
        fixed_rows = [r for r in group.active if r not in full]
        if fixed_rows:
            fixed = self._fixed(group, fixed_rows, s_fixed, lo)
            if len(fixed_rows) == len(active):
                x += fixed
            else:
                x[self._idx([active.index(r) for r in fixed_rows])] += fixed
        if s_end > s0:                                     # removed edges from shared sources
            x += self._removed_sum(active, s0, ps.work[: s_end - s0, :, at:], ps.work_total[:, at:], lo)
        inp.x = x
        if not inp.dep_rows:
            return inp

        n, shape = ps.n, (len(inp.dep_rows), ps.n, *x.shape[1:])
        shared = x[self._idx([active.index(r) for r in inp.dep_rows])].unsqueeze(1)
        fixed_entries = [e for e in entries if e[2] < s0]
        if fixed_entries:
            xd = self._chain_correction(inp.dep_rows, fixed_entries, lo).add_(shared)
        else:
            xd = shared.expand(shape).clone()
        if dep_sources:                                    # kept edges from dependent sources
            used = [s for s, k in zip(dep_sources, (self._removed_count[np.ix_(inp.dep_rows, dep_sources)]
                                                      < self.n_pos).any(0)) if k]
            if used:
                slots = [ps.dep_slot[s] for s in used]
                keep = 1.0 - self._mask(inp.dep_rows, used, lo)
                values = self._dep_values(used)[self._idx(slots)][:, :, at:]
                xd -= self._contract(keep, values).view(shape)
        for j, row, src, pos in (e for e in entries if e[2] >= s0):    # chains across groups only
            target = xd[inp.dep_rows.index(row), j:]
            p = slice(None) if self.n_pos == 1 else slice(pos - lo, pos - lo + 1)
            if src in ps.dep_slot:
                values = self._dep_values([src])[ps.dep_slot[src], :, at:]
                target[..., p, :] += values.view(n, self.batch, *x.shape[2:])[j:, :, p]
            else:
                target[..., p, :] += ps.work[src - s0, :, at:][:, p]
        inp.x_dep = xd.view(len(inp.dep_rows), n * self.batch, *x.shape[2:])
        return inp

    def _chain_correction(self, rows: list[int], entries: list[Entry], lo: int) -> torch.Tensor:
        """(rows, n, batch, positions, d): hypothesis j gets (ablated - clean) of the chain's edges
        0..j into each row: one product of cumulative 0/1 coefficients with the sources' values."""
        ps = self._pass
        sources = sorted({e[2] for e in entries})
        n_pos = self.seq_len - lo if self.n_pos > 1 else 1
        index = torch.tensor([[rows.index(r), j, sources.index(s), 0 if self.n_pos == 1 else p - lo]
                              for j, r, s, p in entries], dtype=torch.long)
        if self.mask.is_cuda:
            index = index.pin_memory().to(self.mask.device, non_blocking=True)
        coef = self.mask.new_zeros(len(rows), ps.n, len(sources), n_pos)
        coef.index_put_(tuple(index.T), coef.new_ones(len(entries)), accumulate=True)
        coef = coef.cumsum(1).flatten(0, 1)
        values = self.diff_clean[self._idx(sources)][:, :, lo:]
        return self._contract(coef, values).view(len(rows), ps.n, *values.shape[1:])

    @staticmethod
    def _norm_proj(norm, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, per_row: bool) -> torch.Tensor:
        """q, k or v (batch, heads, pos, d_head): one input for all heads, or one per head."""
        if per_row:
            return torch.einsum("rbpd,rde->brpe", norm(x), W) + b[None]
        return torch.einsum("bpd,hde->bhpe", norm(x), W) + b[None]

    def _attention(self, layer: int, q_lo: int) -> None:
        """The attention of ``layer``: keys and values at positions >= the pass's ``lo`` (earlier
        ones from the current circuit's cache), queries and outputs at >= ``q_lo``. Heads whose
        q, k and v are the same for all hypotheses are computed once, the others per hypothesis."""
        ps, lw = self._pass, self.w.layers[layer]
        assert ps is not None
        n_heads, first_row, lo = self.n_heads, layer * self._row_stride, ps.lo
        inp = self._inputs((layer, "qkv"), self._head0[layer], lo)
        dep_heads = sorted({(r - first_row) % n_heads for r in range(first_row, first_row + 3 * n_heads)
                            if inp.kind(r) in ("plain_dep", "own_dep")})
        sh_heads = [h for h in range(n_heads) if h not in dep_heads]
        biases = self.w.qkv_biases(layer, q_lo, lo, self.seq_len)
        shared, dependent = [], []
        for letter, (W, b) in enumerate(zip((lw.W_Q, lw.W_K, lw.W_V), biases)):
            p = slice(q_lo - lo, None) if letter == 0 else slice(None)
            rows = [first_row + letter * n_heads + h for h in range(n_heads)]
            out = self._project(lw.ln1, W, b, p, inp, rows, range(n_heads), False, None)
            shared.append(out)
            if dep_heads:
                dependent.append(self._project(lw.ln1, W, b, p, inp, rows, dep_heads, True, out))

        outputs: dict[bool, object] = {}
        for heads, qkv, dep in ((sh_heads, shared, False), (dep_heads, dependent, True)):
            if not heads:
                continue
            hi = self._idx(heads)
            q, k, v = qkv if dep or len(heads) == n_heads else (t[:, hi] for t in qkv)
            if ps.stash is not None:
                ps.stash.setdefault(layer, []).append((hi, k, v, dep))
            args = (layer, hi, q, k, v, ps.n if dep else 1, q_lo)
            outputs[dep] = (lambda args=args: self._heads_out(*args)) if dep else self._heads_out(*args)
        h0 = self._head0[layer]
        self._store([h0 + h for h in sh_heads], outputs.get(False),
                    [h0 + h for h in dep_heads], outputs.get(True), q_lo, lw.b_O)

    def _heads_out(self, layer: int, hi, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                   q_lo: int) -> torch.Tensor:
        """The heads' outputs (heads, n * batch, positions >= q_lo, d) from their q, k, v."""
        lw, lo = self.w.layers[layer], self._pass.lo
        if lo > 0:
            k0, v0 = (t[:, hi, :lo].repeat(n, 1, 1, 1) for t in self.kv_current[layer])
            k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
        mask, causal = None, False
        if self.w.causal and q.shape[2] > 1:
            if q_lo == 0:
                causal = True
            else:
                keys = torch.arange(self.seq_len, device=q.device)
                mask = keys[None, :] <= (q_lo + torch.arange(q.shape[2], device=q.device))[:, None]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / lw.attn_scale)
        return torch.einsum("bhpe,hed->hbpd", z, lw.W_O[hi])

    def _project(self, norm, W: torch.Tensor, b: torch.Tensor, p: slice, inp: _Inputs, rows: list[int],
                 heads, dep: bool, shared: torch.Tensor | None) -> torch.Tensor | None:
        """One of q, k, v for ``heads`` at positions ``p``: without ``dep``, (batch, heads, pos,
        d_head) for the rows that all hypotheses share (None if there are none); with it,
        (n * batch, heads, pos, d_head), the shared rows copied from ``shared``."""
        by_kind: dict[str, list[tuple[int, int]]] = {}
        for slot, h in enumerate(heads):
            kind = inp.kind(rows[h])
            if not dep and kind in ("plain_dep", "own_dep"):
                continue
            by_kind.setdefault(kind, []).append((slot, h))
        if not by_kind:
            return None
        kind = next(iter(by_kind))
        if not dep and len(by_kind) == 1 and kind in ("plain", "ablated") and len(by_kind[kind]) == len(heads):
            return self._norm_proj(norm, inp.stream(kind)[:, p], W, b, False)
        n = self._pass.n if dep else 1
        some = next(t for t in (inp.x, inp.ablated, inp.plain, inp.x_dep, inp.plain_dep) if t is not None)
        out = W.new_empty(n * self.batch, len(heads), some[..., p, :].shape[-2], W.shape[-1])
        for kind, items in by_kind.items():
            si, hi = (self._idx(list(t)) for t in zip(*items))
            if dep and kind in ("plain", "own", "ablated"):
                assert shared is not None
                out[:, si] = shared[:, hi].repeat(n, 1, 1, 1)
            elif kind in ("plain", "plain_dep", "ablated"):
                out[:, si] = self._norm_proj(norm, inp.stream(kind)[:, p], W[hi], b[hi], False)
            else:
                x, order = (inp.x, inp.active) if kind == "own" else (inp.x_dep, inp.dep_rows)
                x = x[self._idx([order.index(rows[h]) for _, h in items])][..., p, :]
                out[:, si] = self._norm_proj(norm, x, W[hi], b[hi], True)
        return out

    def _store(self, sh_src: list[int], sh_out: torch.Tensor | None, dep_src: list[int],
               dep_out, lo: int, bias: torch.Tensor | None = None) -> None:
        """Record sources' outputs (sources, batch, positions >= lo, d): their ``ablated -
        output`` for later corrections, and the stream ``base``. The outputs of dependent
        sources (n * batch) come from ``dep_out()``, called only when a kept edge reads them
        (in a sparse circuit, none does)."""
        ps = self._pass
        at = lo - ps.lo
        base = ps.base[:, at:]
        if sh_src:
            idx = self._idx([s - ps.s0 for s in sh_src])
            work = self.ablated[self._idx(sh_src), :, lo:] - sh_out
            ps.work[idx, :, at:] = work
            ps.work_total[:, at:] += work.sum(0)
            base += sh_out.sum(0)
        if dep_src:
            ps.work[self._idx([s - ps.s0 for s in dep_src])] = 0.0
            for i, src in enumerate(dep_src):
                ps.dep_slot[src] = len(ps.dep_sources) + i
            ps.dep_sources.extend(dep_src)
            ps.lazy.append((dep_src, lo, dep_out))
            base += self.ablated[self._idx(dep_src), :, lo:].sum(0)
        if bias is not None:
            base += bias

    def _dep_values(self, sources: list[int]) -> torch.Tensor:
        """The per-hypothesis ``ablated - output`` buffer, with ``sources`` computed in it."""
        ps = self._pass
        need = len(ps.dep_sources)
        if ps.dep_work is None or ps.dep_work.shape[0] < need:
            old = 0 if ps.dep_work is None else ps.dep_work.shape[0]
            shape = (max(need, 2 * old, self.n_heads + 1), ps.n * self.batch, self.seq_len - ps.lo,
                     self.diff_clean.shape[-1])
            ps.dep_work = self._work_buffer("dep", shape, keep=old)
        wanted = set(sources)
        for item in [it for it in ps.lazy if wanted.intersection(it[0])]:
            ps.lazy.remove(item)
            srcs, lo, fn = item
            out = fn()
            ablated = self.ablated[self._idx(srcs), :, lo:]
            work = (ablated.unsqueeze(1) - out.view(len(srcs), ps.n, self.batch, *out.shape[2:])).view(out.shape)
            ps.dep_work[self._idx([ps.dep_slot[s] for s in srcs]), :, lo - ps.lo:] = work
        return ps.dep_work

    def _mlp(self, layer: int, lo: int) -> None:
        """The MLP of ``layer`` at positions >= ``lo``."""
        lw, src = self.w.layers[layer], self._mlp_src[layer]
        x, dep = self._single_input((layer, "mlp"), src, lo)
        if dep:
            self._store([], None, [src], lambda: lw.mlp(x, self.w.act).unsqueeze(0), lo)
        else:
            self._store([src], lw.mlp(x, self.w.act).unsqueeze(0), [], None, lo)

    def _single_input(self, key: GroupKey, s_end: int, lo: int) -> tuple[torch.Tensor, bool]:
        """The input of a one-row group (an MLP or Out), and whether it is per hypothesis."""
        inp = self._inputs(key, s_end, lo)
        if inp.x_dep is not None:
            return inp.x_dep[0], True
        if inp.x is not None:
            return inp.x[0], False
        if inp.ablated is not None:
            return inp.ablated, False
        if inp.plain_dep is not None:
            return inp.plain_dep, True
        return inp.plain, False

    def _work_buffer(self, name: str, shape: tuple[int, ...], keep: int = 0) -> torch.Tensor:
        """A reused flat buffer viewed as ``shape``; the first ``keep`` rows survive a regrowth."""
        numel = 1
        for s in shape:
            numel *= s
        old = self._buffers.get(name)
        if old is None or old.numel() < numel:
            new = torch.empty(numel, dtype=self.w.dtype, device=self.w.device)
            if keep and old is not None:
                row = numel // shape[0]
                new[: keep * row] = old[: keep * row]
            self._buffers[name] = old = new
        return old[:numel].view(shape)

    def _run(self, layer: int, stage: Stage, n: int, lo: int, entries: dict[GroupKey, list[Entry]],
             stash: bool) -> tuple[torch.Tensor, bool]:
        """One batched pass from ``stage`` of block ``layer`` up. Returns the logits, (batch, ...)
        when every hypothesis has the same ones (``shared``) or else (n * batch, ...), and shared."""
        top = self.n_layers - 1
        last = self.seq_len - 1 if self.last_position_only else lo
        s0 = {"out": self.n_src, "mlp": self._mlp_src[layer] if layer < self.n_layers else 0,
              "attn": self._head0[layer] if layer < self.n_layers else 0}[stage]
        if stage == "out":
            base = self.resid_final[:, lo:]
        elif stage == "mlp":
            base = self.resid_mid[layer][:, lo:]
        else:
            base = self.resid_pre[layer][:, lo:]
        d = self.diff_clean.shape[-1]
        work = self._work_buffer("work", (self.n_src - s0, self.batch, self.seq_len - lo, d))
        self._pass = ps = _Pass(n, lo, entries, s0, base.clone(), work, torch.zeros_like(base),
                                {} if stash else None)
        for lay in range(layer, self.n_layers) if stage != "out" else ():
            q_lo = last if lay == top else lo
            if lay > layer or stage == "attn":
                self._attention(lay, q_lo)
            if not self.w.attn_only:
                self._mlp(lay, q_lo)
        x, dep = self._single_input((self.n_layers, "out"), self.n_src, last)
        logits = self._logits(x)
        if stash and not self.last_position_only:
            ps.logits = (logits, dep)
        if not self.last_position_only and lo > 0:
            prefix = self.logits_current[:, :lo]
            logits = torch.cat([prefix.repeat(n, 1, 1) if dep else prefix, logits], 1)
        return logits, not dep

    def _adopt(self, ps: _Pass, j: int) -> None:
        """Hypothesis j of pass ``ps`` is the current circuit: cache its keys, values, logits."""
        rows = slice(j * self.batch, (j + 1) * self.batch)
        for layer, parts in (ps.stash or {}).items():
            for heads, k, v, dep in parts:
                for cached, new in zip(self.kv_current[layer], (k, v)):
                    cached[:, heads, ps.lo:] = new[rows] if dep else new
        if ps.logits is not None:
            logits, dep = ps.logits
            self.logits_current[:, ps.lo:] = logits[rows] if dep else logits

    def _sync_prefix(self) -> None:
        if self._stale:
            self._pending = None
            self._run(0, "attn", 1, 0, {}, stash=True)
            self._adopt(self._pass, 0)
            self._stale = False
        elif self._pending is not None:
            self._adopt(*self._pending)
        self._pending = None

    @staticmethod
    def start_of(edge: Edge) -> tuple[int, Stage]:
        """Where a pass that tests ``edge`` starts: its destination's block and stage."""
        return _stage_of(edge)

    def chain_logits(self, edges: list[Edge] | tuple[Edge, ...]) -> torch.Tensor:
        """Logits (len(edges), batch, ...) of the hypotheses "the circuit minus edges[:j+1]".

        The edges must be consecutive in the visit order and still in the circuit; hypothesis j
        is exact for the current circuit with edges[0..j] removed. When nothing above the chain
        can tell the hypotheses apart, the result is one set of logits expanded over the first
        axis (stride 0 there).
        """
        if not edges:
            raise ValueError("chain_logits needs at least one edge")
        with torch.no_grad():
            if self.reuse_prefix:
                self._sync_prefix()
            entries: dict[GroupKey, list[Entry]] = {}
            for j, e in enumerate(edges):
                entries.setdefault(self._group_key(e), []).append(
                    (j, self.row_of(e), e.src.index, 0 if e.position is None else e.position))
            layer, stage = min((_stage_of(e) for e in edges), key=lambda ls: (ls[0], _STAGE_ORDER[ls[1]]))
            lo = min(e.position or 0 for e in edges) if self.reuse_prefix else 0
            logits, shared = self._run(layer, stage, len(edges), lo, entries, stash=self.reuse_prefix)
            self._last_pass = self._pass if self.reuse_prefix else None
            self._chain, self._accepted = list(edges), 0
            shape = (len(edges), self.batch, *logits.shape[1:])
            return logits.expand(shape) if shared else logits.view(shape)

    def logits_for(self, edge: Edge) -> torch.Tensor:
        """Logits of the current circuit minus ``edge``."""
        return self.chain_logits([edge])[0]

    def logits_from(self, layer: int, stage: Stage) -> torch.Tensor:
        """Logits of the current circuit, recomputing every position from ``stage`` of ``layer``.

        Exact as long as no edge into a destination below that point is removed, which ACDC's
        visit order guarantees; ``logits_from(0, "attn")`` recomputes everything.
        """
        with torch.no_grad():
            return self._run(layer, stage, 1, 0, {}, stash=False)[0]
