"""The seq-graph figure: bounded trace count, the state after each step, in-place updates, paths."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pytest

from acdc_viz.figure import (
    BLUE,
    CURVE_POINTS,
    TRACE_IDS,
    VERMILLION,
    WIDTHS,
    build_figure,
    paths_through,
    step_state,
    update_figure,
)
from acdc_viz.graph import CircuitGraph
from acdc_viz.layout import LAYOUTS
from acdc_viz.trace import Trace

IDX = {uid: i for i, uid in enumerate(TRACE_IDS)}
EDGE_UIDS = [u for u in TRACE_IDS if u not in ("hover", "nodes", "paths")]


def fake_trace(n_layers: int = 2, n_heads: int = 3, *, attn_only: bool = False,
               n_positions: int | None = None, n_steps: int | None = None, tau: float = 0.01,
               abs_delta: bool = False, seed: int = 0, remove: Any = None) -> Trace:
    """A consistent trace with fabricated metrics, built with Trace.record.

    ``remove`` (a set of edge names) fixes the decisions; otherwise about 70% of the edges are
    removed, and kept edges have |delta| spread over 1-1000 tau.
    """
    graph = CircuitGraph(n_layers, n_heads, attn_only=attn_only, n_positions=n_positions)
    settings = {
        "model": {"name": "fake-model", "config_hash": "c0ffee", "n_layers": n_layers,
                  "n_heads": n_heads, "d_model": 16, "attn_only": attn_only},
        "tau": tau, "metric": "kl", "ablation": "resample", "positions": n_positions is not None,
        "abs_delta": abs_delta,
    }
    tokens = None if n_positions is None else [f" tok{i}" for i in range(n_positions)]
    t = Trace(settings, graph, [], initial_metric=0.5, tokens=tokens)
    rng = np.random.default_rng(seed)
    n = len(graph.edges) if n_steps is None else n_steps
    for i in range(n):
        if remove is not None:
            rm = graph.edges[i].name in remove
            delta = tau * (0.1 if rm else 3.0)
        else:
            rm = rng.random() < 0.7
            mag = tau * (rng.uniform(0, 0.9) if rm else 10 ** rng.uniform(0, 3))
            delta = mag * (-1 if rng.random() < (0.3 if abs_delta else 0.0) else 1)
            if rm and not abs_delta:
                delta = -mag if rng.random() < 0.3 else mag
        t.record(t.metric_after(i - 1) + delta, rm)
    if n == len(graph.edges):
        t.finish()
    return t


def segments(trace_obj: Any) -> int:
    x = np.asarray(trace_obj.x, dtype=float)
    assert len(x) % (CURVE_POINTS + 1) == 0
    return len(x) // (CURVE_POINTS + 1)


def by_uid(fig: go.Figure) -> dict[str, Any]:
    return {t.uid: t for t in fig.data}


# -- structure -----------------------------------------------------------------------------


def test_1500_edge_trace_gives_a_bounded_number_of_traces() -> None:
    trace = fake_trace(4, 8, n_steps=800)
    assert trace.n_edges == 1519
    fig = build_figure(trace)
    assert len(fig.data) <= 12
    assert [t.uid for t in fig.data] == list(TRACE_IDS)
    drawn = sum(segments(by_uid(fig)[u]) for u in EDGE_UIDS)
    assert drawn == 1519, "every edge drawn once"
    assert len(by_uid(fig)["nodes"].x) == len(trace.graph.nodes)
    assert all(isinstance(t, go.Scatter) for t in fig.data)


@pytest.mark.parametrize("step", [-1, 0, 1, 7, 40, 74])
def test_state_after_step_matches_trace(step: int) -> None:
    trace = fake_trace(2, 3, seed=3)
    fig = build_figure(trace, step)
    t = by_uid(fig)
    removed = trace.removed_after(step)
    under = trace.graph.edges[step].name if step >= 0 else None
    n_removed_drawn = len(removed - {under})
    assert segments(t["removed"]) == n_removed_drawn
    assert segments(t["under-test"]) == (1 if step >= 0 else 0)
    assert segments(t["untested"]) == trace.n_edges - (step + 1)
    kept_tested = sum(segments(t[u]) for u in EDGE_UIDS if u.startswith("kept"))
    under_kept = 0 if under is None or under in removed else 1
    assert kept_tested == (step + 1) - len(removed) - under_kept
    # the hover markers name the edges drawn, with the decision of each
    hover = dict(zip(t["hover"].customdata, t["hover"].hovertext, strict=True))
    for i, e in enumerate(trace.graph.edges):
        text = hover[e.name]
        if i > step:
            assert "not yet tested" in text
        else:
            assert ("removed" if e.name in removed else "kept") in text
            assert f"step {i}" in text
            assert f"{trace.steps[i].delta:.4g}" in text
    title = fig.layout.title.text
    kept = trace.n_edges - len(removed)
    assert f"step {step + 1} / {trace.n_edges}" in title
    assert f"edges kept {kept}" in title
    assert "fake-model" in title and "tau 0.01" in title
    assert f"kl {trace.metric_after(step):.4g}" in title


def test_step_state_arrays() -> None:
    trace = fake_trace(2, 3, n_steps=30)
    s = step_state(trace, 20)
    assert s.tested.sum() == 21 and s.under_test == 20
    assert {trace.graph.edges[i].name for i in np.flatnonzero(s.removed)} == trace.removed_after(20)
    assert np.isnan(s.delta[21:]).all()
    assert step_state(trace).step == 29  # None: the last recorded step
    assert step_state(trace, -1).under_test is None
    assert s.state_of(20) == "under test"
    assert s.state_of(25) == "untested"


def test_node_hover_and_degrees() -> None:
    trace = fake_trace(2, 3, n_positions=2, seed=1)
    fig = build_figure(trace)
    nodes = by_uid(fig)["nodes"]
    texts = dict(zip(nodes.customdata, nodes.hovertext, strict=True))
    kept = trace.kept_after(len(trace.steps) - 1)
    for node in trace.graph.nodes:
        text = texts[node.key]
        n_in = sum(1 for e in trace.graph.edges if e.name in kept and e.position == node.position
                   and e.dest.node == node.name)
        n_out = sum(1 for e in trace.graph.edges if e.name in kept and e.position == node.position
                    and e.src.name == node.name)
        assert f"kept edges: {n_in} in, {n_out} out" in text
        assert f"position {node.position} ' tok{node.position}'" in text
        if node.kind == "head":
            assert f"layer {node.layer}, head {node.head}" in text and "attention head" in text


def test_widths_and_colours() -> None:
    trace = fake_trace(3, 4, abs_delta=True, seed=2)
    t = by_uid(build_figure(trace))
    for sign, colour in (("+", VERMILLION), ("-", BLUE)):
        widths = [t[f"kept{sign}{c}"].line.width for c in ("small", "medium", "large")]
        assert widths == list(WIDTHS) and widths == sorted(widths)
        assert {t[f"kept{sign}{c}"].line.color for c in ("small", "medium", "large")} == {colour}
        assert sum(segments(t[f"kept{sign}{c}"]) for c in ("small", "medium", "large")) > 0
        shown = [t[f"kept{sign}{c}"].showlegend for c in ("small", "medium", "large")]
        assert shown.count(True) == 1, "one legend entry per sign"
    # Δ in [10 tau, 100 tau) is medium width
    s = step_state(trace)
    mag = np.abs(s.delta[s.tested & ~s.removed & (np.arange(trace.n_edges) != s.under_test)])
    medium = ((mag >= 0.1) & (mag < 1.0)).sum()
    assert segments(t["kept+medium"]) + segments(t["kept-medium"]) == medium


def test_show_removed_false_hides_them_everywhere() -> None:
    trace = fake_trace(2, 3)
    fig = build_figure(trace, 50, show_removed=False)
    t = by_uid(fig)
    assert segments(t["removed"]) == 0
    removed = trace.removed_after(50) - {trace.graph.edges[50].name}
    assert not removed & set(t["hover"].customdata)


# -- updates -------------------------------------------------------------------------------


def data_of(fig: go.Figure) -> list[dict[str, Any]]:
    return json.loads(fig.to_json())["data"]


@pytest.mark.parametrize("widget", [False, True])
def test_update_equals_fresh_build(widget: bool) -> None:
    trace = fake_trace(2, 3, n_positions=3)
    fig = build_figure(trace, 5, widget=widget)
    assert isinstance(fig, go.FigureWidget if widget else go.Figure)
    before = [id(t) for t in fig.data]
    calls = []
    original = fig.batch_update

    def counting_batch_update() -> Any:
        calls.append(fig._in_batch_mode)  # nested calls (from trace.update) join the outer one
        return original()

    fig.batch_update = counting_batch_update  # type: ignore[method-assign]
    update_figure(fig, trace, 120, highlight="A1.0@2")
    assert calls.count(False) == 1, "one batch_update per step"
    assert [id(t) for t in fig.data] == before, "the traces are updated, not replaced"
    fresh = build_figure(trace, 120, highlight="A1.0@2")
    assert data_of(fig) == data_of(fresh)
    assert fig.layout.title.text == fresh.layout.title.text
    update_figure(fig, trace, 5)
    assert data_of(fig) == data_of(build_figure(trace, 5))


def test_update_can_switch_layout_in_place() -> None:
    trace = fake_trace(2, 2)
    fig = build_figure(trace, 10)
    update_figure(fig, trace, 10, layout="spring")
    assert data_of(fig) == data_of(build_figure(trace, 10, layout="spring"))
    assert fig.layout.xaxis.range == build_figure(trace, 10, layout="spring").layout.xaxis.range


def test_update_rejects_another_graph() -> None:
    fig = build_figure(fake_trace(2, 3))
    with pytest.raises(ValueError, match="build a new figure"):
        update_figure(fig, fake_trace(2, 2), 0)


def test_bad_steps_and_layouts() -> None:
    trace = fake_trace(2, 2, n_steps=10)
    with pytest.raises(IndexError, match=r"-1\.\.9"):
        build_figure(trace, 10)
    with pytest.raises(IndexError):
        build_figure(trace, -2)
    with pytest.raises(TypeError):
        build_figure(trace, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kamada_kawai"):
        build_figure(trace, layout="circle")
    with pytest.raises(KeyError, match="node key"):
        build_figure(trace, highlight="A9.9")


# -- sizes that must all render ------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_builds(layout: str) -> None:
    trace = fake_trace(2, 3, n_positions=2)
    fig = build_figure(trace, 30, layout=layout)
    assert len(fig.data) == len(TRACE_IDS)
    assert np.isfinite(np.asarray(by_uid(fig)["nodes"].x, dtype=float)).all()


def test_no_steps_and_fully_pruned_circuits_render() -> None:
    graph = CircuitGraph(2, 2)
    empty = fake_trace(2, 2, n_steps=0)
    fig = build_figure(empty)  # None with no steps: the full graph
    assert segments(by_uid(fig)["untested"]) == len(graph.edges)
    assert "step 0 /" in fig.layout.title.text
    pruned = fake_trace(2, 2, remove={e.name for e in graph.edges})
    for node in ("Out", "Embed", "A1.0"):
        assert paths_through(pruned, None, node) == set()
    fig = build_figure(pruned, highlight="Out", show_removed=False)
    t = by_uid(fig)
    assert "edges kept 0" in fig.layout.title.text
    assert sum(segments(t[u]) for u in EDGE_UIDS if u.startswith("kept")) == 0
    assert segments(t["under-test"]) == 1  # the last tested edge, removed
    assert segments(t["paths"]) == 0


@pytest.mark.parametrize("shape", [
    {"n_positions": 1},
    {"n_positions": 50, "n_steps": 2000},
    {"n_layers": 12, "n_heads": 12, "n_steps": 300},
    {"n_layers": 1, "n_heads": 1, "attn_only": True},
])
def test_sizes_render(shape: dict[str, Any]) -> None:
    args = {"n_layers": 2, "n_heads": 3} | shape
    trace = fake_trace(**args)
    fig = build_figure(trace)
    assert len(fig.data) == len(TRACE_IDS)
    assert sum(segments(by_uid(fig)[u]) for u in EDGE_UIDS) == trace.n_edges
    assert len(by_uid(fig)["nodes"].x) == len(trace.graph.nodes)
    if shape.get("n_positions") == 50:
        assert len(fig.layout.xaxis.ticktext) == 50
    def no_bare_nan(name: str) -> None:
        raise AssertionError(f"{name} in the figure's JSON")

    json.loads(fig.to_json(), parse_constant=no_bare_nan)  # gaps travel as typed arrays


# -- paths ---------------------------------------------------------------------------------


def test_paths_through_small_graph() -> None:
    # CircuitGraph(1, 1): Embed, A0.0, MLP0, Out
    graph = CircuitGraph(1, 1)
    names = [e.name for e in graph.edges]
    assert set(names) == {"Embed->Out", "A0.0->Out", "MLP0->Out", "A0.0->MLP0", "Embed->MLP0",
                          "Embed->A0.0.q", "Embed->A0.0.k", "Embed->A0.0.v"}
    trace = fake_trace(1, 1, remove={"Embed->Out", "A0.0->MLP0", "Embed->A0.0.k"})
    assert paths_through(trace, None, "A0.0") == {"A0.0->Out", "Embed->A0.0.q", "Embed->A0.0.v"}
    assert paths_through(trace, None, "MLP0") == {"MLP0->Out", "Embed->MLP0"}
    assert paths_through(trace, None, "Out") == {"A0.0->Out", "MLP0->Out", "Embed->MLP0",
                                                 "Embed->A0.0.q", "Embed->A0.0.v"}
    assert paths_through(trace, None, "Embed") == paths_through(trace, None, "Out")
    # before step 0 every edge is kept
    assert paths_through(trace, -1, "A0.0") == {"A0.0->Out", "A0.0->MLP0", "MLP0->Out",
                                                "Embed->A0.0.q", "Embed->A0.0.k",
                                                "Embed->A0.0.v"}


def test_paths_through_dead_end_and_positions() -> None:
    # A0.0 keeps its inputs but loses its outputs: no path to Out through it
    trace = fake_trace(1, 1, n_positions=2, remove={"A0.0->Out@0", "A0.0->MLP0@0"})
    assert paths_through(trace, None, "A0.0@0") == {"Embed->A0.0.q@0", "Embed->A0.0.k@0",
                                                    "Embed->A0.0.v@0"}
    at1 = paths_through(trace, None, "A0.0@1")
    # the head at position 1 reads keys and values at 0 and 1, queries at 1 only
    assert {"Embed->A0.0.k@0", "Embed->A0.0.v@0"} <= at1 and "Embed->A0.0.q@0" not in at1
    assert {e for e in at1 if e.endswith("@0")} == {"Embed->A0.0.k@0", "Embed->A0.0.v@0"}
    with pytest.raises(KeyError):
        paths_through(trace, None, "A0.0")  # positions need the @p key


def test_highlight_draws_the_paths_and_dims_the_rest() -> None:
    trace = fake_trace(3, 4, seed=5)
    paths = paths_through(trace, None, "A1.2")
    fig = build_figure(trace, highlight="A1.2")
    t = by_uid(fig)
    assert segments(t["paths"]) == len(paths) > 0
    assert t["kept+large"].opacity < 1
    nodes = t["nodes"]
    on = [k for k, o in zip(nodes.customdata, nodes.marker.opacity, strict=True) if o == 1]
    assert "A1.2" in on and "Out" in on
    fig2 = build_figure(trace)
    assert by_uid(fig2)["kept+large"].opacity == 1


def test_title_is_escaped_and_names_the_tested_edge() -> None:
    trace = fake_trace(1, 1, n_steps=3)
    trace.settings["model"]["name"] = "<script>x</script>"
    title = build_figure(trace, 2).layout.title.text
    assert "<script>" not in title
    assert re.search(rf"step 2 tested {re.escape(trace.graph.edges[2].name.replace('>', '&gt;'))}",
                     title)


def test_paths_cross_positions_through_keys_and_values() -> None:
    """An edge into A1.0.k@0 matters for Out@1: the head at position 1 attends to position 0."""
    graph = CircuitGraph(2, 1, attn_only=True, n_positions=2)
    keep = {"A1.0->Out@1", "Embed->A1.0.k@0", "Embed->A1.0.q@1", "A0.0->A1.0.v@1"}
    trace = fake_trace(2, 1, attn_only=True, n_positions=2,
                       remove={e.name for e in graph.edges} - keep)
    assert paths_through(trace, None, "Out@1") == keep - {"A0.0->A1.0.v@1"}  # A0.0 has no input
    assert paths_through(trace, None, "A1.0@1") == keep - {"A0.0->A1.0.v@1"}
    assert paths_through(trace, None, "A0.0@1") == {"A0.0->A1.0.v@1", "A1.0->Out@1"}
    # a key at position 1 is invisible to position 0 in a causal model, not in a bidirectional one
    trace2 = fake_trace(2, 1, attn_only=True, n_positions=2,
                        remove={e.name for e in graph.edges} - {"A1.0->Out@0", "Embed->A1.0.k@1"})
    assert paths_through(trace2, None, "Out@0") == set()
    trace2.settings["causal"] = False
    assert paths_through(trace2, None, "Out@0") == {"A1.0->Out@0", "Embed->A1.0.k@1"}
