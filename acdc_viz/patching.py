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
at that block (``logits_from``). Corrections are split into the part from sources below the
starting block (fixed during a test, cached per destination group) and the part from sources
recomputed in the pass.
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
_ALL = slice(None)


@dataclass
class _Group:
    """Destinations corrected together: one layer's q/k/v inputs, one MLP input, or Out."""

    rows: list[int]            # mask rows that belong to the group
    active: list[int]          # rows with at least one removed edge, ascending
    version: int = 0           # bumped whenever a row's mask changes
    cache_key: tuple[int, int] | None = None
    cache: torch.Tensor | None = None


class CircuitRunner:
    """Caches for one model, one batch of prompt pairs and one ablation; runs partial forwards.

    Args:
        weights: the model, as ``TransformerWeights``.
        graph: the computational graph (split by position or not).
        clean, corrupt: token ids, (batch, pos), already on the weights' device.
        ablation: ``resample`` (corrupt activations), ``zero`` or ``mean`` (batch mean of the
            corrupt activations).
        last_position_only: return logits only at the last position.
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
    ) -> None:
        self.w = weights
        self.graph = graph
        self.last_position_only = last_position_only
        self.n_layers, self.n_heads = weights.n_layers, weights.n_heads
        self.n_pos = 1 if graph.n_positions is None else graph.n_positions
        self.seq_len = clean.shape[1]
        n_src = len(graph.sources)
        self._head0 = [graph.sources.index(next(s for s in graph.sources if s.layer == lay)) for lay in range(self.n_layers)]
        self._mlp_src = [h0 + self.n_heads for h0 in self._head0]

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
        self.work = torch.empty_like(self.diff_clean)             # ablated - current, recomputed sources
        del clean_run

        # One mask row per destination, in forward order: per layer 3*n_heads q/k/v rows
        # (letter-major), then the MLP row; Out last.
        self._row_stride = 3 * self.n_heads + 1
        n_rows = self.n_layers * self._row_stride + 1
        self.mask = torch.zeros(n_rows, n_src, self.n_pos, dtype=weights.dtype, device=weights.device)
        self.groups: dict[tuple[int, str], _Group] = {}
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

    def _group_of(self, edge: Edge) -> _Group:
        d = edge.dest
        key = (d.layer, "qkv" if d.kind in QKV else d.kind)
        return self.groups[key]

    def set_removed(self, edge: Edge, removed: bool) -> None:
        """Remove (or restore) one edge."""
        row = self.row_of(edge)
        pos = 0 if edge.position is None else edge.position
        self.mask[row, edge.src.index, pos] = 1.0 if removed else 0.0
        group = self._group_of(edge)
        group.version += 1
        is_active = bool(self.mask[row].any())
        if is_active and row not in group.active:
            group.active = sorted([*group.active, row])
        elif not is_active and row in group.active:
            group.active = [r for r in group.active if r != row]

    # ----- forward passes ----------------------------------------------------------------------

    def _full_run(self, tokens: torch.Tensor) -> dict:
        """A plain forward pass that records every source's output and the residual streams."""
        w = self.w
        resid = w.embed(tokens)
        sources = [resid]
        resid_pre, resid_mid = [], []
        for layer, lw in enumerate(w.layers):
            resid_pre.append(resid)
            heads = w.attention(layer, *w.qkv(layer, lw.ln1(resid)))
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

    def _correction(self, group: _Group, s_end: int, s0: int, pos: slice = _ALL) -> torch.Tensor | None:
        """Corrections (active rows, batch, pos, d_model) for a group whose sources are [0, s_end).

        Sources with index < s0 have their clean outputs in this pass, so their part is cached
        until the group's mask changes; the rest use this pass's outputs (``self.work``).
        ``pos`` restricts it to some positions (the last one, for the top block).
        """
        if not group.active:
            return None
        s_fixed = min(s0, s_end)
        key = (s_fixed, group.version, pos.start)
        mask = self.mask[group.active]
        if self.n_pos > 1:
            mask = mask[..., pos]
        if group.cache_key != key:
            group.cache = self._contract(mask[:, :s_fixed], self.diff_clean[:s_fixed, :, pos])
            group.cache_key = key
        assert group.cache is not None
        if s_end <= s0:
            return group.cache
        return group.cache + self._contract(mask[:, s0:s_end], self.work[s0:s_end, :, pos])

    def _attention(self, layer: int, resid: torch.Tensor, s0: int, pos: slice) -> torch.Tensor:
        """The residual stream after the attention of ``layer``, at positions ``pos``.

        Keys and values are always computed at every position; queries and outputs only at
        ``pos`` (all, or the last one when nothing above reads the others).
        """
        w, lw = self.w, self.w.layers[layer]
        group = self.groups[(layer, "qkv")]
        corr = self._correction(group, self._head0[layer], s0)
        base, n_heads = group.rows[0], self.n_heads
        normed = None
        qkv = []
        for letter, (W, b) in enumerate(((lw.W_Q, lw.b_Q), (lw.W_K, lw.b_K), (lw.W_V, lw.b_V))):
            sel = [i for i, r in enumerate(group.active) if (r - base) // n_heads == letter] if corr is not None else []
            heads = [group.active[i] - base - letter * n_heads for i in sel]
            p = pos if letter == 0 else _ALL
            if len(heads) < n_heads:                  # some heads read the plain stream
                if normed is None:
                    normed = lw.ln1(resid)
                out = torch.einsum("bpd,hde->bhpe", normed[:, p], W) + b[None, :, None, :]
            if heads:                                 # each corrected head reads its own input
                assert corr is not None
                x = lw.ln1(resid[:, p].unsqueeze(0) + corr[:, :, p][sel])
                fixed = torch.einsum("rbpd,rde->brpe", x, W[heads]) + b[heads][None, :, None, :]
                if len(heads) == n_heads:             # heads are ascending: group.active is sorted
                    out = fixed
                else:
                    out[:, heads] = fixed
            qkv.append(out)
        q, k, v = qkv
        causal = w.causal and pos is _ALL     # a last-position query may see every key
        z = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0 / lw.attn_scale)
        heads_out = torch.einsum("bhpe,hed->hbpd", z, lw.W_O)    # (heads, batch, pos, d_model)
        h0, h1 = self._head0[layer], self._head0[layer] + self.n_heads
        self.work[h0:h1, :, pos] = self.ablated[h0:h1, :, pos] - heads_out
        return resid[:, pos] + heads_out.sum(0) + lw.b_O

    def _mlp(self, layer: int, resid: torch.Tensor, s0: int, pos: slice) -> torch.Tensor:
        """The MLP's output for ``resid`` (the stream at positions ``pos``)."""
        lw = self.w.layers[layer]
        src = self._mlp_src[layer]
        corr = self._correction(self.groups[(layer, "mlp")], src, s0, pos)
        out = lw.mlp(resid if corr is None else resid + corr[0], self.w.act)
        self.work[src, :, pos] = self.ablated[src, :, pos] - out
        return out

    def logits_from(self, layer: int, stage: Stage) -> torch.Tensor:
        """Logits of the current circuit, recomputing only from ``stage`` of block ``layer`` up.

        Exact as long as no edge into a destination below that point is removed, which ACDC's
        visit order guarantees. When the metric reads only the last position, the top block
        computes its queries, outputs and MLP only there.
        """
        n_src, top = self.mask.shape[1], self.n_layers - 1
        last = slice(self.seq_len - 1, None) if self.last_position_only else _ALL
        with torch.no_grad():
            if stage == "out":
                resid, s0 = self.resid_final[:, last], n_src
            elif stage == "mlp":
                resid, s0 = self.resid_mid[layer], self._mlp_src[layer]
                if layer == top:
                    resid = resid[:, last]
            else:
                resid, s0 = self.resid_pre[layer], self._head0[layer]
            for lay in range(layer, self.n_layers) if stage != "out" else ():
                pos = last if lay == top else _ALL
                if lay > layer or stage == "attn":
                    resid = self._attention(lay, resid, s0, pos)
                if not self.w.attn_only:
                    resid = resid + self._mlp(lay, resid, s0, pos)
            corr = self._correction(self.groups[(self.n_layers, "out")], n_src, s0, last)
            if corr is not None:
                resid = resid + corr[0]
            return self._logits(resid)

    def logits_for(self, edge: Edge) -> torch.Tensor:
        """Logits of the current circuit, starting at ``edge``'s destination block."""
        d = edge.dest
        stage: Stage = "out" if d.kind == "out" else ("mlp" if d.kind == "mlp" else "attn")
        return self.logits_from(d.layer, stage)
