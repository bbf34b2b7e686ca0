"""Where the seq-graph figure draws each node and each q/k/v port (no plotting here).

The default ``seq`` grid reads like the model runs: ``Embed`` at the bottom, then each block's
attention row and MLP row, ``Out`` at the top; one column per token position (or one column
"all positions" without the position split), and a layer's heads side by side inside a cell.
A head is read through three inputs, so an edge into ``A1.2.k`` must stay distinguishable from
one into ``A1.2.q``: each head gets three small *ports* just below it, q left, k middle, v
right, and edges end on the port they feed. With grouped- or multi-query attention a head keeps
only its q port: each KV group's k and v ports are drawn once, below the middle of the heads
that share them.

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

from acdc_viz.graph import QKV, CircuitGraph, GraphShape, Node, node_key

LAYOUTS = ("seq", "multipartite", "spring", "kamada_kawai", "spectral")
"""The layout names ``node_positions`` accepts; ``seq`` is the default."""

SEED = 0
"""The seed of the randomised networkx layouts (spring), so every render is the same."""

CELL_FILL = 0.8
"""The part of a column's width the heads of one cell spread over (the rest is the gutter)."""

MAX_WIDTH_PX = 1500.0
"""The plotting area's width (px) the layout aims to fit in; a long prompt shrinks columns."""

Point = tuple[float, float]


@dataclass(frozen=True)
class Layout:
    """The coordinates of one graph in one layout, and the canvas they are meant for.

    Attributes:
        name: one of ``LAYOUTS``.
        nodes: ``Node.key`` (``A1.2`` or ``A1.2@5``) to its ``(x, y)``.
        ports: destination key to the point where edges into it end: ``A1.2.q`` (``A1.2.q@5``)
            for a head's q/k/v ports, on the lower rim of its marker (q left, k below, v
            right); with grouped-query attention a KV group's ``A1.kv0.k`` and ``A1.kv0.v``
            once, below the middle of its heads; the node's own point for ``MLP{l}`` and
            ``Out``.
        rows: ``(y, label)`` of each row, bottom to top (seq and multipartite; else empty).
        columns: ``(x, position)`` of each column's centre (``position`` None without the
            split); the figure labels them with the trace's tokens.
        spacing: the distance between neighbouring heads (seq, multipartite), or a small
            percentile of the distances between nodes (the others).
        x_range, y_range: the axis ranges to show.
        width_px, height_px: the plotting area's size those ranges are meant for.
        node_px: the marker diameter (px) that keeps neighbours apart and the ports on the rim.
    """

    name: str
    nodes: Mapping[str, Point]
    ports: Mapping[str, Point]
    rows: tuple[tuple[float, str], ...]
    columns: tuple[tuple[float, int | None], ...]
    spacing: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width_px: float
    height_px: float
    node_px: float


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is a known name; raise ``ValueError`` listing the names otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)} "
                         f"(the default is 'seq')")
    return layout


def row_of(node: Node, n_layers: int, attn_only: bool, parallel: bool = False) -> int:
    """The node's row in the seq grid: 0 is ``Embed``, per layer attention, MLP; ``Out`` last.
    A parallel block's MLP reads the block's input, as its heads do: it shares their row."""
    per_layer = 1 if attn_only or parallel else 2
    if node.kind == "embed":
        return 0
    if node.kind == "out":
        return 1 + per_layer * n_layers
    return 1 + per_layer * node.layer + (1 if node.kind == "mlp" and per_layer == 2 else 0)


def row_labels(n_layers: int, attn_only: bool, parallel: bool = False) -> list[str]:
    """The seq grid's row labels, bottom to top (``row_of``'s rows)."""
    labels = ["Embed"]
    for layer in range(n_layers):
        if parallel and not attn_only:
            labels.append(f"attn + MLP {layer}")
            continue
        labels.append(f"attn {layer}")
        if not attn_only:
            labels.append(f"MLP {layer}")
    labels.append("Out")
    return labels


