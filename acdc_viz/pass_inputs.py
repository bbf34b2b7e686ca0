"""The inputs of a pass's destinations: the stream plus the corrections of their removed edges.

``InputBuilder.inputs`` gives a destination group's inputs in the pass described by a
``PassState``; ``acdc_viz.forward_pass`` runs the blocks on them. The design, and why the
corrections are split into a fixed and a recomputed part, is in ``acdc_viz.patching``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from acdc_viz.removed_edges import ChainEntry, DestinationGroup, GroupKey, RemovedEdges


@dataclass
class Activations:
    """What every pass reads: the clean run's streams, each source's ablated value and its
    difference from the clean output, and the current circuit's keys, values and logits (the
    cache of the causal prefix)."""

    resid_pre: list[torch.Tensor]        # per layer (batch, pos, d)
    resid_mid: list[torch.Tensor]
    resid_final: torch.Tensor
    ablated: torch.Tensor                # (sources, batch, pos, d)
    diff_clean: torch.Tensor             # ablated - clean output, the same shape
    kv_current: list[tuple[torch.Tensor, torch.Tensor]]
    logits_current: torch.Tensor


class LazyOutputs(NamedTuple):
    """Outputs of dependent sources that are computed only when a kept edge reads them."""

    sources: list[int]
    from_pos: int
    compute: Callable[[], torch.Tensor]   # -> (sources, n * batch, positions >= from_pos, d)


class StashedKV(NamedTuple):
    """Keys and values a pass computed for some key/value heads of a layer, kept for ``adopt``."""

    units: slice | torch.Tensor          # the key/value heads' index
    k: torch.Tensor                      # (batch or n * batch, units, pos >= first_pos, d_head)
    v: torch.Tensor
    per_hypothesis: bool


@dataclass
class PassState:
    """What one batched pass evaluates, and what it has computed so far.

    Positions are counted from ``first_pos``. A recomputed source is *shared* when its output is
    the same for every hypothesis (computed at the batch's size) and *dependent* otherwise
    (n_hypotheses * batch).
    """

    n_hypotheses: int                    # hypotheses stacked along the batch
    first_pos: int                       # first position computed (the causal prefix is reused)
    entries: dict[GroupKey, list[ChainEntry]]   # the chain's edges, by destination group
    first_recomputed: int                    # first source recomputed in the pass
    base: torch.Tensor                   # (batch, pos, d): the stream, dependent sources ablated
    work: torch.Tensor                   # (sources >= first_recomputed, batch, pos, d):
                                         #   ablated - output; 0 if dependent
    work_total: torch.Tensor             # (batch, pos, d): the sum of work so far
    stash: dict[int, list[StashedKV]] | None = None   # layer -> computed keys and values
    dep_sources: list[int] = field(default_factory=list)    # dependent sources, in slot order
    dep_slot: dict[int, int] = field(default_factory=dict)
    dep_work: torch.Tensor | None = None  # (slots, n * batch, pos, d): ablated - output
    lazy: list[LazyOutputs] = field(default_factory=list)
    logits: tuple[torch.Tensor, bool] | None = None   # computed logits and whether per hypothesis


@dataclass
class GroupInputs:
    """A group's destination inputs in one pass (see ``InputBuilder.inputs``)."""

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

    def single(self) -> tuple[torch.Tensor, bool]:
        """The input of a one-row group (an MLP or Out), and whether it is per hypothesis."""
        if self.x_dep is not None:
            return self.x_dep[0], True
        if self.x is not None:
            return self.x[0], False
        if self.ablated is not None:
            return self.ablated, False
        if self.plain_dep is not None:
            return self.plain_dep, True
        assert self.plain is not None
        return self.plain, False


class WorkBuffers:
    """Flat buffers reused from pass to pass, viewed in the shape each pass needs."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], keep: int = 0) -> torch.Tensor:
        """The buffer ``name`` viewed as ``shape``; its first ``keep`` rows survive a regrowth."""
        numel = 1
        for size in shape:
            numel *= size
        old = self._buffers.get(name)
        if old is None or old.numel() < numel:
            new = torch.empty(numel, dtype=self.dtype, device=self.device)
            if keep and old is not None:
                row = numel // shape[0]
                new[: keep * row] = old[: keep * row]
            self._buffers[name] = old = new
        return old[:numel].view(shape)


class InputBuilder:
    """Destination inputs of a pass: the stream ``base`` plus each destination's corrections."""

    def __init__(self, edges: RemovedEdges, acts: Activations, buffers: WorkBuffers,
                 batch: int, seq_len: int) -> None:
        self.edges, self.acts, self.buffers = edges, acts, buffers
        self.batch, self.seq_len = batch, seq_len
        self.n_pos = edges.n_pos
        self.index = edges.index
        self._diff_totals: dict[int, torch.Tensor] = {}     # s -> diff_clean[:s].sum(0)

    def contract(self, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum_s mask[r, s, p] * values[s, b, p, d]  ->  (r, b, p, d)."""
        if self.n_pos == 1:
            flat = mask[:, :, 0] @ values.reshape(values.shape[0], -1)
            return flat.view(mask.shape[0], *values.shape[1:])
        s, b, p, d = values.shape           # one product per position
        out = torch.bmm(mask.permute(2, 0, 1), values.permute(2, 0, 1, 3).reshape(p, s, b * d))
        return out.view(p, -1, b, d).permute(1, 2, 0, 3)

    def _removed_sum(self, rows: list[int], source_start: int, values: torch.Tensor,
                     total: torch.Tensor, from_pos: int) -> torch.Tensor:
        """sum over sources s of mask[r, s - source_start, p] * values[s - source_start] for each
        row r, positions >= from_pos: (rows, batch, positions, d). ``total`` is ``values.sum(0)``.

        Each row takes the cheaper side: the sources it removes, or ``total`` minus the sources it
        keeps (in a sparse circuit, a finished row keeps a few). Only the sources that some row of
        a side needs are read.
        """
        sources = range(source_start, source_start + values.shape[0])
        counts = self.edges.removed_count[np.ix_(rows, sources)]
        removes, keeps = counts > 0, counts < self.n_pos
        by_keeping = keeps.sum(1) < removes.sum(1)
        out = values.new_empty(len(rows), *values.shape[1:])
        for side, needs in ((False, removes), (True, keeps)):
            which = [i for i in range(len(rows)) if by_keeping[i] == side]
            if not which:
                continue
            read = np.flatnonzero(needs[which].any(0)).tolist()
            rows_index = self.index(which)
            if not read:
                out[rows_index] = total if side else 0.0
                continue
            mask = self.edges.mask_at([rows[i] for i in which],
                                      [source_start + s for s in read], from_pos)
            part = self.contract(1.0 - mask if side else mask, values[self.index(read)])
            out[rows_index] = total - part if side else part
        return out

    def _diff_total(self, end: int) -> torch.Tensor:
        """The sum of (ablated - clean) over the sources below ``end``."""
        total = self._diff_totals.get(end)
        if total is None:
            total = self._diff_totals[end] = self.acts.diff_clean[:end].sum(0)
        return total

    def _fixed(self, group: DestinationGroup, rows: list[int], fixed_end: int,
               from_pos: int) -> torch.Tensor:
        """Corrections of the group's ``rows`` (its active rows that keep an edge) from the
        sources below ``fixed_end``, which hold their clean outputs in this pass: cached until
        the group's mask changes."""
        key = (fixed_end, group.version, from_pos)
        if group.cache_key != key:
            group.cache = self._removed_sum(rows, 0, self.acts.diff_clean[:fixed_end, :, from_pos:],
                                            self._diff_total(fixed_end)[:, from_pos:], from_pos)
            group.cache_key = key
        assert group.cache is not None
        return group.cache

    def inputs(self, state: PassState, key: GroupKey, source_end: int,
               from_pos: int) -> GroupInputs:
        """The inputs of a group's destinations (sources [0, source_end)) at positions >=
        ``from_pos``.

        With ``base`` the stream whose recomputed sources are shared outputs or, for dependent
        sources, ablated values, a destination's input is

            base + sum over removed sources of (ablated - output)          (shared sources)
                 - sum over kept dependent sources of (ablated - output)   (per hypothesis)
                 + the chain's edges into it, for the hypotheses that remove them.

        Rows without any removed edge read the plain stream, rows without any kept edge the
        stream of ablated values; only rows that keep an edge from a dependent source, or that
        the chain changes, are computed per hypothesis.
        """
        group = self.edges.groups[key]
        entries = state.entries.get(key, [])
        if entries and self.n_pos > 1:
            entries = [e for e in entries if e.position >= from_pos]
        chain_rows = {e.row for e in entries}
        row_count, row_edges = self.edges.row_count, self.edges.row_edges
        full = {r for r in group.active if row_count[r] == row_edges[r]} - chain_rows
        active = sorted({*group.active, *chain_rows} - full)
        first_recomputed, offset = state.first_recomputed, from_pos - state.first_pos
        fixed_end = min(first_recomputed, source_end)
        base = state.base[:, offset:]
        dep_sources = [s for s in state.dep_sources if s < source_end]
        dep = set(chain_rows)
        if dep_sources and active:
            kept = self.edges.removed_count[np.ix_(active, dep_sources)] < self.n_pos
            dep.update(active[i] for i in np.flatnonzero(kept.any(1)))
        inp = GroupInputs(active=active, dep_rows=[r for r in active if r in dep],
                          ablated_rows=full)
        if full:
            inp.ablated = base + self._diff_total(fixed_end)[:, from_pos:]
            if source_end > first_recomputed:
                inp.ablated += state.work_total[:, offset:]
        if len(active) + len(full) < len(group.rows):      # rows that read the plain stream
            if not dep_sources:
                inp.plain = base
            else:
                total = self.dep_values(state, dep_sources)[: len(dep_sources), :, offset:].sum(0)
                per_hypothesis = total.view(state.n_hypotheses, self.batch, *base.shape[1:])
                inp.plain_dep = (base.unsqueeze(0) - per_hypothesis).view(-1, *base.shape[1:])
        if not active:
            return inp

        x = base.expand(len(active), *base.shape).clone()
        fixed_rows = [r for r in group.active if r not in full]
        if fixed_rows:
            fixed = self._fixed(group, fixed_rows, fixed_end, from_pos)
            if len(fixed_rows) == len(active):
                x += fixed
            else:
                x[self.index([active.index(r) for r in fixed_rows])] += fixed
        if source_end > first_recomputed:                  # removed edges from shared sources
            work = state.work[: source_end - first_recomputed, :, offset:]
            x += self._removed_sum(active, first_recomputed, work, state.work_total[:, offset:],
                                   from_pos)
        inp.x = x
        if inp.dep_rows:
            inp.x_dep = self._dependent(state, inp, entries, dep_sources, from_pos)
        return inp

    def _dependent(self, state: PassState, inp: GroupInputs, entries: list[ChainEntry],
                   dep_sources: list[int], from_pos: int) -> torch.Tensor:
        """The inputs of ``inp.dep_rows`` per hypothesis, (dep_rows, n * batch, pos, d): their
        shared part, the chain's edges into them, and their kept edges from dependent sources."""
        x = inp.x
        assert x is not None
        n, first_recomputed = state.n_hypotheses, state.first_recomputed
        offset = from_pos - state.first_pos
        shape = (len(inp.dep_rows), n, *x.shape[1:])
        shared = x[self.index([inp.active.index(r) for r in inp.dep_rows])].unsqueeze(1)
        fixed_entries = [e for e in entries if e.source < first_recomputed]
        if fixed_entries:
            x_dep = self._chain_correction(state, inp.dep_rows, fixed_entries, from_pos)
            x_dep.add_(shared)
        else:
            x_dep = shared.expand(shape).clone()
        if dep_sources:                                    # kept edges from dependent sources
            kept = self.edges.removed_count[np.ix_(inp.dep_rows, dep_sources)] < self.n_pos
            used = [dep_sources[i] for i in np.flatnonzero(kept.any(0))]
            if used:
                slots = [state.dep_slot[s] for s in used]
                keep = 1.0 - self.edges.mask_at(inp.dep_rows, used, from_pos)
                values = self.dep_values(state, used)[self.index(slots)][:, :, offset:]
                x_dep -= self.contract(keep, values).view(shape)
        for entry in entries:                              # chains across groups only
            if entry.source < first_recomputed:
                continue
            target = x_dep[inp.dep_rows.index(entry.row), entry.hypothesis:]
            at_pos = (slice(None) if self.n_pos == 1
                      else slice(entry.position - from_pos, entry.position - from_pos + 1))
            if entry.source in state.dep_slot:
                slot = state.dep_slot[entry.source]
                values = self.dep_values(state, [entry.source])[slot, :, offset:]
                values = values.view(n, self.batch, *x.shape[2:])[entry.hypothesis:]
                target[..., at_pos, :] += values[:, :, at_pos]
            else:
                values = state.work[entry.source - first_recomputed, :, offset:]
                target[..., at_pos, :] += values[:, at_pos]
        return x_dep.view(len(inp.dep_rows), n * self.batch, *x.shape[2:])

    def _chain_correction(self, state: PassState, rows: list[int], entries: list[ChainEntry],
                          from_pos: int) -> torch.Tensor:
        """(rows, n, batch, positions, d): hypothesis j gets (ablated - clean) of the chain's edges
        0..j into each row: one product of cumulative 0/1 coefficients with the sources' values."""
        sources = sorted({e.source for e in entries})
        n_pos = self.seq_len - from_pos if self.n_pos > 1 else 1
        index = torch.tensor([[rows.index(e.row), e.hypothesis, sources.index(e.source),
                               0 if self.n_pos == 1 else e.position - from_pos]
                              for e in entries], dtype=torch.long)
        mask = self.edges.mask
        if mask.is_cuda:
            index = index.pin_memory().to(mask.device, non_blocking=True)
        coef = mask.new_zeros(len(rows), state.n_hypotheses, len(sources), n_pos)
        coef.index_put_(tuple(index.T), coef.new_ones(len(entries)), accumulate=True)
        coef = coef.cumsum(1).flatten(0, 1)
        values = self.acts.diff_clean[self.index(sources)][:, :, from_pos:]
        return self.contract(coef, values).view(len(rows), state.n_hypotheses, *values.shape[1:])

    def dep_values(self, state: PassState, sources: list[int]) -> torch.Tensor:
        """The per-hypothesis ``ablated - output`` buffer, with ``sources`` computed in it."""
        need = len(state.dep_sources)
        if state.dep_work is None or state.dep_work.shape[0] < need:
            old = 0 if state.dep_work is None else state.dep_work.shape[0]
            shape = (max(need, 2 * old, self.edges.n_heads + 1), state.n_hypotheses * self.batch,
                     self.seq_len - state.first_pos, self.acts.diff_clean.shape[-1])
            state.dep_work = self.buffers.get("dep", shape, keep=old)
        wanted = set(sources)
        for item in [it for it in state.lazy if wanted.intersection(it.sources)]:
            state.lazy.remove(item)
            out = item.compute()
            ablated = self.acts.ablated[self.index(item.sources), :, item.from_pos:]
            per_hypothesis = out.view(len(item.sources), state.n_hypotheses, self.batch,
                                      *out.shape[2:])
            work = (ablated.unsqueeze(1) - per_hypothesis).view(out.shape)
            slots = self.index([state.dep_slot[s] for s in item.sources])
            state.dep_work[slots, :, item.from_pos - state.first_pos:] = work
        return state.dep_work
