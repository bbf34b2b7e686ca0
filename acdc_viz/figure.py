"""The seq-graph figure: a Trace drawn at any step, updated in place as a run goes on.

The figure holds a fixed set of traces (``TRACE_NAMES``), whatever the graph's size: edges are
grouped by state (not yet tested, kept, under test, removed) and, for kept edges, by the sign
of their effect and a width class, each group one line trace of None-separated curves. A run
of 30,000 edges is a dozen SVG paths, not 30,000, and a step changes the data of those traces
inside one ``batch_update`` instead of rebuilding anything.

What each step means (``step`` is an index into ``trace.steps``):

- the figure shows the circuit *after* step ``step``: edges removed by steps ``0..step`` are
  removed, every other edge is kept (untested edges included, as ACDC starts from the full
  graph);
- the edge *under test* is edge ``step``, the one that step tested, drawn highlighted whatever
  was decided (its hover says the decision);
- ``step=-1`` is the full graph before any test; ``None`` is the last recorded step.

Width grows with |Δmetric| in three classes measured in multiples of tau (below 10 tau, below
100 tau, above), so an edge keeps its width as the run goes on. Colours are from the
Okabe-Ito palette, which stays distinguishable under the common colour-vision deficiencies:
vermillion for kept edges whose removal raises the metric (Δ > 0), blue for Δ < 0.
"""

from __future__ import annotations

import html
import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import plotly.graph_objects as go

from acdc_viz.graph import CircuitGraph, GraphShape, node_key
from acdc_viz.layout import Layout, check_layout, layout_of
from acdc_viz.trace import Trace

# Okabe & Ito (2008), "Color Universal Design".
VERMILLION = "#D55E00"
BLUE = "#0072B2"
SKY_BLUE = "#56B4E9"
BLUISH_GREEN = "#009E73"
YELLOW = "#F0E442"
ORANGE = "#E69F00"
REDDISH_PURPLE = "#CC79A7"
BLACK = "#000000"
GREY = "#8C8C8C"
LIGHT_GREY = "#C8C8C8"

WIDTHS = (1.2, 2.6, 4.5)
"""Line widths (px) of kept edges with |Δ| < 10 tau, < 100 tau, and above."""

WIDTH_STEPS = (10.0, 100.0)
"""The class boundaries of ``WIDTHS``, in multiples of tau."""

CURVE_POINTS = 9
"""Points per drawn edge (a quadratic curve), plus one NaN that separates it from the next."""

TRACE_IDS = (
    "removed",
    "untested",
    "kept+small", "kept+medium", "kept+large",
    "kept-small", "kept-medium", "kept-large",
    "under-test",
    "paths",
    "hover",
    "nodes",
)
"""The figure's traces, bottom to top: ``fig.data[i].uid`` is ``TRACE_IDS[i]``.

``hover`` holds the q/k/v port markers and one invisible marker at the middle of each drawn
edge (its ``customdata`` is the edge or port name); ``nodes`` holds one marker per node, with
the node key (``A1.2@5``) in ``customdata``: what a click handler passes to ``paths_through``.
"""

_LABELS = {
    "removed": "removed", "untested": "not yet tested", "under-test": "under test",
    "paths": "selected paths", "hover": "edges and ports", "nodes": "nodes",
    **{f"kept{s}{c}": f"kept, Δ {'>' if s == '+' else '<'} 0 (width: |Δ|)"
       for s in "+-" for c in ("small", "medium", "large")},
}

_KEPT = {("+", 0): 2, ("+", 1): 3, ("+", 2): 4, ("-", 0): 5, ("-", 1): 6, ("-", 2): 7}
_REMOVED, _UNTESTED, _UNDER_TEST, _PATHS, _HOVER, _NODES = 0, 1, 8, 9, 10, 11
_EDGE_TRACES = (_REMOVED, _UNTESTED, *_KEPT.values(), _UNDER_TEST)
_NODE_FILL = {"embed": "#3A3A3A", "out": "#3A3A3A", "head": SKY_BLUE, "attn": SKY_BLUE,
              "mlp": ORANGE}
_NODE_SYMBOL = {"embed": "diamond", "out": "diamond", "head": "circle", "attn": "hexagon",
                "mlp": "square"}
_KIND_TEXT = {"embed": "embedding (residual stream at the start)", "out": "output (final "
              "residual stream)", "head": "attention head", "mlp": "MLP",
              "attn": "the layer's attention output, summed over its heads and normed (sandwich "
                      "norm): the layer's one attention source"}
