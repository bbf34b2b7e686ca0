"""Which edges of the circuit are removed: the bookkeeping behind ``CircuitRunner``.

The removed edges are 0/1 masks ``mask[dest_row, source, position]``, one row per destination
in forward order: per layer 3 * n_heads q/k/v rows (letter-major), then the MLP row; Out last.
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

    def __init__(self, graph: CircuitGraph, n_heads: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        """An empty circuit: no edge removed, one mask row per destination."""
        self.n_heads = n_heads
        self.n_layers = graph.n_layers
        self.n_pos = 1 if graph.n_positions is None else graph.n_positions
        self.row_stride = 3 * n_heads + 1
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
                list(range(first, first + 3 * n_heads)), [])
            self.groups[(layer, "mlp")] = DestinationGroup([first + 3 * n_heads], [])
        self.groups[(self.n_layers, "out")] = DestinationGroup([n_rows - 1], [])

    def row_of(self, edge: Edge) -> int:
        """The mask row of ``edge``'s destination."""
        dest = edge.dest
        if dest.kind == "out":
            return self.mask.shape[0] - 1
        first = dest.layer * self.row_stride
        if dest.kind == "mlp":
            return first + 3 * self.n_heads
        assert dest.head is not None
        return first + QKV.index(dest.kind) * self.n_heads + dest.head

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
