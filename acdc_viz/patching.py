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

from dataclasses import dataclass
from typing import Literal

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
    """What one batched pass evaluates."""

    n: int                                   # hypotheses stacked along the batch
    lo: int                                  # first position computed (the causal prefix is reused)
    entries: dict[GroupKey, list[Entry]]     # the chain's edges, by destination group
    work_base: int                           # first source recomputed in the pass
    work: torch.Tensor                       # (sources >= work_base, n * batch, pos, d): ablated - current
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None   # layer -> computed k, v
    logits: torch.Tensor | None = None       # computed logits, for the all-positions cache


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
        self._buffer = torch.empty(0, dtype=weights.dtype, device=weights.device)
        del clean_run

        # One mask row per destination, in forward order: per layer 3*n_heads q/k/v rows
        # (letter-major), then the MLP row; Out last.
        self._row_stride = 3 * self.n_heads + 1
        n_rows = self.n_layers * self._row_stride + 1
        self.mask = torch.zeros(n_rows, self.n_src, self.n_pos, dtype=weights.dtype, device=weights.device)
        self._row_count = [0] * n_rows          # removed edges per row, kept on the host (no syncs)
        self._removed: set[tuple[int, int, int]] = set()
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
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
        return torch.einsum("rsp,sbpd->rbpd", mask, values)

    def _correction(self, key: GroupKey, s_end: int, s0: int, lo: int) -> tuple[torch.Tensor | None, list[int]]:
        """Corrections for a group whose sources are [0, s_end), at positions >= ``lo``.

        Returns ``(corr, rows)``: ``corr`` is (rows, n or 1, batch, positions, d_model), the
        second axis being the pass's hypotheses (1 when they all share it); ``rows`` are the
        mask rows it covers. Sources with index < s0 have their clean outputs in this pass, so
        their part is cached until the group's mask changes; the rest use this pass's outputs.
        """
        ps, group = self._pass, self.groups[key]
        entries = ps.entries.get(key, [])
        if entries and self.n_pos > 1:
            entries = [e for e in entries if e[3] >= lo]
        rows = group.active if not entries else sorted({*group.active, *(e[1] for e in entries)})
        if not rows:
            return None, rows
        s_fixed = min(s0, s_end)
        index = {r: i for i, r in enumerate(rows)}
        n_pos = self.seq_len - lo
        shape = (len(rows), 1, self.batch, n_pos, self.diff_clean.shape[-1])
        if group.active:
            cache_key = (s_fixed, group.version, lo)
            if group.cache_key != cache_key:
                mask = self.mask[self._idx(group.active)][:, :s_fixed]
                if self.n_pos > 1:
                    mask = mask[..., lo:]
                group.cache = self._contract(mask, self.diff_clean[:s_fixed, :, lo:])
                group.cache_key = cache_key
            assert group.cache is not None
            if len(rows) == len(group.active):
                corr = group.cache.unsqueeze(1)
            else:
                corr = self.diff_clean.new_zeros(shape)
                corr[self._idx([index[r] for r in group.active])] = group.cache.unsqueeze(1)
        else:
            corr = self.diff_clean.new_zeros(shape)

        fixed = [e for e in entries if e[2] < s_fixed]
        if fixed:      # the chain's edges from clean sources: hypothesis j has those of 0..j
            erows = sorted({e[1] for e in fixed})
            add = self.diff_clean.new_zeros((len(erows), ps.n, *shape[2:]))
            for j, row, src, pos in fixed:
                target = add[erows.index(row), j]
                if self.n_pos == 1:
                    target += self.diff_clean[src, :, lo:]
                else:
                    target[:, pos - lo] += self.diff_clean[src, :, pos]
            corr = corr.expand(-1, ps.n, -1, -1, -1).clone()
            corr[self._idx([index[r] for r in erows])] += add.cumsum(1)

        if s_end > s0:   # sources recomputed in this pass
            mask = self.mask[self._idx(rows)][:, s0:s_end]
            if self.n_pos > 1:
                mask = mask[..., lo:]
            work = ps.work[s0 - ps.work_base: s_end - ps.work_base, :, lo:]
            recomputed = [e for e in entries if e[2] >= s0]
            if recomputed:
                masks = mask.unsqueeze(0).repeat(ps.n, 1, 1, 1)
                for j, row, src, pos in recomputed:
                    masks[j:, index[row], src - s0, 0 if self.n_pos == 1 else pos - lo] = 1.0
                work = work.reshape(work.shape[0], ps.n, self.batch, *work.shape[2:])
                if self.n_pos == 1:
                    rec = torch.einsum("jrs,sjbpd->rjbpd", masks[..., 0], work)
                else:
                    rec = torch.einsum("jrsp,sjbpd->rjbpd", masks, work)
            else:
                rec = self._contract(mask, work).view(len(rows), ps.n, *shape[2:])
            corr = corr + rec
        return corr, rows

    def _with(self, resid: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        """Each correction row added to the stream: (rows, n * batch, pos, d)."""
        n = self._pass.n
        x = resid.view(1, n, self.batch, *resid.shape[1:]) + corr
        return x.reshape(corr.shape[0], n * self.batch, *resid.shape[1:])

    def _attention(self, layer: int, resid: torch.Tensor, s0: int, kv_lo: int, q_lo: int) -> torch.Tensor:
        """The residual stream after the attention of ``layer``, at positions >= ``q_lo``.

        ``resid`` holds positions >= ``kv_lo``; keys and values there are computed, the earlier
        ones come from the current circuit's cache. Queries and outputs only at >= ``q_lo``
        (the last position, when nothing above reads the others).
        """
        ps, lw = self._pass, self.w.layers[layer]
        corr, rows = self._correction((layer, "qkv"), self._head0[layer], s0, kv_lo)
        base, n_heads, qr = layer * self._row_stride, self.n_heads, q_lo - kv_lo
        normed = None
        qkv = []
        biases = self.w.qkv_biases(layer, q_lo, kv_lo, self.seq_len)   # (heads, pos or 1, d_head)
        for letter, (W, b) in enumerate(zip((lw.W_Q, lw.W_K, lw.W_V), biases)):
            sel = [i for i, r in enumerate(rows) if (r - base) // n_heads == letter]
            heads = [rows[i] - base - letter * n_heads for i in sel]
            p = slice(qr, None) if letter == 0 else slice(None)
            if len(heads) < n_heads:                  # some heads read the plain stream
                if normed is None:
                    normed = lw.ln1(resid)
                out = torch.einsum("bpd,hde->bhpe", normed[:, p], W) + b[None]
            if heads:                                 # each corrected head reads its own input
                assert corr is not None
                hi = self._idx(heads)
                x = lw.ln1(self._with(resid[:, p], corr[self._idx(sel)][..., p, :]))
                fixed = torch.einsum("rbpd,rde->brpe", x, W[hi]) + b[hi][None]
                if len(heads) == n_heads:             # heads are ascending: rows are sorted
                    out = fixed
                else:
                    out[:, hi] = fixed
            qkv.append(out)
        q, k, v = qkv
        if ps.stash is not None:
            ps.stash[layer] = (k, v)
        if kv_lo > 0:
            k0, v0 = (t[:, :, :kv_lo].repeat(ps.n, 1, 1, 1) for t in self.kv_current[layer])
            k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
        mask, causal = None, False
        if self.w.causal and q.shape[2] > 1:
            if q_lo == 0:
                causal = True
            else:
                keys = torch.arange(self.seq_len, device=q.device)
                mask = keys[None, :] <= (q_lo + torch.arange(q.shape[2], device=q.device))[:, None]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / lw.attn_scale)
        heads_out = torch.einsum("bhpe,hed->hbpd", z, lw.W_O)    # (heads, n * batch, pos, d_model)
        h0 = self._head0[layer] - ps.work_base
        self._store(h0, h0 + n_heads, self._head0[layer], q_lo, heads_out)
        return resid[:, qr:] + heads_out.sum(0) + lw.b_O

    def _store(self, w0: int, w1: int, s: int, lo: int, out: torch.Tensor) -> None:
        """work[w0:w1] = ablated - out, at positions >= lo, for every hypothesis."""
        ps = self._pass
        target = ps.work[w0:w1, :, lo:].view(w1 - w0, ps.n, self.batch, *out.shape[2:])
        torch.sub(self.ablated[s: s + w1 - w0, None, :, lo:], out.reshape(target.shape), out=target)

    def _mlp(self, layer: int, resid: torch.Tensor, s0: int, lo: int) -> torch.Tensor:
        """The MLP's output for ``resid`` (the stream at positions >= ``lo``)."""
        lw = self.w.layers[layer]
        src = self._mlp_src[layer]
        corr, _ = self._correction((layer, "mlp"), src, s0, lo)
        out = lw.mlp(resid if corr is None else self._with(resid, corr)[0], self.w.act)
        self._store(src - self._pass.work_base, src - self._pass.work_base + 1, src, lo, out.unsqueeze(0))
        return out

    def _work_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        if self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=self.w.dtype, device=self.w.device)
        return self._buffer[:numel].view(shape)

    def _run(self, layer: int, stage: Stage, n: int, lo: int, entries: dict[GroupKey, list[Entry]],
             stash: bool) -> torch.Tensor:
        """One batched pass from ``stage`` of block ``layer`` up; logits (n * batch, ...)."""
        top = self.n_layers - 1
        last = self.seq_len - 1 if self.last_position_only else lo
        s0 = {"out": self.n_src, "mlp": self._mlp_src[layer] if layer < self.n_layers else 0,
              "attn": self._head0[layer] if layer < self.n_layers else 0}[stage]
        d = self.diff_clean.shape[-1]
        work = self._work_buffer((self.n_src - s0, n * self.batch, self.seq_len, d))
        self._pass = _Pass(n, lo, entries, s0, work, {} if stash else None)
        if stage == "out":
            resid = self.resid_final[:, last:]
        elif stage == "mlp":
            resid = self.resid_mid[layer][:, (last if layer == top else lo):]
        else:
            resid = self.resid_pre[layer][:, lo:]
        resid = resid.repeat(n, 1, 1)
        for lay in range(layer, self.n_layers) if stage != "out" else ():
            q_lo = last if lay == top else lo
            if lay > layer or stage == "attn":
                resid = self._attention(lay, resid, s0, lo, q_lo)
            if not self.w.attn_only:
                resid = resid + self._mlp(lay, resid, s0, q_lo)
        corr, _ = self._correction((self.n_layers, "out"), self.n_src, s0, last)
        if corr is not None:
            resid = self._with(resid, corr)[0]
        logits = self._logits(resid)
        if stash and not self.last_position_only:
            self._pass.logits = logits
        if not self.last_position_only and lo > 0:
            logits = torch.cat([self.logits_current[:, :lo].repeat(n, 1, 1), logits], 1)
        return logits

    def _adopt(self, ps: _Pass, j: int) -> None:
        """Hypothesis j of pass ``ps`` is the current circuit: cache its keys, values, logits."""
        rows = slice(j * self.batch, (j + 1) * self.batch)
        for layer, (k, v) in (ps.stash or {}).items():
            self.kv_current[layer][0][:, :, ps.lo:] = k[rows]
            self.kv_current[layer][1][:, :, ps.lo:] = v[rows]
        if ps.logits is not None:
            self.logits_current[:, ps.lo:] = ps.logits[rows]

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
        is exact for the current circuit with edges[0..j] removed.
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
            logits = self._run(layer, stage, len(edges), lo, entries, stash=self.reuse_prefix)
            self._last_pass = self._pass if self.reuse_prefix else None
            self._chain, self._accepted = list(edges), 0
            return logits.view(len(edges), self.batch, *logits.shape[1:])

    def logits_for(self, edge: Edge) -> torch.Tensor:
        """Logits of the current circuit minus ``edge``."""
        return self.chain_logits([edge])[0]

    def logits_from(self, layer: int, stage: Stage) -> torch.Tensor:
        """Logits of the current circuit, recomputing every position from ``stage`` of ``layer``.

        Exact as long as no edge into a destination below that point is removed, which ACDC's
        visit order guarantees; ``logits_from(0, "attn")`` recomputes everything.
        """
        with torch.no_grad():
            return self._run(layer, stage, 1, 0, {}, stash=False)