_PORT_TEXT = {"q": "query", "k": "key", "v": "value"}
_META_KEY = "acdc_viz"

AnyFigure = go.Figure | go.FigureWidget


# -- the state of every edge after a step --------------------------------------------------


@dataclass(frozen=True)
class StepState:
    """Every edge's state after one step, computed from the trace alone.

    Arrays are indexed like ``trace.graph.edges`` (the visit order).

    Attributes:
        step: the step shown (-1: before any step).
        tested: the edge was tested in steps ``0..step``.
        removed: the edge was removed in steps ``0..step``.
        delta: the Δmetric of the edge's test (NaN if not tested yet).
        under_test: the index of the edge tested at ``step`` (None for -1).
    """

    step: int
    tested: np.ndarray
    removed: np.ndarray
    delta: np.ndarray
    under_test: int | None

    @property
    def kept(self) -> np.ndarray:
        return ~self.removed

    def state_of(self, index: int) -> str:
        """``"under test"``, ``"removed"``, ``"kept"`` or ``"untested"``."""
        if index == self.under_test:
            return "under test"
        if self.removed[index]:
            return "removed"
        return "kept" if self.tested[index] else "untested"


def resolve_step(trace: Trace, step: int | None) -> int:
    """``step`` checked against the trace; None becomes the last recorded step (-1 if none)."""
    if step is None:
        return trace.last_step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__} {step!r}")
    step = int(step)
    trace.check_step(step)  # IndexError that names the valid range
    return step


def step_state(trace: Trace, step: int | None = None) -> StepState:
    """The state of every edge after ``step`` (see the module docstring)."""
    step = resolve_step(trace, step)
    n = trace.n_edges
    done = trace.steps[: step + 1]
    tested = np.zeros(n, dtype=bool)
    tested[: len(done)] = True  # step i tests edge i
    removed = np.zeros(n, dtype=bool)
    removed[: len(done)] = np.fromiter((s.removed for s in done), dtype=bool, count=len(done))
    delta = np.full(n, np.nan)
    delta[: len(done)] = np.fromiter((s.delta for s in done), dtype=float, count=len(done))
    return StepState(step, tested, removed, delta, None if step < 0 else step)


# -- paths through a node ------------------------------------------------------------------


def paths_through(trace: Trace, step: int | None, node_key: str) -> set[str]:
    """The kept edges on the node's paths to ``Out`` and from ``Embed``, after ``step``.

    An edge counts if it lies on some path of kept edges from ``node_key`` to ``Out``, or from
    ``Embed`` to ``node_key``. For ``Out`` (or ``Embed``) that is the whole connected circuit.
    ``node_key`` is a ``Node.key``: ``A1.2``, or ``A1.2@5`` with the position split.

    With the position split, attention is the one way information moves between positions:
    an edge into a head's key or value input at position p reaches that head's output at
    every position that attends to p, which is p and later for a causal model (the default)
    and every position when the trace's settings say ``"causal": false`` (at the top level
    or in ``settings["model"]``).
    """
    geo = _geometry(trace.graph.shape, "seq")
    node = geo.node_index.get(node_key)
    if node is None:
        raise KeyError(f"no node {node_key!r} in this graph; node keys look like "
                       f"{geo.node_keys[min(1, len(geo.node_keys) - 1)]!r} (see Node.key)")
    state = step_state(trace, step)
    kept = np.flatnonzero(state.kept)
    links = _port_links(trace.graph.shape, _causal(trace))
    n_vertices = links.n_vertices
    # kept edges run from a source node to a destination vertex (a q/k/v port, or the node)
    src, dst = geo.src[kept], links.edge_port[kept]
    a = np.concatenate([src, links.link_from])
    b = np.concatenate([dst, links.link_to])

    def reach(starts: list[int], u: np.ndarray, v: np.ndarray) -> np.ndarray:
        order = np.argsort(u, kind="stable")
        u, v = u[order], v[order]
        bounds = np.searchsorted(u, np.arange(n_vertices + 1))
        seen = np.zeros(n_vertices, dtype=bool)
        seen[starts] = True
        queue = deque(starts)
        while queue:
            x = queue.popleft()
            for y in v[bounds[x]:bounds[x + 1]].tolist():
                if not seen[y]:
                    seen[y] = True
                    queue.append(y)
        return seen

    out_nodes = [i for i, k in enumerate(geo.node_keys) if k.split("@")[0] == "Out"]
    embed_nodes = [i for i, k in enumerate(geo.node_keys) if k.split("@")[0] == "Embed"]
    from_node = reach([node], a, b)
    to_node = reach([node], b, a)
    to_out = reach(out_nodes, b, a)
    from_embed = reach(embed_nodes, a, b)
    on_path = (from_node[src] & to_out[dst]) | (from_embed[src] & to_node[dst])
    names = geo.edge_names
    return {names[i] for i in kept[on_path].tolist()}


