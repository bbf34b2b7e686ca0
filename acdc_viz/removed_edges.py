"""Which edges of the circuit are removed: the bookkeeping behind ``CircuitRunner``.

The removed edges are 0/1 masks ``mask[dest_row, source, position]``, one row per destination
in forward order: per layer the q/k/v rows, letter-major (n_heads q rows, then n_kv_heads k rows
and n_kv_heads v rows: one per KV group with grouped-query attention, else one per head), then
the MLP row; Out last.
Counts of removed edges are kept on the host too, so that a pass can choose what to compute
without reading the mask back from the device (a sync). Destinations are corrected in groups
(one layer's q/k/v inputs, one MLP input, Out); see ``acdc_viz.patching`` for the design.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from acdc_viz.graph import QKV, CircuitGraph, Edge

GroupKey = tuple[int, str]
"""A destination group: ``(layer, "qkv")``, ``(layer, "mlp")`` or ``(n_layers, "out")``."""


class ChainEntry(NamedTuple):
    """One edge of a chain of hypotheses, as a pass reads it."""

    hypothesis: int     # its place in the chain: hypotheses from this one on remove it
    row: int            # its destination's mask row
    source: int         # its source's index
    position: int       # its position (0 without positions)


@dataclass
class DestinationGroup:
    """Destinations corrected together: one layer's q/k/v inputs, one MLP input, or Out."""

    rows: list[int]            # mask rows that belong to the group
    active: list[int]          # rows with at least one removed edge, ascending
    version: int = 0           # bumped whenever a row's mask changes
    cache_key: tuple[int, int, int] | None = None
    cache: torch.Tensor | None = None


class DeviceIndex:
    """Indices for lists of rows or sources: a slice when they are a contiguous range, else a
    cached device tensor (indexing with a Python list would copy it to the device, a sync, on
    every use)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, items: list[int]) -> slice | torch.Tensor:
        if items and items[-1] - items[0] == len(items) - 1 and items == sorted(items):
            return slice(items[0], items[-1] + 1)
        key = tuple(items)
        index = self._cache.get(key)
        if index is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            index = torch.tensor(key, dtype=torch.long)
            if self.device.type == "cuda":
                index = index.pin_memory().to(self.device, non_blocking=True)
            self._cache[key] = index
        return index


class RemovedEdges:
    """The removed edges of one circuit: masks on the device, counts on the host, and groups."""

    def __init__(self, graph: CircuitGraph, dtype: torch.dtype, device: torch.device) -> None:
        """An empty circuit: no edge removed, one mask row per destination."""
        self.n_heads = n_heads = graph.n_heads
        self.n_kv_heads = graph.n_kv_heads
        self.n_layers = graph.n_layers
        self.n_pos = 1 if graph.n_positions is None else graph.n_positions
        self.n_qkv_rows = n_heads + 2 * self.n_kv_heads
        self.row_stride = self.n_qkv_rows + 1
        n_rows = self.n_layers * self.row_stride + 1
        self.mask = torch.zeros(n_rows, len(graph.sources), self.n_pos, dtype=dtype,
                                device=device)
        self.index = DeviceIndex(self.mask.device)
        self.row_count = [0] * n_rows          # removed edges per row, kept on the host (no syncs)
        self.removed_count = np.zeros((n_rows, len(graph.sources)), dtype=np.int32)  # per source
        self.removed: set[tuple[int, int, int]] = set()      # (row, source, position)
        self.row_edges = [0] * n_rows          # edges into each row
        for edge in graph.edges:
            self.row_edges[self.row_of(edge)] += 1
        self.groups: dict[GroupKey, DestinationGroup] = {}
        for layer in range(self.n_layers):
            first = layer * self.row_stride
            self.groups[(layer, "qkv")] = DestinationGroup(
                list(range(first, first + self.n_qkv_rows)), [])
            self.groups[(layer, "mlp")] = DestinationGroup([first + self.n_qkv_rows], [])
        self.groups[(self.n_layers, "out")] = DestinationGroup([n_rows - 1], [])

    def _first_row(self, layer: int, letter: str) -> int:
        return layer * self.row_stride + (0 if letter == "q" else self.n_heads if letter == "k"
                                          else self.n_heads + self.n_kv_heads)

    def letter_rows(self, layer: int, letter: str) -> list[int]:
        """The mask rows of a layer's q inputs (one per head), or of its k or v inputs (one per
        key/value head), in head or KV group order."""
        first = self._first_row(layer, letter)
        return list(range(first, first + (self.n_heads if letter == "q" else self.n_kv_heads)))

    def row_of(self, edge: Edge) -> int:
        """The mask row of ``edge``'s destination."""
        dest = edge.dest
        if dest.kind == "out":
            return self.mask.shape[0] - 1
        if dest.kind == "mlp":
            return dest.layer * self.row_stride + self.n_qkv_rows
        unit = dest.group if dest.head is None else dest.head      # a KV group's k/v, or a head
        assert unit is not None
        return self._first_row(dest.layer, dest.kind) + unit

    @staticmethod
    def group_key(edge: Edge) -> GroupKey:
        dest = edge.dest
        return (dest.layer, "qkv" if dest.kind in QKV else dest.kind)

    def set(self, edge: Edge, removed: bool) -> None:
        """Remove (or restore) one edge: its mask entry, the counts, and its group's version."""
        row, pos = self.row_of(edge), 0 if edge.position is None else edge.position
        key = (row, edge.src.index, pos)
        if (key in self.removed) == removed:
            return
        (self.removed.add if removed else self.removed.remove)(key)
        self.mask[key] = 1.0 if removed else 0.0
        self.row_count[row] += 1 if removed else -1
        self.removed_count[row, edge.src.index] += 1 if removed else -1
        group = self.groups[self.group_key(edge)]
        group.version += 1
        active = self.row_count[row] > 0
        if active and row not in group.active:
            group.active = sorted([*group.active, row])
        elif not active and row in group.active:
            group.active = [r for r in group.active if r != row]

    def chain_entries(self, edges: Sequence[Edge]) -> dict[GroupKey, list[ChainEntry]]:
        """The edges of a chain of hypotheses, by destination group."""
        entries: dict[GroupKey, list[ChainEntry]] = {}
        for hypothesis, edge in enumerate(edges):
            entries.setdefault(self.group_key(edge), []).append(ChainEntry(
                hypothesis, self.row_of(edge), edge.src.index,
                0 if edge.position is None else edge.position))
        return entries

    def mask_at(self, rows: list[int], sources: slice | list[int], from_pos: int) -> torch.Tensor:
        """mask[rows][:, sources] at the positions >= from_pos (all of them without positions)."""
        mask = self.mask[self.index(rows)]
        mask = mask[:, sources] if isinstance(sources, slice) else mask[:, self.index(sources)]
        return mask[..., from_pos:] if self.n_pos > 1 else mask
