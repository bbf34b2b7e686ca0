"""Where the seq-graph figure draws each node and each q/k/v port (no plotting here).

The default ``seq`` grid reads like the model runs: ``Embed`` at the bottom, then each block's
attention row and MLP row, ``Out`` at the top; one column per token position (or one column
"all positions" without the position split), and a layer's heads side by side inside a cell.
A head is read through three inputs, so an edge into ``A1.2.k`` must stay distinguishable from
one into ``A1.2.q``: each head gets three small *ports* just below it, q left, k middle, v
right, and edges end on the port they feed.

The networkx layouts (``multipartite``, ``spring``, ``kamada_kawai``, ``spectral``) are computed
from ``CircuitGraph.to_networkx()``. With the position split the graph is one disconnected copy
per position (no edge crosses positions), so the layout of position 0's copy is computed once
and tiled left to right: the picture stays comparable across positions and the cost does not
grow with the prompt length. Every layout is deterministic (seeded) and cached per graph shape.

Coordinates are in abstract units: ``y`` grows upwards, a ``seq`` row is 1 unit high and a
column 1 unit wide. ``Layout.spacing`` is the smallest distance between neighbouring nodes, so
the figure can size markers and ports without knowing the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from acdc_viz.graph import QKV, CircuitGraph, Node

LAYOUTS = ("seq", "multipartite", "spring", "kamada_kawai", "spectral")
"""The layout names ``node_positions`` accepts; ``seq`` is the default."""

SEED = 0
"""The seed of the randomised networkx layouts (spring), so every render is the same."""

CELL_FILL = 0.8
"""The part of a column's width the heads of one cell spread over (the rest is the gutter)."""

PORT_DX = 0.2
"""Horizontal offset of the q and v ports from the head's centre, as a part of ``spacing``."""

PORT_DY = 0.16
"""How far below a head's centre its ports sit in the seq grid, as a part of a row."""

Point = tuple[float, float]
GraphKey = tuple[int, int, bool, "int | None"]


@dataclass(frozen=True)
class Layout:
    """The coordinates of one graph in one layout.

    Attributes:
        name: one of ``LAYOUTS``.
        nodes: ``Node.key`` (``A1.2`` or ``A1.2@5``) to its ``(x, y)``.
        ports: destination key to the point edges into it end at: ``A1.2.q`` (``A1.2.q@5``) for
            the q/k/v ports of each head, and the node's own point for ``MLP{l}`` and ``Out``.
        rows: ``(y, label)`` of each row, bottom to top (seq and multipartite; else empty).
        columns: ``(x, position)`` of each column's centre (``position`` None without the
            split); the figure labels them with the trace's tokens.
        spacing: the smallest distance between two nodes' centres in the same row or cell.
        bounds: ``(x_min, x_max, y_min, y_max)`` of all nodes and ports.
    """

    name: str
    nodes: Mapping[str, Point]
    ports: Mapping[str, Point]
    rows: tuple[tuple[float, str], ...]
    columns: tuple[tuple[float, int | None], ...]
    spacing: float
    bounds: tuple[float, float, float, float]


def graph_key(graph: CircuitGraph) -> GraphKey:
    """What determines a graph's shape completely (``CircuitGraph`` has no ``__eq__``)."""
    return (graph.n_layers, graph.n_heads, bool(graph.attn_only), graph.n_positions)


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is a known name; raise ``ValueError`` listing the names otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)} "
                         f"(the default is 'seq')")
    return layout


def row_of(node: Node, n_layers: int, attn_only: bool) -> int:
    """The node's row in the seq grid: 0 is ``Embed``; per layer attention, then MLP; ``Out`` last."""
    per_layer = 1 if attn_only else 2
    if node.kind == "embed":
        return 0
    if node.kind == "out":
        return 1 + per_layer * n_layers
    return 1 + per_layer * node.layer + (1 if node.kind == "mlp" else 0)


def row_labels(n_layers: int, attn_only: bool) -> list[str]:
    labels = ["Embed"]
    for layer in range(n_layers):
        labels.append(f"attn {layer}")
        if not attn_only:
            labels.append(f"MLP {layer}")
    labels.append("Out")
    return labels


def layout_of(graph: CircuitGraph, layout: str = "seq") -> Layout:
    """The (cached, read-only) ``Layout`` of ``graph``; ``ValueError`` for an unknown name."""
    return _cached_layout(graph_key(graph), check_layout(layout))


def node_positions(graph: CircuitGraph, layout: str = "seq") -> dict[str, Point]:
    """``Node.key`` to ``(x, y)`` for every drawn node of ``graph`` (a fresh dict)."""
    return dict(layout_of(graph, layout).nodes)


def port_positions(graph: CircuitGraph, layout: str = "seq") -> dict[str, Point]:
    """Destination key (``A1.2.q@5``, ``MLP0``, ``Out``) to the point where its edges end."""
    return dict(layout_of(graph, layout).ports)