def _causal(trace: Trace) -> bool:
    s = trace.settings
    model = s.get("model")
    model_causal = model.get("causal") if isinstance(model, dict) else None
    return not (s.get("causal") is False or model_causal is False)


@dataclass(frozen=True)
class _PortLinks:
    """The reachability graph's extra vertices (q/k/v ports) and fixed links out of them."""

    n_vertices: int
    edge_port: np.ndarray  # each edge's destination vertex
    link_from: np.ndarray  # port vertex -> the head outputs it influences
    link_to: np.ndarray


@lru_cache(maxsize=8)
def _port_links(shape: GraphShape, causal: bool) -> _PortLinks:
    """Each q/k/v port as a vertex, linked to the head outputs it reaches (causally or not)."""
    graph = CircuitGraph.from_shape(shape)
    node_index = {n.key: i for i, n in enumerate(graph.nodes)}
    ports: dict[str, int] = {}
    link_from: list[int] = []
    link_to: list[int] = []
    split = [] if graph.n_positions is None else list(range(graph.n_positions))
    positions: list[int | None] = [None] if graph.n_positions is None else list(split)
    for dest in graph.destinations:
        if dest.kind not in ("q", "k", "v"):
            continue
        for p in positions:
            vid = len(node_index) + len(ports)
            ports[node_key(dest.name, p)] = vid
            targets: list[int | None]
            if p is None or dest.kind == "q":
                targets = [p]
            else:
                targets = [t for t in split if t >= p or not causal]
            for t in targets:
                for node in graph.reading_nodes(dest):
                    link_from.append(vid)
                    link_to.append(node_index[node_key(node, t)])
    for head, output in graph.head_links():          # sandwich norms: a head feeds its layer
        link_from.append(node_index[head])
        link_to.append(node_index[output])
    edge_port = np.fromiter(
        (ports.get(node_key(e.dest.name, e.position),
                   node_index.get(node_key(e.dest.node, e.position), -1))
         for e in graph.edges), dtype=np.int64, count=len(graph.edges))
    return _PortLinks(len(node_index) + len(ports), edge_port,
                      np.array(link_from, dtype=np.int64), np.array(link_to, dtype=np.int64))


# -- geometry, cached per graph shape and layout -------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    layout: Layout
    edge_names: tuple[str, ...]
    edge_x: np.ndarray  # (E, CURVE_POINTS + 1), NaN in the last column
    edge_y: np.ndarray
    mid_x: np.ndarray
    mid_y: np.ndarray
    src: np.ndarray  # node index of each edge's source
    dst_edge: np.ndarray  # (edge, node that reads it) pairs: an edge into a KV group's k or v
    dst_node: np.ndarray  # is read by each head of the group, any other edge by one node
    node_keys: tuple[str, ...]
    node_index: dict[str, int]
    node_x: np.ndarray
    node_y: np.ndarray
    node_kind: tuple[str, ...]
    node_static_hover: tuple[str, ...]
    port_names: tuple[str, ...]
    port_text: tuple[str, ...]
    head_links: str  # an SVG path of the fixed head -> layer output links (sandwich norms)
    port_x: np.ndarray
    port_y: np.ndarray