def layout_of(graph: CircuitGraph, layout: str = "seq") -> Layout:
    """The (cached, read-only) ``Layout`` of ``graph``; ``ValueError`` for an unknown name."""
    return _cached_layout(graph.shape, check_layout(layout))


def node_positions(graph: CircuitGraph, layout: str = "seq") -> dict[str, Point]:
    """``Node.key`` to ``(x, y)`` for every drawn node of ``graph`` (a fresh dict)."""
    return dict(layout_of(graph, layout).nodes)


def port_positions(graph: CircuitGraph, layout: str = "seq") -> dict[str, Point]:
    """Destination key (``A1.2.q@5``, ``MLP0``, ``Out``) to the point where its edges end."""
    return dict(layout_of(graph, layout).ports)


@lru_cache(maxsize=64)
def _cached_layout(shape: GraphShape, name: str) -> Layout:
    """The layout of the graph of ``shape``: one column's cell, tiled once per position."""
    graph = CircuitGraph.from_shape(shape)
    n_layers, n_heads, attn_only, n_positions = shape[:4]
    n_cols = 1 if n_positions is None else n_positions
    if name == "seq":
        base, spacing = _seq_cell(graph)
        rows = tuple((float(i), lab)
                     for i, lab in enumerate(row_labels(n_layers, attn_only, graph.parallel)))
        col_width = 1.0
    else:
        base, spacing = _networkx_cell(graph.n_layers, graph.n_heads, graph.attn_only,
                                       graph.sandwich, name)
        rows = ()
        if name == "multipartite":
            rows = tuple([(0.0, "Embed")] + [(float(i + 1), f"layer {i}") for i in range(n_layers)]
                         + [(float(n_layers + 1), "Out")])
        xs = [p[0] for p in base.values()]
        col_width = 1.0 if name == "multipartite" else max((max(xs) - min(xs)) / CELL_FILL, 1.0)
        mid = (max(xs) + min(xs)) / 2  # centre each tile on its column
        base = {k: (x - mid, y) for k, (x, y) in base.items()}

    ys = [p[1] for p in base.values()]
    pad_y = 0.5 if rows else max(spacing, 0.05 * (max(ys) - min(ys)))
    x_range = (-col_width / 2, (n_cols - 0.5) * col_width)
    y_range = (min(ys) - pad_y, max(ys) + pad_y)
    width_px, height_px = _canvas(name, n_cols, n_heads, len(rows), spacing, col_width,
                                  y_range[1] - y_range[0])
    px_x = width_px / (x_range[1] - x_range[0])
    px_y = height_px / (y_range[1] - y_range[0])
    if rows:
        node_px = min(spacing * px_x * 0.55, 0.36 * px_y)
    else:
        node_px = spacing * min(px_x, px_y) * 0.55
    node_px = float(min(max(node_px, 6.0), 22.0))
    # ports just outside the lower rim: q at 7:30, k at 6:00, v at 4:30 on a clock face
    r = node_px / 2 + 1.0
    rim = {"q": (-0.72 * r, -0.72 * r), "k": (0.0, -r), "v": (0.72 * r, -0.72 * r)}

    positions: list[int | None] = [None] if n_positions is None else list(range(n_positions))
    nodes: dict[str, Point] = {}
    ports: dict[str, Point] = {}
    own_letters = ("q",) if graph.grouped else QKV
    for col, pos in enumerate(positions):
        x0 = col * col_width
        for node in graph.nodes:
            if node.position != pos:
                continue
            bx, by = base[node.name]
            x, y = x0 + bx, by
            nodes[node.key] = (x, y)
            if node.kind == "head":
                for letter in own_letters:
                    dx, dy = rim[letter]
                    port = node_key(f"{node.name}.{letter}", pos)
                    ports[port] = (x + dx / px_x, y + dy / px_y)
            elif node.kind in ("mlp", "out"):
                ports[node.key] = (x, y)
        if graph.grouped:
            ports.update(_kv_ports(graph, nodes, pos, r / px_x, r / px_y))
    columns = tuple((col * col_width, pos) for col, pos in enumerate(positions))
    return Layout(name, MappingProxyType(nodes), MappingProxyType(ports), rows, columns,
                  spacing, x_range, y_range, width_px, height_px, node_px)


