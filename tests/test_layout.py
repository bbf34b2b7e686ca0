"""Node and port coordinates: the seq grid's rules, the networkx layouts, bad names."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import pytest

from acdc_viz.graph import QKV, CircuitGraph, node_key
from acdc_viz.layout import (
    LAYOUTS,
    _cached_layout,
    _networkx_cell,
    check_layout,
    layout_of,
    node_positions,
    port_positions,
    row_labels,
)


@pytest.mark.parametrize("attn_only", [False, True])
@pytest.mark.parametrize("n_positions", [None, 1, 5])
def test_seq_rows_bottom_to_top(attn_only: bool, n_positions: int | None) -> None:
    g = CircuitGraph(3, 4, attn_only=attn_only, n_positions=n_positions)
    pos = node_positions(g)
    assert set(pos) == {n.key for n in g.nodes}
    positions = [None] if n_positions is None else range(n_positions)
    for p in positions:
        def y(name: str, p: int | None = p) -> float:
            return pos[node_key(name, p)][1]

        order = ["Embed"]
        for layer in range(3):
            heads = [y(f"A{layer}.{h}") for h in range(4)]
            assert len(set(heads)) == 1, "a layer's heads share one row"
            order.append(f"A{layer}.0")
            if not attn_only:
                order.append(f"MLP{layer}")
        order.append("Out")
        ys = [y(n) for n in order]
        assert ys == sorted(ys) and len(set(ys)) == len(ys), order
        assert y("Embed") == min(v[1] for v in pos.values())
        assert y("Out") == max(v[1] for v in pos.values())
    lay = layout_of(g)
    assert [label for _, label in lay.rows] == row_labels(3, attn_only)
    assert [label for _, label in lay.rows][:3] == (
        ["Embed", "attn 0", "attn 1"] if attn_only else ["Embed", "attn 0", "MLP 0"])


def test_a_parallel_blocks_mlp_shares_its_heads_row() -> None:
    """Attention and MLP of a parallel block read the same stream: one row per layer, the MLP
    in its lane right of the heads."""
    lay = layout_of(CircuitGraph(2, 4, parallel=True))
    assert [label for _, label in lay.rows] == ["Embed", "attn + MLP 0", "attn + MLP 1", "Out"]
    (hx, hy), (mx, my) = lay.nodes["A1.3"], lay.nodes["MLP1"]
    assert hy == my and mx > hx and lay.nodes["MLP0"][1] < hy


def test_seq_columns_are_positions_and_heads_sit_side_by_side() -> None:
    g = CircuitGraph(2, 5, n_positions=4)
    lay = layout_of(g)
    assert [p for _, p in lay.columns] == [0, 1, 2, 3]
    col_x = [x for x, _ in lay.columns]
    width = col_x[1] - col_x[0]
    assert col_x == sorted(col_x)
    for node in g.nodes:
        x, _ = lay.nodes[node.key]
        assert abs(x - col_x[node.position]) < width / 2, node.key  # inside its own column
    for p in range(4):
        for layer in range(2):
            xs = [lay.nodes[f"A{layer}.{h}@{p}"][0] for h in range(5)]
            assert xs == sorted(xs) and len(set(xs)) == 5  # left to right by head index
            gaps = {round(b - a, 9) for a, b in itertools.pairwise(xs)}
            assert len(gaps) == 1 and gaps.pop() == pytest.approx(lay.spacing)
    # every column is the same picture, shifted
    for node in g.nodes:
        x, y = lay.nodes[node.key]
        x0, y0 = lay.nodes[node_key(node.name, 0)]
        assert (x - col_x[node.position], y) == pytest.approx((x0 - col_x[0], y0))


def test_seq_without_positions_is_one_column() -> None:
    lay = layout_of(CircuitGraph(2, 3))
    assert lay.columns == ((0.0, None),)
    assert all("@" not in k for k in lay.nodes)


@pytest.mark.parametrize("attn_only", [False, True])
def test_long_edges_have_clear_lanes(attn_only: bool) -> None:
    """Embed->Out runs up a line between heads; MLP->MLP up a lane right of the heads."""
    for n_heads in (1, 3, 4, 7):
        g = CircuitGraph(3, n_heads, attn_only=attn_only)
        lay = layout_of(g)
        spine = lay.nodes["Embed"][0]
        assert lay.nodes["Out"][0] == spine
        heads = [lay.nodes[f"A{layer}.{h}"][0] for layer in range(3) for h in range(n_heads)]
        assert min(abs(x - spine) for x in heads) >= lay.spacing / 2 - 1e-9
        if not attn_only:
            lane = {lay.nodes[f"MLP{layer}"][0] for layer in range(3)}
            assert len(lane) == 1 and lane.pop() >= max(heads) + lay.spacing - 1e-9


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ports_on_their_head(layout: str) -> None:
    g = CircuitGraph(2, 4, n_positions=2)
    lay = layout_of(g, layout)
    ports = port_positions(g, layout)
    px_x = lay.width_px / (lay.x_range[1] - lay.x_range[0])
    px_y = lay.height_px / (lay.y_range[1] - lay.y_range[0])
    heads = [n for n in g.nodes if n.kind == "head"]
    for node in heads:
        hx, hy = lay.nodes[node.key]
        q, k, v = (ports[node_key(f"{node.name}.{c}", node.position)] for c in QKV)
        assert q[0] < k[0] < v[0], "q left, k middle, v right"
        assert max(q[1], k[1], v[1]) < hy, "ports sit below the head"
        for port in (q, k, v):
            dist = math.hypot((port[0] - hx) * px_x, (port[1] - hy) * px_y)
            assert lay.node_px / 2 <= dist <= lay.node_px / 2 + 4, "on the marker's rim"
    for node in g.nodes:
        if node.kind in ("mlp", "out"):
            assert ports[node.key] == lay.nodes[node.key]
    dest_keys = {node_key(e.dest.name, e.position) for e in g.edges}
    assert dest_keys <= set(ports)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("n_positions", [None, 3])
def test_networkx_layouts_deterministic_and_complete(layout: str, n_positions: int | None) -> None:
    g = CircuitGraph(2, 3, n_positions=n_positions)
    first = node_positions(g, layout)
    assert set(first) == {n.key for n in g.nodes}
    assert all(math.isfinite(c) for xy in first.values() for c in xy)
    _cached_layout.cache_clear()
    _networkx_cell.cache_clear()
    assert node_positions(g, layout) == first  # seeded: the same after recomputing
    if layout == "multipartite":  # one row per layer, Embed lowest, Out highest
        for n in g.nodes:
            assert first[n.key][1] == n.layer + 1
    if n_positions:  # each position's copy is tiled left to right, never overlapping
        xs = [[first[f"{n.name}@{p}"][0] for n in g.nodes if n.position == 0] for p in range(3)]
        assert max(xs[0]) < min(xs[1]) and max(xs[1]) < min(xs[2])


def test_networkx_layout_cost_does_not_grow_with_positions() -> None:
    layout_of(CircuitGraph(4, 8), "kamada_kawai")
    info = _networkx_cell.cache_info()
    layout_of(CircuitGraph(4, 8, n_positions=20), "kamada_kawai")
    assert _networkx_cell.cache_info().hits == info.hits + 1


def test_cached_but_not_shared_mutably() -> None:
    g = CircuitGraph(2, 2)
    assert layout_of(g) is layout_of(CircuitGraph(2, 2))  # cached per shape
    pos = node_positions(g)
    pos["Embed"] = (99.0, 99.0)
    assert node_positions(g)["Embed"] != (99.0, 99.0)
    with pytest.raises(TypeError):
        layout_of(g).nodes["Embed"] = (0.0, 0.0)  # type: ignore[index]


def test_unknown_layout_lists_the_names() -> None:
    with pytest.raises(ValueError) as info:
        node_positions(CircuitGraph(1, 1), "circular")
    for name in LAYOUTS:
        assert name in str(info.value)
    assert check_layout("spring") == "spring"


def test_canvas_is_bounded() -> None:
    for g in (CircuitGraph(1, 1), CircuitGraph(12, 12), CircuitGraph(2, 3, n_positions=50)):
        lay = layout_of(g)
        assert 6 <= lay.node_px <= 22
        assert lay.width_px <= 1800 and lay.height_px <= 1000
        x0, x1 = lay.x_range
        y0, y1 = lay.y_range
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in lay.nodes.values())


def imported_modules(module: object) -> set[str]:
    """Top-level names of every module a source file imports, lazily or not."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))  # type: ignore[attr-defined]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_layout_imports_neither_plotly_nor_widgets() -> None:
    import acdc_viz.layout

    assert not imported_modules(acdc_viz.layout) & {"plotly", "ipywidgets", "anywidget"}
