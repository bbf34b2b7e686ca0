"""The batched ACDC engine on parallel-block models, against the bridge and the reference.

In a parallel block (GPT-NeoX/Pythia, with the MLP's own LayerNorm; Phi, whose MLP shares the
attention's LayerNorm) attention and MLP read the same stream, so ``MLP{l}`` receives no edge
from ``A{l}.*`` (``CircuitGraph(parallel=True)``; the visit order is otherwise unchanged). Both
families are rotary (partial) float64 models here; Phi's attention takes its softmax in float32
as Hugging Face does, and engine and reference mirror that. Measured: metrics agree to float64
rounding and every decision is equal, for each ablation, with and without positions, K = 1, 4
and the adaptive K.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_engine_equals_reference,
    assert_engine_forward_equals_bridge,
    token_pairs,
)
from model_families import VOCAB
from reference_acdc import reference_edge_names, reference_logits

from acdc_viz import Acdc, TokenPairs
from acdc_viz.graph import CircuitGraph
from acdc_viz.models.adapter import from_model
from acdc_viz.patching import CircuitRunner
from acdc_viz.trace import Trace, TraceError, load_trace, save_trace

torch.set_num_threads(1)

TAU = 3e-3
METRIC_TOLERANCE = 1e-9
#: (ablation, positions) per family; each case runs the reference once and the engine with every
#: K of ``HYPOTHESES``.
CASES = {
    "gpt_neox": [("resample", False), ("zero", True), ("mean", False), ("resample", True)],
    "phi": [("resample", True), ("zero", False), ("mean", True), ("mean", False)],
}
HYPOTHESES = (1, 4, None)


@pytest.fixture(scope="module")
def parallel_model(family):
    """``parallel_model(name)``: (bridge, weights) of a parallel family of ``CASES``."""
    built: dict = {}

    def get(name):
        if name not in built:
            bridge = family(name).bridge
            weights = from_model(bridge)
            assert weights.parallel and weights.kv_group is None and not weights.attn_only
            built[name] = bridge, weights
        return built[name]

    return get


def test_parallel_graph_edges():
    """``MLP{l}`` loses its edges from ``A{l}.*``: n_heads per layer (per position when split);
    the order of the others is unchanged, and sequential graphs are untouched."""
    seq, par = CircuitGraph(2, 4), CircuitGraph(2, 4, parallel=True)
    assert (len(seq), len(par)) == (110, 102)
    assert [e.name for e in seq.edges if not (e.dest.kind == "mlp" and e.src.kind == "head"
                                              and e.src.layer == e.dest.layer)] \
        == [e.name for e in par.edges]
    assert len(CircuitGraph(2, 4, parallel=True, n_positions=3)) == 3 * 102
    assert [e.name for e in par.edges] == reference_edge_names(2, 4, False, parallel=True)
    assert [e.name for e in seq.edges] == reference_edge_names(2, 4, False)
    assert par != seq and par == CircuitGraph.from_shape(par.shape)
    assert seq.shape == (2, 4, False, None, False, 4, False)
    assert CircuitGraph.from_shape(seq.shape) == seq
    assert CircuitGraph(2, 4, attn_only=True, parallel=True) == CircuitGraph(2, 4, attn_only=True)
    assert "parallel=True" in repr(par) and "parallel" not in repr(seq)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_forward_equals_the_bridge(parallel_model, name):
    """The engine's clean run and its recomputations give the bridge's own logits."""
    assert_engine_forward_equals_bridge(*parallel_model(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_removed_mlp_edges_equal_the_reference(parallel_model, name):
    """Logits with MLP edges removed (the MLP's input patched: GPT-NeoX's ``hook_mlp_in``,
    Phi's ``ln1.hook_in``) equal the reference's, from a full pass and, with no edge below it
    removed, from the last MLP's stage."""
    bridge, weights = parallel_model(name)
    clean, corrupt = token_pairs(batch=3, pos=5, d_vocab=VOCAB, seed=2)
    graph = CircuitGraph(weights.n_layers, weights.n_heads, parallel=True)
    removed = ["A0.1->MLP1", "Embed->MLP1", "MLP0->MLP1", "Embed->MLP0"]
    runner = CircuitRunner(weights, graph, clean, corrupt, "mean", last_position_only=False)
    for edge in removed:
        runner.set_removed(graph.edge(edge), True)
    theirs = reference_logits(bridge, clean, corrupt, removed, "mean")
    assert (theirs - runner.full_logits).abs().max().item() > 1e-3     # the patches do act
    assert (runner.logits_from(0, "attn") - theirs).abs().max().item() <= 1e-12
    runner.set_removed(graph.edge("Embed->MLP0"), False)   # from MLP1 on: nothing below removed
    theirs = reference_logits(bridge, clean, corrupt, removed[:3], "mean")
    assert (runner.logits_from(1, "mlp") - theirs).abs().max().item() <= 1e-12


@pytest.mark.parametrize(("name", "ablation", "positions"),
                         [(n, a, p) for n, cases in sorted(CASES.items()) for a, p in cases])
def test_engine_equals_reference_on_parallel_models(parallel_model, name, ablation, positions):
    """Every step (edge, decision, metrics) equals the brute-force reference's, for K = 1, 4
    and the adaptive K."""
    bridge, weights = parallel_model(name)
    traces = assert_engine_equals_reference(bridge, weights, tau=TAU, ablation=ablation,
                                            positions=positions, hypotheses=HYPOTHESES,
                                            tolerance=METRIC_TOLERANCE, label=name)
    assert all(trace.graph.parallel for trace in traces)

def test_parallel_trace_saves_loads_and_renders(parallel_model, tmp_path):
    """A parallel model's trace records ``parallel`` in its graph section, loads back to the
    same graph, and draws; a sequential trace does not carry the key."""
    from acdc_viz.figure import build_figure

    _, weights = parallel_model("gpt_neox")
    clean, corrupt = token_pairs(batch=2, pos=4, d_vocab=VOCAB)
    trace = Acdc(weights, TokenPairs(clean, corrupt), tau=TAU, positions=True,
                 dtype=torch.float64).run()
    d = trace.to_dict()
    assert d["graph"]["parallel"] is True
    assert not any(e.startswith("A1.") and "->MLP1" in e for e in d["graph"]["edges"])
    path = tmp_path / "parallel.json"
    save_trace(trace, path)
    loaded = load_trace(path)
    assert loaded.graph == trace.graph and loaded.graph.parallel
    assert [s.edge for s in loaded.steps] == [s.edge for s in trace.steps]
    assert len(build_figure(loaded).data) > 0
    without = d | {"graph": {k: v for k, v in d["graph"].items() if k != "parallel"}}
    with pytest.raises(TraceError, match="edges"):     # the edges are not a sequential graph's
        Trace.from_dict(without)