def _kv_ports(graph: CircuitGraph, nodes: Mapping[str, Point], pos: int | None, dx: float,
              dy: float) -> dict[str, Point]:
    """The k and v ports of each KV group (grouped-query attention), drawn once: below the
    middle of the heads that share them, k left and v right (``dx``, ``dy``: a marker's radius
    in data units)."""
    ports: dict[str, Point] = {}
    for dest in graph.destinations:
        if dest.head is not None or dest.group is None:
            continue
        points = [nodes[node_key(f"A{dest.layer}.{h}", pos)] for h in dest.heads]
        x = sum(p[0] for p in points) / len(points)
        y = min(p[1] for p in points)
        side = -0.5 if dest.kind == "k" else 0.5
        ports[node_key(dest.name, pos)] = (x + side * dx, y - 1.15 * dy)
    return ports


def _canvas(name: str, n_cols: int, n_heads: int, n_rows: int, spacing: float, col_width: float,
            y_span: float) -> tuple[float, float]:
    """The plotting area (px): about 36 px per head, rows 34-90 px, at most MAX_WIDTH_PX wide."""
    if n_rows:  # seq, multipartite: columns of side-by-side heads, one row per layer part
        col_px = min(max(n_heads * 40.0, 520.0 if n_cols == 1 else 150.0), 600.0)
        if n_cols * col_px > MAX_WIDTH_PX:
            col_px = max(MAX_WIDTH_PX / n_cols, 36.0)
        row_px = min(max(620.0 / n_rows, 34.0), 90.0)
        return n_cols * col_px, n_rows * row_px
    col_px = min(600.0, max(MAX_WIDTH_PX / n_cols, 200.0))
    return n_cols * col_px, min(max(col_px * y_span / col_width, 300.0), 900.0)


def _seq_cell(graph: CircuitGraph) -> tuple[dict[str, Point], float]:
    """Coordinates of one column's nodes, by node name, centred on x = 0.

    The heads sit side by side; the MLPs get their own lane just right of the heads, and
    ``Embed`` and ``Out`` sit in the middle of the heads, in a gap between two of them. This
    keeps the edges that skip many rows straight: ``Embed->Out`` runs up the middle between
    heads, and ``MLP{i}->MLP{j}`` up the MLP lane, instead of every one of them bending
    around nodes stacked on one centre line.
    """
    n_slots = graph.n_heads + (0 if graph.attn_only else 1)
    spacing = min(CELL_FILL / n_slots, 0.4)
    slot_x = [(i - (n_slots - 1) / 2) * spacing for i in range(n_slots)]
    heads_centre = (slot_x[0] + slot_x[graph.n_heads - 1]) / 2
    spine = heads_centre + (spacing / 2 if graph.n_heads % 2 else 0.0)
    mlp_x = slot_x[-1]
    out: dict[str, Point] = {}
    for node in graph.nodes:
        if node.position not in (None, 0):
            continue
        y = float(row_of(node, graph.n_layers, graph.attn_only, graph.parallel))
        if node.kind == "head":
            assert node.head is not None
            x = slot_x[node.head]
        elif node.kind == "attn":          # sandwich norms: half a row above the heads it sums
            x, y = heads_centre, y + 0.5
        else:
            x = mlp_x if node.kind == "mlp" else spine
        out[node.name] = (x, y)
    return out, spacing


@lru_cache(maxsize=32)
def _networkx_cell(n_layers: int, n_heads: int, attn_only: bool, sandwich: bool,
                   name: str) -> tuple[dict[str, Point], float]:
    """One position's networkx layout, by node name (every position's copy is the same graph)."""
    import networkx as nx

    graph = CircuitGraph(n_layers, n_heads, attn_only=attn_only, sandwich=sandwich)
    g = graph.to_networkx()
    simple = nx.Graph()  # the layouts want one undirected edge per pair; keep the node order
    simple.add_nodes_from(g.nodes(data=True))
    simple.add_edges_from(g.to_undirected().edges())
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