@lru_cache(maxsize=64)
def _cached_layout(key: GraphKey, name: str) -> Layout:
    n_layers, n_heads, attn_only, n_positions = key
    graph = CircuitGraph(n_layers, n_heads, attn_only=attn_only, n_positions=n_positions)
    if name == "seq":
        base, spacing = _seq_cell(graph)
        rows = tuple((float(i), lab) for i, lab in enumerate(row_labels(n_layers, attn_only)))
        width = 1.0
    else:
        base, spacing = _networkx_cell(graph, name)
        rows = ()
        if name == "multipartite":
            rows = tuple([(0.0, "Embed")] + [(float(i + 1), f"layer {i}") for i in range(n_layers)]
                         + [(float(n_layers + 1), "Out")])
        xs = [p[0] for p in base.values()]
        width = max((max(xs) - min(xs)) / CELL_FILL, 1.0)
        # centre each tile on its column, with the seq grid's relative gutter between tiles
        mid = (max(xs) + min(xs)) / 2
        base = {k: (x - mid, y) for k, (x, y) in base.items()}

    positions: list[int | None] = (
        [None] if n_positions is None else list(range(n_positions))
    )
    nodes: dict[str, Point] = {}
    ports: dict[str, Point] = {}
    # q/k/v ports sit on the lower rim of the head's marker (the figure sizes markers to fit)
    port_dx, port_dy = spacing * PORT_DX, (PORT_DY if name == "seq" else spacing * PORT_DX)
    for col, pos in enumerate(positions):
        x0 = col * width
        for node in graph.nodes:
            if node.position != pos:
                continue
            bx, by = base[node.name]
            x, y = x0 + bx, by
            nodes[node.key] = (x, y)
            if node.kind == "head":
                for i, letter in enumerate(QKV):
                    ports[graph.node_key(f"{node.name}.{letter}", pos)] = (
                        x + (i - 1) * port_dx, y - port_dy)
            elif node.kind in ("mlp", "out"):
                ports[node.key] = (x, y)
    columns = tuple((col * width, pos) for col, pos in enumerate(positions))
    pts = list(nodes.values()) + list(ports.values())
    bounds = (min(p[0] for p in pts), max(p[0] for p in pts),
              min(p[1] for p in pts), max(p[1] for p in pts))
    return Layout(name, MappingProxyType(nodes), MappingProxyType(ports), rows, columns,
                  spacing, bounds)


def _seq_cell(graph: CircuitGraph) -> tuple[dict[str, Point], float]:
    """Coordinates of one column's nodes, by node name, centred on x = 0."""
    spacing = min(CELL_FILL / graph.n_heads, 1.0)
    out: dict[str, Point] = {}
    for node in graph.nodes:
        if node.position not in (None, 0):
            continue
        y = float(row_of(node, graph.n_layers, graph.attn_only))
        x = 0.0 if node.head is None else (node.head - (graph.n_heads - 1) / 2) * spacing
        out[node.name] = (x, y)
    return out, spacing


def _networkx_cell(graph: CircuitGraph, name: str) -> tuple[dict[str, Point], float]:
    """One position's networkx layout, by node name, scaled so rows are about 1 unit apart."""
    import networkx as nx

    if graph.n_positions is not None:  # every position's copy is this same graph
        graph = CircuitGraph(graph.n_layers, graph.n_heads, attn_only=graph.attn_only)
    g = graph.to_networkx()
    simple = nx.Graph(g.to_undirected())  # the layouts want one undirected edge per pair
    if name == "multipartite":
        # one row per layer: a block's heads and its MLP side by side, Embed and Out alone
        pos = nx.multipartite_layout(simple, subset_key="layer", align="horizontal")
        xs = [float(p[0]) for p in pos.values()]
        half = max(max(xs), -min(xs), 1e-9)
        widest = graph.n_heads + (0 if graph.attn_only else 1)
        xy = {k: (float(pos[k][0]) / half * CELL_FILL / 2, float(g.nodes[k]["layer"] + 1))
              for k in sorted(pos)}
        return xy, CELL_FILL / max(widest - 1, 1)
    if name == "spring":
        pos = nx.spring_layout(simple, seed=SEED)
    elif name == "kamada_kawai":
        pos = nx.kamada_kawai_layout(simple)
    else:
        pos = nx.spectral_layout(simple)
    order = sorted(pos)  # sorted, never set order: deterministic whatever networkx returns
    xy = {k: (float(pos[k][0]), float(pos[k][1])) for k in order}
    ys = [p[1] for p in xy.values()]
    xs = [p[0] for p in xy.values()]
    span = max(max(ys) - min(ys), max(xs) - min(xs), 1e-9)
    # a square as tall as the seq grid, so markers and labels keep their size across layouts
    n_rows = 2 + graph.n_layers * (1 if graph.attn_only else 2)
    scale = (n_rows - 1) / span
    y_min = min(ys)
    xy = {k: (x * scale, (y - y_min) * scale) for k, (x, y) in xy.items()}
    return xy, _min_distance(list(xy.values()), default=1.0)


def _min_distance(points: list[Point], default: float) -> float:
    """The smallest distance between distinct points, ignoring exact overlaps."""
    import numpy as np

    if len(points) < 2:
        return default
    a = np.asarray(points, dtype=float)
    d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    d = d[d > 1e-9]
    # a spectral layout can stack nodes almost exactly; don't let that shrink everything
    return float(max(np.percentile(d, 1) if d.size else default, 1e-3)) if d.size else default