@lru_cache(maxsize=16)
def _geometry(shape: GraphShape, layout_name: str) -> _Geometry:
    """Every edge's curve and every node's point in one layout, as read-only arrays."""
    graph = CircuitGraph.from_shape(shape)
    lay = layout_of(graph, layout_name)
    node_keys = tuple(n.key for n in graph.nodes)
    node_index = {k: i for i, k in enumerate(node_keys)}
    edges = graph.edges
    src = np.fromiter((node_index[node_key(e.src.name, e.position)] for e in edges),
                      dtype=np.int64, count=len(edges))
    pairs = [(i, node_index[node_key(node, e.position)])
             for i, e in enumerate(edges) for node in graph.reading_nodes(e.dest)]
    dst_edge, dst_node = (np.array(column, dtype=np.int64)
                          for column in (zip(*pairs, strict=True) if pairs else ((), ())))
    p0 = np.array([lay.nodes[k] for k in node_keys], dtype=float).reshape(-1, 2)
    end = np.array([lay.ports[node_key(e.dest.name, e.position)] for e in edges],
                   dtype=float).reshape(-1, 2)
    start = p0[src] if len(edges) else np.zeros((0, 2))
    ex, ey = _curves(start, end, lay, graph)
    mid_x, mid_y = ex[:, CURVE_POINTS // 2], ey[:, CURVE_POINTS // 2]
    static_hover = tuple(_node_static_hover(n) for n in graph.nodes)
    port_names = tuple(k for k in lay.ports if k.split("@")[0].rsplit(".", 1)[-1] in _PORT_TEXT)
    ports = np.array([lay.ports[k] for k in port_names], dtype=float).reshape(-1, 2)
    for arr in (ex, ey, mid_x, mid_y, src, dst_edge, dst_node, p0, ports):
        arr.setflags(write=False)
    return _Geometry(lay, tuple(e.name for e in edges), ex, ey, mid_x, mid_y, src, dst_edge,
                     dst_node, node_keys, node_index, p0[:, 0], p0[:, 1],
                     tuple(n.kind for n in graph.nodes), static_hover, port_names,
                     _port_texts(graph, port_names),
                     " ".join(f"M {lay.nodes[a][0]:.6g},{lay.nodes[a][1]:.6g} "
                              f"L {lay.nodes[b][0]:.6g},{lay.nodes[b][1]:.6g}"
                              for a, b in graph.head_links()),
                     ports[:, 0], ports[:, 1])


def _port_texts(graph: CircuitGraph, port_names: tuple[str, ...]) -> tuple[str, ...]:
    """Each port's hover text: which input of which head (or of which KV group's heads)."""
    dests = {d.name: d for d in graph.destinations}
    texts = []
    for port in port_names:
        dest = dests[port.split("@")[0]]
        readers = ", ".join(graph.reading_nodes(dest))
        owner = (dest.node if dest.head is not None
                 else f"KV group {dest.group} of layer {dest.layer}, shared by {readers}")
        texts.append(f"<b>{port}</b><br>{_PORT_TEXT[dest.kind]} input of {owner}")
    return tuple(texts)


def _curves(start: np.ndarray, end: np.ndarray, lay: Layout,
            graph: CircuitGraph) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic curves from each source node to its destination port, NaN-terminated.

    In the seq grid a straight edge that skips rows can run through a node in between, and
    then it looks connected to it. Such an edge bows sideways just enough to pass the nodes
    it would touch (``_detour``); the rest stay straight, which keeps the picture calm.
    """
    t = np.linspace(0.0, 1.0, CURVE_POINTS)[None, :]
    ctrl = (start + end) / 2
    if lay.name == "seq" and len(start):
        ctrl = ctrl.copy()
        ctrl[:, 0] += _detour(start, end, lay, graph)
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t**2
    x = a * start[:, :1] + b * ctrl[:, :1] + c * end[:, :1]
    y = a * start[:, 1:] + b * ctrl[:, 1:] + c * end[:, 1:]
    nan = np.full((len(start), 1), np.nan)
    return np.hstack([x, nan]), np.hstack([y, nan])


def _detour(start: np.ndarray, end: np.ndarray, lay: Layout, graph: CircuitGraph) -> np.ndarray:
    """The horizontal control-point offset (data units) that takes each edge around the nodes.

    A quadratic curve with its control point moved by ``k`` sideways is the straight line
    moved by ``2 t (1 - t) k`` at parameter ``t``; since the move is horizontal, ``t`` at a
    node's height is the straight line's. For each side, ``k`` grows until no node between
    the ends is closer than its radius plus a margin; the smaller detour wins, and outwards
    (away from the cell's centre line) on a near tie.
    """
    px_x = lay.width_px / (lay.x_range[1] - lay.x_range[0])
    px_y = lay.height_px / (lay.y_range[1] - lay.y_range[0])
    clearance = lay.node_px / 2 + 3.0
    cols = np.array([c[0] for c in lay.columns])
    col_w = cols[1] - cols[0] if len(cols) > 1 else 1.0
    col = np.clip(np.rint((start[:, 0] - cols[0]) / col_w).astype(int), 0, len(cols) - 1)
    centre = cols[col]
    # one column's nodes, relative to its centre (all columns are the same)
    pos0 = None if graph.n_positions is None else 0
    cell = np.array([lay.nodes[n.key] for n in graph.nodes if n.position == pos0]) - [cols[0], 0]
    ox, oy = cell[:, 0][None, :] * px_x, cell[:, 1][None, :] * px_y  # (1, O)
    sx, sy = ((start[:, 0] - centre) * px_x)[:, None], (start[:, 1] * px_y)[:, None]
    ex, ey = ((end[:, 0] - centre) * px_x)[:, None], (end[:, 1] * px_y)[:, None]
    dy = np.where(np.abs(ey - sy) < 1e-9, 1e-9, ey - sy)
    t = (oy - sy) / dy
    between = (t > 0.02) & (t < 0.98)
    w = np.where(between, 2 * t * (1 - t), 0.0)
    d = sx + t * (ex - sx) - ox  # the straight line's horizontal distance from each node
    best_k = np.full(len(start), np.inf)
    best_side = np.zeros(len(start))
    outward = np.sign(np.round((sx + ex)[:, 0] / 2, 6))
    outward[outward == 0] = 1.0
    for side in (outward, -outward):
        k = np.zeros(len(start))
        for _ in range(6):
            shifted = d + side[:, None] * w * k[:, None]
            hit = between & (np.abs(shifted) < clearance)
            need = np.where(hit, (clearance - side[:, None] * d) / np.maximum(w, 1e-9), 0.0)
            k_new = np.maximum(k, need.max(axis=1, initial=0.0))
            if np.array_equal(k_new, k):
                break
            k = k_new
        better = k + 2.0 < best_k  # the outward side was tried first and wins near ties
        best_k = np.where(better, k, best_k)
        best_side = np.where(better, side, best_side)
    # stay inside the column: a curve's peak is half its control offset
    room = np.maximum(col_w * px_x / 2 - 6.0 - np.abs((sx + ex)[:, 0] / 2), 0.0)
    return best_side * np.minimum(best_k, 2 * room) / px_x


def _node_static_hover(node: Any) -> str:
    parts = [f"<b>{node.key}</b>", _KIND_TEXT[node.kind]]
    if node.kind in ("head", "attn", "mlp"):
        parts.append(f"layer {node.layer}" + ("" if node.head is None else f", head {node.head}"))
    return "<br>".join(parts)


# -- building and updating -----------------------------------------------------------------


def build_figure(
    trace: Trace,
    step: int | None = None,
    *,
    layout: str = "seq",
    show_removed: bool = True,
    highlight: str | None = None,
    widget: bool = False,
) -> go.Figure | go.FigureWidget:
    """The seq-graph of ``trace`` after ``step`` (None: the last recorded step; -1: before any).

    Args:
        layout: one of ``layout.LAYOUTS``.
        show_removed: draw removed edges (faded); False hides them.
        highlight: a node key (``A1.2@5``) whose paths to ``Out`` and from ``Embed`` are
            emphasised (``paths_through``); None for none.
        widget: return a ``go.FigureWidget`` (for notebooks) instead of a ``go.Figure``.
    """
    check_layout(layout)
    geo = _geometry(trace.graph.shape, layout)
    fig = go.Figure()
    for uid in TRACE_IDS:
        fig.add_trace(_empty_trace(uid))
    fig.update_layout(
        template="simple_white",
        plot_bgcolor="white",
        hovermode="closest",
        hoverlabel={"bgcolor": "white", "font_size": 12},
        legend={"orientation": "h", "yref": "container", "yanchor": "bottom", "y": 0.0,
                "xanchor": "left", "x": 0.0, "font_size": 11, "itemsizing": "constant",
                "groupclick": "togglegroup", "itemwidth": 40},
        title={"font_size": 15, "x": 0.01, "xanchor": "left", "y": 1.0, "yanchor": "top",
               "yref": "container", "pad": {"t": 18}},
        margin={"l": 70, "r": 20, "t": 100, "b": 80},
        font={"family": "Arial, Helvetica, sans-serif", "size": 12},
        dragmode="pan",
    )
    _apply_axes(fig, trace, geo)
    fig = go.FigureWidget(fig) if widget else fig
    update_figure(fig, trace, step, show_removed=show_removed, highlight=highlight, layout=layout)
    return fig


def _empty_trace(uid: str) -> go.Scatter:
    """One of the figure's fixed traces, styled but without data (``update_figure`` fills it)."""
    i = TRACE_IDS.index(uid)
    name = _LABELS[uid]
    if i == _NODES:
        return go.Scatter(uid=uid, name=name, mode="markers+text", hoverinfo="text",
                          showlegend=False, textfont={"size": 9, "color": "white"},
                          textposition="middle center",
                          marker={"line": {"width": 1, "color": "#333333"}})
    if i == _HOVER:
        return go.Scatter(uid=uid, name=name, mode="markers", hoverinfo="text", showlegend=False,
                          marker={"color": "#555555", "symbol": "triangle-up"})
    group = uid
    if i == _REMOVED:
        line = {"color": LIGHT_GREY, "width": 0.8}
    elif i == _UNTESTED:
        line = {"color": GREY, "width": 1.0}
    elif i == _UNDER_TEST:
        line = {"color": BLUISH_GREEN, "width": 4.5}
    elif i == _PATHS:
        line = {"color": BLACK, "width": 3.0}
    else:
        (sign, cls), = [k for k, v in _KEPT.items() if v == i]
        line = {"color": VERMILLION if sign == "+" else BLUE, "width": WIDTHS[cls]}
        group = f"kept{sign}"
    # one legend entry per group: the three width classes of a sign toggle together
    shown = i not in _KEPT.values() or i in (_KEPT[("+", 1)], _KEPT[("-", 1)])
    return go.Scatter(uid=uid, name=name, mode="lines", line=line, hoverinfo="skip",
                      connectgaps=False, showlegend=shown, legendgroup=group, legendrank=i)


def update_figure(
    fig: AnyFigure,
    trace: Trace,
    step: int | None = None,
    *,
    show_removed: bool = True,
    highlight: str | None = None,
    layout: str | None = None,
) -> None:
    """Show ``trace`` after ``step`` in a figure made by ``build_figure``, in place.

    Only the traces' data, their opacity and the title change, in one ``batch_update`` (one
    message to the browser for a ``FigureWidget``). ``layout`` None keeps the figure's layout;
    another name re-places the nodes without rebuilding.
    """
    meta = _meta(fig)
    shape = trace.graph.shape
    if meta is not None and tuple(meta["graph"]) != shape:
        raise ValueError(f"this figure shows a graph of shape {tuple(meta['graph'])} (n_layers, "
                         f"n_heads, attn_only, n_positions, parallel, n_kv_heads); the trace's is "
                         f"{shape}: build a new figure with build_figure")
    layout = check_layout(layout or (meta["layout"] if meta else "seq"))
    geo = _geometry(shape, layout)
    state = step_state(trace, step)
    paths = None if highlight is None else paths_through(trace, state.step, highlight)
    data = _trace_data(trace, geo, state, show_removed, paths)
    with fig.batch_update():
        if meta is None or meta["layout"] != layout:
            _apply_axes(fig, trace, geo)
        for i, props in data.items():
            fig.data[i].update(props)
        fig.layout.title.text = _title(trace, state)


def _meta(fig: AnyFigure) -> dict[str, Any] | None:
    meta = fig.layout.meta
    if isinstance(meta, dict) and _META_KEY in meta:
        return meta[_META_KEY]
    return None


def _trace_data(trace: Trace, geo: _Geometry, state: StepState, show_removed: bool,
                paths: set[str] | None) -> dict[int, dict[str, Any]]:
    """The new data of every trace: each edge in the group of its state, sign and width."""
    n = len(geo.edge_names)
    group = np.full(n, _UNTESTED, dtype=np.int64)
    tau = float(trace.settings.get("tau") or 0.0)
    kept_tested = state.tested & ~state.removed
    if kept_tested.any():
        mag = np.abs(state.delta[kept_tested])
        if tau > 0:
            cls = np.searchsorted(np.array(WIDTH_STEPS) * tau, mag, side="right")
        else:  # no scale to measure against: thirds of what was measured so far
            cuts = np.quantile(mag, [1 / 3, 2 / 3]) if mag.size > 2 else np.array([np.inf] * 2)
            cls = np.searchsorted(cuts, mag, side="right")
        neg = state.delta[kept_tested] < 0
        group[kept_tested] = np.where(neg, _KEPT[("-", 0)], _KEPT[("+", 0)]) + cls
    group[state.removed] = _REMOVED
    if state.under_test is not None:
        group[state.under_test] = _UNDER_TEST
    drawn = group != _REMOVED if not show_removed else np.ones(n, dtype=bool)

    out: dict[int, dict[str, Any]] = {}
    dim = paths is not None
    for g in _EDGE_TRACES:
        idx = np.flatnonzero(group == g) if (g != _REMOVED or show_removed) else np.empty(0, int)
        if g in (_REMOVED, _UNTESTED):  # thousands of thin lines add up to a grey blob
            per_column = len(idx) / len(geo.layout.columns)
            full, floor = (0.35, 0.1) if g == _REMOVED else (0.85, 0.3)
            base = max(full * min(1.0, math.sqrt(150 / max(per_column, 1.0))), floor)
        else:
            base = 1.0
        out[g] = {"x": geo.edge_x[idx].ravel(), "y": geo.edge_y[idx].ravel(),
                  "opacity": base * (0.3 if dim else 1.0)}
    for sign in "+-":  # one legend entry per sign: the first width class that has edges
        first = next((c for c in range(3) if len(out[_KEPT[(sign, c)]]["x"])), 1)
        for c in range(3):
            out[_KEPT[(sign, c)]]["showlegend"] = c == first
    path_idx = (np.array(sorted(trace.graph.edge_index[e] for e in paths), dtype=np.int64)
                if paths else np.empty(0, np.int64))
    out[_PATHS] = {"x": geo.edge_x[path_idx].ravel(), "y": geo.edge_y[path_idx].ravel()}
    out[_HOVER] = _hover_data(trace, geo, state, np.flatnonzero(drawn))
    out[_NODES] = _node_data(trace, geo, state, paths, path_idx)
    return out


def _decision(state: StepState, i: int, n_edges: int) -> str:
    if not state.tested[i]:
        return f"not yet tested (step {i} of {n_edges})"
    verdict = "removed" if state.removed[i] else "kept"
    now = " (under test)" if i == state.under_test else ""
    return f"Δmetric {state.delta[i]:.4g} at step {i}: {verdict}{now}"


def _hover_data(trace: Trace, geo: _Geometry, state: StepState, idx: np.ndarray) -> dict[str, Any]:
    """The port markers, and one invisible marker mid-edge per drawn edge, with their texts."""
    n = len(geo.edge_names)
    names = geo.edge_names
    edge_text = [f"<b>{names[i]}</b><br>{_decision(state, i, n)}" for i in idx.tolist()]
    size = _port_size(geo)
    n_ports = len(geo.port_names)
    return {
        "x": np.concatenate([geo.port_x, geo.mid_x[idx]]),
        "y": np.concatenate([geo.port_y, geo.mid_y[idx]]),
        "hovertext": list(geo.port_text) + edge_text,
        "customdata": list(geo.port_names) + [names[i] for i in idx.tolist()],
        "marker": {"size": np.concatenate([np.full(n_ports, size), np.full(len(idx), 9.0)]),
                   "opacity": np.concatenate([np.ones(n_ports), np.zeros(len(idx))])},
    }


def _node_data(trace: Trace, geo: _Geometry, state: StepState, paths: set[str] | None,
               path_idx: np.ndarray) -> dict[str, Any]:
    """The node markers: greyed when no kept edge touches them, dimmed off a highlighted path."""
    kept = state.kept
    n_nodes = len(geo.node_keys)
    deg_in = np.bincount(geo.dst_node[kept[geo.dst_edge]], minlength=n_nodes)
    deg_out = np.bincount(geo.src[kept], minlength=n_nodes)
    kinds = geo.node_kind
    alive = np.where(np.array([k == "embed" for k in kinds]), deg_out > 0,
                     np.where(np.array([k == "out" for k in kinds]), deg_in > 0,
                              (deg_in > 0) | (deg_out > 0)))
    fill = [(_NODE_FILL[k] if a else "#EDEDED") for k, a in zip(kinds, alive.tolist(), strict=True)]
    line_color = ["#333333" if a else "#B0B0B0" for a in alive.tolist()]
    line_width = np.ones(n_nodes)
    opacity = np.ones(n_nodes)
    if paths is not None:
        on = np.zeros(n_nodes, dtype=bool)
        on[geo.src[path_idx]] = True
        on[geo.dst_node[np.isin(geo.dst_edge, path_idx)]] = True
        opacity = np.where(on, 1.0, 0.35)
        line_width = np.where(on, 2.0, 1.0)
    tokens = trace.tokens
    text = []
    for i, key in enumerate(geo.node_keys):
        pos = ""
        if "@" in key:
            p = int(key.rsplit("@", 1)[1])
            tok = f" {_token_label(tokens[p])}" if tokens and p < len(tokens) else ""
            pos = f"<br>position {p}{tok}"
        text.append(f"{geo.node_static_hover[i]}{pos}<br>kept edges: {int(deg_in[i])} in, "
                    f"{int(deg_out[i])} out")
    size, labels = geo.layout.node_px, _node_labels(geo)
    inside = geo.layout.name == "seq"
    return {
        "x": geo.node_x, "y": geo.node_y,
        "hovertext": text,
        "customdata": list(geo.node_keys),
        "text": labels,
        "textposition": "middle center" if inside else "top right",
        "textfont": {"color": "white" if inside else "#333333", "size": 9 if inside else 10},
        "marker": {"color": fill, "size": size, "opacity": opacity,
                   "symbol": [_NODE_SYMBOL[k] for k in kinds],
                   "line": {"color": line_color, "width": line_width}},
    }


def _title(trace: Trace, state: StepState) -> str:
    """Model and tau, the step and kept edges, and what the step under test decided."""
    s = trace.settings
    model = s.get("task") or (s.get("model") or {}).get("name") or "model"
    tau = s.get("tau")
    tau_text = f" · tau {tau:.3g}" if isinstance(tau, (int, float)) else ""
    kept = int(state.kept.sum())
    metric = f"{s.get('metric', 'metric')} {trace.metric_after(state.step):.4g}"
    head = (f"<b>{html.escape(str(model), quote=False)}</b>{tau_text}<br>step {state.step + 1} / "
            f"{trace.n_edges} · edges kept {kept} · {html.escape(metric, quote=False)}")
    if state.under_test is None:
        sub = "the full graph, before any test"
    else:
        i = state.under_test
        verdict = "removed" if state.removed[i] else "kept"
        sub = (f"step {i} tested {trace.graph.edges[i].name}: Δmetric {state.delta[i]:.3g}, "
               f"{verdict}")
    sub = html.escape(sub, quote=False)
    return f"{head}<br><span style='font-size:12px;color:#555'>{sub}</span>"


# -- axes, sizes, labels -------------------------------------------------------------------


def _token_label(token: str) -> str:
    """The token in quotes, with its spaces kept and control characters escaped."""
    shown = token.encode("unicode_escape").decode("ascii") if not token.isprintable() else token
    return html.escape(f"'{shown}'", quote=False)


def _port_size(geo: _Geometry) -> float:
    return float(np.clip(geo.layout.node_px * 0.42, 3.0, 7.0))


def _node_labels(geo: _Geometry) -> list[str]:
    """Labels that fit: head numbers inside the markers of the seq grid (its rows name the
    layer), full names beside the nodes in the other layouts when there are few nodes."""
    n = len(geo.node_keys)
    if geo.layout.name == "seq":
        if geo.layout.node_px < 13:
            return [""] * n
        return [k.split("@")[0].split(".")[1] if kind == "head" else "Σ" if kind == "attn" else ""
                for k, kind in zip(geo.node_keys, geo.node_kind, strict=True)]
    if n / len(geo.layout.columns) > 80 or geo.layout.node_px < 8:
        return [""] * n
    return [k.split("@")[0] for k in geo.node_keys]


def _apply_axes(fig: AnyFigure, trace: Trace, geo: _Geometry) -> None:
    """Size the figure for the layout, and label its columns (tokens) and rows (layers)."""
    lay = geo.layout
    tokens = trace.tokens
    split = lay.columns[0][1] is not None
    if not split:
        col_text = ["all positions"]
    else:
        col_text = []
        for _, p in lay.columns:
            tok = tokens[p] if tokens and p is not None and p < len(tokens) else None
            col_text.append(f"{p}" if tok is None else f"{p}<br>{_token_label(tok)}")
    margin = fig.layout.margin
    fig.update_layout(
        width=int(lay.width_px + (margin.l or 0) + (margin.r or 0)),
        height=int(lay.height_px + (margin.t or 0) + (margin.b or 0)),
        xaxis={"range": list(lay.x_range), "showgrid": False, "zeroline": False,
               "tickmode": "array", "ticks": "", "showline": False,
               "tickvals": [c[0] for c in lay.columns] if split or lay.rows else [],
               "ticktext": col_text if split or lay.rows else [],
               "title": {"text": "token position" if split else None}},
        yaxis={"range": list(lay.y_range), "showgrid": bool(lay.rows), "gridcolor": "#F2F2F2",
               "zeroline": False, "tickmode": "array", "ticks": "", "showline": False,
               "tickvals": [r[0] for r in lay.rows], "ticktext": [r[1] for r in lay.rows]},
        meta={_META_KEY: {"layout": lay.name, "graph": list(trace.graph.shape)}},
        # sandwich norms: fixed, never-tested links from each head to its layer's output
        shapes=[{"type": "path", "path": geo.head_links, "layer": "below",
                 "line": {"color": GREY, "width": 1.0, "dash": "dot"}}] if geo.head_links else [],
    )
