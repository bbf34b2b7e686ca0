"""The batched ACDC engine on grouped- and multi-query attention, against the brute-force
reference (issue 13).

With fewer key/value heads than query heads, keys and values are computed once per KV group, so
their inputs are destinations per group, ``A{l}.kv{g}.k|v`` (``../shared/DESIGN.md``, "Names").
The reference patches group g's copy of the bridge's split ``hook_k_input`` / ``hook_v_input``
(batch, pos, n_kv_heads, d_model). Families: Llama (4 query heads sharing 2 KV heads; SwiGLU,
RMSNorm), Llama with multi-query attention and tied embeddings, Qwen2 (biases on q, k, v), Gemma
(GeGLU, ``1 + w`` norm, embedding scale), Falcon-7B style (multi-query, parallel attention
and MLP sharing one LayerNorm), Qwen3 (per-head RMSNorm of q and k before rotary; d_head 24 with
d_model 64), Mistral (sliding window; 2 positions in the ACDC runs on 4-token prompts, so
that the window hides keys; see ``test_the_sliding_window_matters``) and Gemma 2 (sandwich norms:
each layer's normed attention output ``A{l}`` is its one attention source, docs/model-families.md
§5; soft caps on scores and logits; a local and a global layer; attention scale from
``query_pre_attn_scalar``). Every decision equals the
reference's for resample, zero and mean ablation, with and without positions (causal-prefix
reuse on), K = 1, 4 and adaptive.
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

from acdc_viz.patching import CircuitRunner

torch.set_num_threads(1)

TAU = 3e-3
METRIC_TOLERANCE = 1e-9
#: Gemma 2 applies its RMSNorm weights in float32 (``Norm.upcast == "all"``), also to the normed
#: attention and MLP outputs it adds to the stream. An input that engine and reference sum in a
#: different order (1e-16 apart) can round to neighbouring float32 values there, so their metrics
#: may differ by a float32 rounding of the outputs (measured up to 4.9e-9 with mean ablation;
#: 3e-16 with resample and zero). The decisions are still all equal, and with both sides in pure
#: float64 the metrics agree to 3e-16 (``test_gemma2_in_pure_float64``).
TOLERANCE = {"gemma2": 1e-7}
FULL = [(a, p) for a in ("resample", "zero", "mean") for p in (False, True)]
SOME = [("resample", True), ("zero", False), ("mean", True)]
CASES = {"llama": FULL, "llama-mqa-tied": SOME, "qwen2": SOME, "gemma": SOME, "falcon": SOME,
         "qwen3": SOME, "mistral-window2": SOME, "gemma2": FULL,
         # the rope scalings the adapter reads (yarn: tests/test_engine_rotary.py), with positions
         # so that passes rotate from a later first position
         **{f"llama-rope-{kind}": [("resample", True)] for kind in ("linear", "dynamic", "llama3")}}


@pytest.fixture(scope="module")
def gqa_model(family, tmp_path_factory):
    """``gqa_model(name)``: (bridge, weights) of a grouped-query family of ``CASES``."""
    from model_families import build_mistral

    from acdc_viz.models.adapter import from_model

    built: dict = {}

    def get(name):
        if name not in built:
            bridge = (build_mistral(tmp_path_factory.mktemp(name), sliding_window=2).bridge
                      if name == "mistral-window2" else family(name).bridge)
            weights = from_model(bridge)
            assert weights.kv_group is not None and weights.n_kv_heads < weights.n_heads
            built[name] = bridge, weights
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_forward_equals_the_bridge(gqa_model, name):
    """The engine's clean run and its recomputations give the bridge's own logits."""
    assert_engine_forward_equals_bridge(*gqa_model(name))


@pytest.mark.parametrize(("name", "ablation", "positions"),
                         [(n, a, p) for n, cases in sorted(CASES.items()) for a, p in cases])
def test_engine_equals_reference_on_grouped_query_models(gqa_model, name, ablation, positions):
    """Every step (edge, decision, metrics) equals the brute-force reference's, for K = 1, 4
    and the adaptive K; some key/value edges are removed and some kept."""
    bridge, weights = gqa_model(name)
    traces = assert_engine_equals_reference(
        bridge, weights, tau=TAU, ablation=ablation, positions=positions,
        tolerance=TOLERANCE.get(name, METRIC_TOLERANCE), label=name)
    kv_steps = [s for s in traces[0].steps if ".kv" in s.edge]
    assert kv_steps and traces[0].graph.grouped


def test_graph_mismatch_is_refused(gqa_model):
    """A graph built without the model's KV groups is refused, with the fix named."""
    from acdc_viz.errors import SettingsError
    from acdc_viz.graph import CircuitGraph

    _, weights = gqa_model("llama")
    clean, corrupt = token_pairs(batch=2, pos=4, d_vocab=VOCAB)
    with pytest.raises(SettingsError, match="key/value heads.*circuit_graph"):
        CircuitRunner(weights, CircuitGraph(weights.n_layers, weights.n_heads), clean, corrupt)


