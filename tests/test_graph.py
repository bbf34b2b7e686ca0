"""The computational graph: names, counts, visit order, networkx export."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from acdc_viz.graph import CircuitGraph


def test_gpt2_small_has_auto_circuits_edge_count_from_a_config_alone():
    cfg = SimpleNamespace(n_layers=12, n_heads=12, attn_only=False)   # no weights needed
    assert len(CircuitGraph.from_config(cfg)) == 32491
    # the paper's 32,923 also counts one internal edge per head and letter: 12 * 12 * 3
    assert len(CircuitGraph.from_config(cfg)) + 12 * 12 * 3 == 32923


@pytest.mark.parametrize(("layers", "heads", "attn_only", "edges"),
                         [(4, 8, True, 1281), (2, 8, True, 257), (4, 8, False, 1519)])
def test_other_paper_and_benchmark_counts(layers, heads, attn_only, edges):
    assert len(CircuitGraph(layers, heads, attn_only=attn_only)) == edges


def test_visit_order_is_the_documented_one():
    g = CircuitGraph(2, 2)
    names = [e.name for e in g.edges]
    assert names[:6] == ["MLP1->Out", "A1.1->Out", "A1.0->Out", "MLP0->Out", "A0.1->Out",
                         "A0.0->Out"]
    assert names[6] == "Embed->Out"
    after_out = [e.dest.name for e in g.edges[7:]]
    dests = list(dict.fromkeys(after_out))
    assert dests == ["MLP1", "A1.1.q", "A1.1.k", "A1.1.v", "A1.0.q", "A1.0.k", "A1.0.v",
                     "MLP0", "A0.1.q", "A0.1.k", "A0.1.v", "A0.0.q", "A0.0.k", "A0.0.v"]
    assert [e.src.name for e in g.edges if e.dest.name == "MLP1"] == [
        "A1.1", "A1.0", "MLP0", "A0.1", "A0.0", "Embed"]
    assert [e.src.name for e in g.edges if e.dest.name == "A0.0.q"] == ["Embed"]


def test_positions_split_each_edge_last_position_first():
    g = CircuitGraph(1, 1, n_positions=3)
    assert [e.name for e in g.edges[:3]] == ["MLP0->Out@2", "MLP0->Out@1", "MLP0->Out@0"]
    assert len(g) == 3 * len(CircuitGraph(1, 1))
    assert g.edge("A0.0->MLP0@1").position == 1
    with pytest.raises(KeyError, match="no edge named"):
        g.edge("A9.9->Out")


def test_to_networkx():
    g = CircuitGraph(2, 2, n_positions=2)
    nx_graph = g.to_networkx()
    assert nx_graph.number_of_edges() == len(g)
    assert nx_graph.number_of_nodes() == len(g.nodes) == 2 * (1 + 2 * 3 + 1)
    data = nx_graph.get_edge_data("A0.1@1", "A1.0@1")
    assert set(data) == {"A0.1->A1.0.q@1", "A0.1->A1.0.k@1", "A0.1->A1.0.v@1"}
    assert nx_graph.nodes["A1.0@1"]["layer"] == 1


def test_bad_shapes():
    with pytest.raises(ValueError):
        CircuitGraph(0, 1)
    with pytest.raises(ValueError):
        CircuitGraph(1, 1, n_positions=0)