def test_grouped_query_graph_names_order_and_count():
    """Per layer: a q input per query head, a k and a v input per KV group, in the reference's
    visit order; group g's inputs are read by heads g*r .. g*r + r - 1."""
    from reference_acdc import reference_edge_names

    from acdc_viz.graph import CircuitGraph

    graph = CircuitGraph(2, 4, n_kv_heads=2)
    assert [e.name for e in graph.edges] == reference_edge_names(2, 4, False, n_kv=2)
    assert [e.name for e in CircuitGraph(2, 4, n_kv_heads=1, attn_only=True,
                                         n_positions=3).edges] \
        == reference_edge_names(2, 4, True, 3, n_kv=1)
    # Out 11 + MLP1 10 + 8 inputs of layer 1 x 6 + MLP0 5 + 8 inputs of layer 0 x 1, vs 110
    assert (len(graph), len(CircuitGraph(2, 4))) == (82, 110)
    dest = graph.edge("A0.1->A1.kv1.k").dest
    assert (dest.kind, dest.head, dest.group, dest.heads, dest.node) == ("k", None, 1, (2, 3),
                                                                          "A1.kv1")
    assert graph.reading_nodes(dest) == ("A1.2", "A1.3")
    assert "A1.1.k" not in {d.name for d in graph.destinations}
    assert CircuitGraph(2, 4, n_kv_heads=4) == CircuitGraph(2, 4)     # MHA: names unchanged
    assert CircuitGraph.from_shape(graph.shape) == graph != CircuitGraph(2, 4)
    assert "n_kv_heads=2" in repr(graph)
    nx_graph = graph.to_networkx()
    assert {(u, v) for u, v, k in nx_graph.edges(keys=True) if k == "A0.1->A1.kv1.k"} \
        == {("A0.1", "A1.2"), ("A0.1", "A1.3")}
    with pytest.raises(ValueError, match="divide"):
        CircuitGraph(2, 4, n_kv_heads=3)


def test_kv_ports_are_drawn_once_between_their_heads():
    """The seq grid draws each head's q port on its rim and each KV group's k and v ports once,
    below the middle of the group's heads (k left, v right)."""
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.layout import layout_of

    lay = layout_of(CircuitGraph(2, 4, n_kv_heads=2, n_positions=2))
    assert "A1.2.k@1" not in lay.ports and "A1.2.q@1" in lay.ports
    (x2, y), (x3, _) = lay.nodes["A1.2@1"], lay.nodes["A1.3@1"]
    (kx, ky), (vx, vy) = lay.ports["A1.kv1.k@1"], lay.ports["A1.kv1.v@1"]
    assert x2 < kx < (x2 + x3) / 2 < vx < x3 and ky == vy < y


def test_a_grouped_query_trace_speaks_the_new_names(gqa_model, tmp_path):
    """Trace (schema, save, load), figure (ports, hover texts, node degrees), paths_through,
    node-level ROC and auto-circuit's acdc_prune_scores all carry ``A{l}.kv{g}.k|v``."""
    from acdc_viz import Acdc, TokenPairs, acdc_prune_scores
    from acdc_viz.evaluate import edge_nodes
    from acdc_viz.figure import build_figure, paths_through
    from acdc_viz.trace import load_trace, save_trace

    _, weights = gqa_model("llama")
    clean, corrupt = token_pairs(batch=3, pos=4, d_vocab=VOCAB)
    trace = Acdc(weights, TokenPairs(clean, corrupt), tau=TAU, dtype=torch.float64).run()
    save_trace(trace, tmp_path / "gqa.json")
    text = (tmp_path / "gqa.json").read_text()
    assert '"n_kv_heads": 2' in text and "A0.1->A1.kv0.v" in text
    loaded = load_trace(tmp_path / "gqa.json")
    assert loaded.graph == trace.graph and loaded.final_kept_edges == trace.final_kept_edges

    fig = build_figure(loaded)
    hover = next(t for t in fig.data if t.name == "edges and ports")
    texts = dict(zip(hover.customdata, hover.hovertext, strict=True))
    assert "shared by A1.0, A1.1" in texts["A1.kv0.k"] and "A1.0.k" not in texts
    kept = set(loaded.final_kept_edges)
    kv_kept = sorted(e for e in kept if ".kv" in e and not e.startswith("Embed"))
    assert kv_kept, "the circuit should keep some key/value edge from a head"
    edge = loaded.graph.edge(kv_kept[0])
    for reader in loaded.graph.reading_nodes(edge.dest):     # the port feeds each head of it
        if any(e.startswith(f"{reader}->") for e in kept):
            assert kv_kept[0] in paths_through(loaded, None, reader)
    assert f"A{edge.dest.layer}.kv{edge.dest.group}" in edge_nodes(kept)

    class Batch:
        def __init__(self):
            self.clean, self.corrupt = clean, corrupt

    scores = acdc_prune_scores(weights, [Batch()], tao_exps=[-3], tao_bases=[3],
                               dtype=torch.float64)
    assert set(scores) == {e.name for e in trace.graph.edges}


@pytest.mark.parametrize(("name", "window", "pos"), [("mistral", 4, 6), ("mistral-window2", 2, 4)])
def test_the_sliding_window_matters(gqa_model, name, window, pos):
    """Mistral's window hides keys in the prompts of the checks above: without it the logits
    differ, so the equalities above test the window."""
    import dataclasses

    bridge, weights = gqa_model(name)
    assert [layer.window for layer in weights.layers] == [window, window]
    unwindowed = dataclasses.replace(weights, layers=[dataclasses.replace(layer, window=None)
                                                      for layer in weights.layers])
    clean, _ = token_pairs(batch=3, pos=pos, d_vocab=VOCAB)
    with torch.no_grad():
        assert (unwindowed.forward(clean) - bridge(clean)).abs().max() > 1e-3
        assert (weights.forward(clean) - bridge(clean)).abs().max() <= 1e-12


def test_gemma2_in_pure_float64(tmp_path, monkeypatch):
    """Gemma 2's looser metric tolerance is its float32 norms, not the engine: with HF's norm
    and the adapter's both computed in float64, the mean-ablation run agrees to rounding."""
    import dataclasses

    import transformers.models.gemma2.modeling_gemma2 as gemma2
    from model_families import build_gemma2

    from acdc_viz.models.adapter import Norm, from_model

    def float64_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(gemma2.Gemma2RMSNorm, "forward", float64_norm)
    bridge = build_gemma2(tmp_path).bridge

    def plain(norm):
        return dataclasses.replace(norm, upcast="") if isinstance(norm, Norm) else norm

    weights = from_model(bridge)
    weights = dataclasses.replace(weights, ln_final=plain(weights.ln_final), layers=[
        dataclasses.replace(layer, ln1=plain(layer.ln1), ln2=plain(layer.ln2),
                            post_attn_norm=plain(layer.post_attn_norm),
                            post_mlp_norm=plain(layer.post_mlp_norm))
        for layer in weights.layers])
    assert_engine_equals_reference(bridge, weights, tau=TAU, ablation="mean", positions=False,
                                   tolerance=METRIC_TOLERANCE, label="gemma2 float64")


def test_sandwich_graph_trace_and_figure(gqa_model, tmp_path):
    """With sandwich norms each layer's attention is one source ``A{l}`` (the reference's order
    and names); heads stay destinations, drawn below a hexagon ``A{l}`` with fixed dotted links
    into it, which ``paths_through`` follows; the trace records ``sandwich``."""
    from reference_acdc import reference_edge_names

    from acdc_viz import Acdc, TokenPairs
    from acdc_viz.figure import build_figure, paths_through
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.trace import load_trace, save_trace

    graph = CircuitGraph(2, 4, n_kv_heads=2, sandwich=True)
    assert [e.name for e in graph.edges] == reference_edge_names(2, 4, False, n_kv=2,
                                                                 sandwich=True)
    assert [s.name for s in graph.sources] == ["Embed", "A0", "MLP0", "A1", "MLP1"]
    assert len(graph) == 43 and CircuitGraph.from_shape(graph.shape) == graph
    assert ("A1.2", "A1") in graph.head_links()
    _, weights = gqa_model("gemma2")
    assert weights.sandwich and weights.circuit_graph() == graph
    assert (weights.attn_softcap, weights.final_softcap) == (2.0, 3.0)
    clean, corrupt = token_pairs(batch=3, pos=4, d_vocab=VOCAB)
    trace = Acdc(weights, TokenPairs(clean, corrupt), tau=TAU, dtype=torch.float64).run()
    save_trace(trace, tmp_path / "gemma2.json")
    assert '"sandwich": true' in (tmp_path / "gemma2.json").read_text()
    loaded = load_trace(tmp_path / "gemma2.json")
    assert loaded.graph == graph
    fig = build_figure(loaded)
    (links,) = fig.layout.shapes
    assert links.path.count("M ") == 2 * 4 and links.line.dash == "dot"
    nodes = next(t for t in fig.data if t.name == "nodes")
    texts = dict(zip(nodes.customdata, nodes.hovertext, strict=True))
    assert "normed (sandwich norm)" in texts["A0"]
    kept = set(loaded.final_kept_edges)
    fed = [h for h in range(4) if f"Embed->A0.{h}.q" in kept]   # a head the circuit reads into
    assert fed
    for head in fed:              # its output reaches Out through A0 (the fixed link)
        assert {e for e in kept if e.startswith("A0->")} <= paths_through(loaded, None,
                                                                         f"A0.{head}")


def test_test_mode_names_what_its_slow_path_does_not_recompute(family):
    """test_mode's hooked slow path rebuilds q/k/v GPT-2 style; on a modern model it refuses,
    naming the features, instead of reporting false disagreements."""
    from acdc_viz import Acdc, TokenPairs
    from acdc_viz.errors import SettingsError

    clean, corrupt = token_pairs(batch=2, pos=4, d_vocab=VOCAB)
    with pytest.raises(SettingsError, match="rotary embeddings, grouped-query attention"):
        Acdc(family("llama").bridge, TokenPairs(clean, corrupt), tau=TAU, test_mode=True)
