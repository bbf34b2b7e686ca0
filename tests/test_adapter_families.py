"""The per-head adapter on every decoder family of issue 13 (``tests/model_families.py``).

For each family the adapter supports, ``from_model(bridge).forward(tokens)`` equals the bridge's
own logits in float64: measured 0 to 3e-15 (docs/model-families.md, "Adapter support"), because
the adapter repeats Hugging Face's float32 steps (RMSNorm, OLMo's LayerNorm, the eager softmax,
GPT-J's scores, rotary angles). Every family it does not model is refused, naming the feature,
before any weight is read. The ACDC engine runs a gated-MLP model exactly here (checked against
the brute-force reference); rotary models in tests/test_engine_rotary.py, parallel blocks in
tests/test_engine_parallel.py, grouped- and multi-query attention in tests/test_engine_gqa.py.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    assert_engine_forward_equals_bridge,
    assert_same_decisions_for_every_k,
    token_pairs,
)
from model_families import FAMILIES, KNOWN_BROKEN, VOCAB, FamilyModel, build_llama
from reference_acdc import reference_acdc

from acdc_viz import Acdc, TokenPairs
from acdc_viz.errors import ModelSupportError, SettingsError
from acdc_viz.graph import CircuitGraph
from acdc_viz.models.adapter import Norm, TransformerWeights, from_model
from acdc_viz.patching import CircuitRunner

torch.set_num_threads(1)

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
#: The adapter's float64 logits against the bridge's. Measured: 0 for the families whose bridge
#: hands attention to Hugging Face's code, <= 3e-15 for GPT-NeoX, Phi, GPT-J and Falcon.
TOLERANCE = 1e-12

# name: (rotary dim, interleaved pairs, kv heads, gated MLP, parallel, MLP has its own norm,
#        float32 softmax, float32 scores, unembedding bias, embedding scale)
SUPPORTED = {
    "gpt_neox": (4, False, 4, False, True, True, False, False, False, None),
    "gpt_neox-sequential": (4, False, 4, False, False, True, False, False, False, None),
    "llama": (16, False, 2, True, False, True, True, False, False, None),
    "llama-mqa-tied": (16, False, 1, True, False, True, True, False, False, None),
    "llama-rope-linear": (16, False, 2, True, False, True, True, False, False, None),
    "llama-rope-dynamic": (16, False, 2, True, False, True, True, False, False, None),
    "llama-rope-llama3": (16, False, 2, True, False, True, True, False, False, None),
    "llama-rope-yarn": (16, False, 2, True, False, True, True, False, False, None),
    "qwen2": (16, False, 2, True, False, True, True, False, False, None),
    "qwen3": (24, False, 2, True, False, True, True, False, False, None),
    "mistral": (16, False, 2, True, False, True, True, False, False, None),
    "gemma": (16, False, 2, True, False, True, True, False, False, 8.0),
    "gemma2": (16, False, 2, True, False, True, True, False, False, 8.0),
    "phi": (8, False, 4, False, True, False, True, False, True, None),
    "gptj": (8, True, 4, False, True, False, False, True, True, None),
    "olmo": (16, False, 4, True, False, True, True, False, False, None),
    "olmo-clip-qkv": (16, False, 4, True, False, True, True, False, False, None),
    "falcon": (16, False, 1, False, True, False, False, False, False, None),
    "bloom": (None, False, 4, False, False, True, True, False, False, None),   # ALiBi
}
#: Refused families: the words the ModelSupportError must contain.
REFUSED = {
    "olmo2": ["post-norms without pre-norms", "q/k norms over all heads"],
    "falcon-new-decoder": ["new_decoder_architecture"],
    "falcon-alibi": ["ALiBi"],
}
# phi-qk-layernorm does not boot in TransformerLens 4.3 (KNOWN_BROKEN); its config is refused
# in test_refused_configs.
def test_every_family_is_classified():
    booting = set(FAMILIES) - {n for n, (exc, _) in KNOWN_BROKEN.items() if exc is RuntimeError}
    assert set(SUPPORTED) | set(REFUSED) == booting
    assert not set(SUPPORTED) & set(REFUSED)


def _max_error(fm: FamilyModel, weights: TransformerWeights) -> float:
    with torch.no_grad():
        theirs = fm.bridge(TOKENS)
        ours = weights.forward(TOKENS)
    assert ours.dtype == theirs.dtype == torch.float64
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_adapter_reproduces_the_bridge_in_float64(name, family):
    fm = family(name)
    weights = from_model(fm.bridge, TOKENS)
    err = _max_error(fm, weights)
    print(f"{name}: max |adapter - bridge| = {err:.3g}")
    assert err <= TOLERANCE, f"{name}: max |logit diff| {err:.3g}"


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_what_the_adapter_reads(name, family):
    """The architecture features read per family, K/V stored per KV group (not expanded)."""
    (rot_dim, interleaved, n_kv, gated, parallel, own_ln2, softmax32, scores32, b_U,
     embed_scale) = SUPPORTED[name]
    weights = from_model(family(name).bridge)
    assert (weights.alibi_slopes is not None) == (rot_dim is None)
    if rot_dim is None:
        assert weights.rotary is None
    else:
        assert weights.rotary is not None and weights.rotary.dim == rot_dim
        assert weights.rotary.interleaved == interleaved
        assert weights.rotary.inv_freq.dtype == torch.float32
        assert (weights.rotary.dynamic is not None) == (name == "llama-rope-dynamic")
    assert weights.n_kv_heads == n_kv
    layer = weights.layers[0]
    assert layer.W_K.shape[0] == layer.W_V.shape[0] == layer.b_K.shape[0] == n_kv  # not expanded
    assert layer.W_Q.shape[0] == weights.n_heads == 4
    if n_kv < 4:
        assert weights.kv_group == tuple(h // (4 // n_kv) for h in range(4))
    assert (layer.W_gate is not None) == gated
    assert weights.parallel == parallel
    assert (layer.ln2 is not layer.ln1) == own_ln2
    assert weights.softmax_dtype == (torch.float32 if softmax32 else None)
    assert weights.scores_dtype == (torch.float32 if scores32 else None)
    assert bool(weights.b_U.abs().max() > 0) == b_U
    assert weights.embed_scale == embed_scale
    assert weights.W_pos is None


def test_missing_biases_are_zeros_and_norms_follow_hf(family):
    """Bias-free projections read as zeros; each norm in Hugging Face's form."""
    llama = from_model(family("llama").bridge).layers[0]
    for bias in (llama.b_Q, llama.b_K, llama.b_V, llama.b_O, llama.b_in, llama.b_out):
        assert bias.abs().max() == 0
    assert llama.b_K.shape == (2, 16) and llama.b_O.shape == (64,)
    assert isinstance(llama.ln1, Norm) and llama.ln1.upcast == "normed"
    gemma = from_model(family("gemma").bridge).layers[0].ln1
    assert isinstance(gemma, Norm) and (gemma.offset, gemma.upcast) == (1.0, "all")
    olmo = from_model(family("olmo").bridge).layers[0].ln1
    assert isinstance(olmo, Norm) and olmo.weight is None and olmo.bias is None
    qwen2 = from_model(family("qwen2").bridge).layers[0]
    assert qwen2.b_Q.abs().max() > 0 and qwen2.b_K.shape == (2, 16) and qwen2.b_O.abs().max() == 0


def test_float32_islands_are_what_makes_it_exact(family):
    """Without mirroring Hugging Face's float32 steps the error is ~1e-7, not ~0; without
    dynamic rope's rescaling (12 tokens > max_position_embeddings 8) the logits are wrong."""
    fm = family("llama")
    weights = from_model(fm.bridge)
    assert _max_error(fm, dataclasses.replace(weights, softmax_dtype=None)) > 1e-9
    plain = [dataclasses.replace(w, ln1=dataclasses.replace(w.ln1, upcast=""))
             for w in weights.layers]
    assert _max_error(fm, dataclasses.replace(weights, layers=plain)) > 1e-9
    fm = family("llama-rope-dynamic")
    weights = from_model(fm.bridge)
    assert weights.rotary is not None
    unscaled = dataclasses.replace(weights.rotary, dynamic=None)
    assert _max_error(fm, dataclasses.replace(weights, rotary=unscaled)) > 1e-6


def test_other_dtypes_keep_the_rotary_frequencies_in_float32(family):
    fm = family("phi")
    weights = from_model(fm.bridge)
    single = weights.to(dtype=torch.float32)
    assert single.rotary is not None and single.rotary.inv_freq.dtype == torch.float32
    assert single.layers[0].W_Q.dtype == torch.float32
    with torch.no_grad():
        err = (single.forward(TOKENS).double() - weights.forward(TOKENS)).abs().max().item()
    assert err < 1e-4


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_families_name_the_feature(name, family):
    with pytest.raises(ModelSupportError) as info:
        from_model(family(name).bridge)
    message = str(info.value)
    for words in REFUSED[name]:
        assert words in message, (name, message)
    assert "ACDC runs today on GPT-2-style" in message and "Llama" in message


class _NoWeights:
    """A model whose configs say everything and which has no weights: a refusal must come from
    the configs alone, before any weight is read."""

    def __init__(self, hf_config):
        self.cfg = SimpleNamespace(n_layers=2, n_heads=4, d_head=16, n_ctx=32, d_vocab=VOCAB,
                                   positional_embedding_type="rotary", normalization_type="RMS",
                                   act_fn="silu", attn_only=False)
        self.original_model = SimpleNamespace(config=hf_config)

    def __getattr__(self, name):
        if name.startswith(("W_", "b_")) or name == "state_dict":
            raise AssertionError(f"read {name} before refusing")
        raise AttributeError(name)              # no module tree either


def _configs():
    """Hugging Face configs of features no fixture boots, by the words their refusal names."""
    import transformers as tr

    return {
        "mixture-of-experts": tr.MixtralConfig(num_local_experts=4),
        "encoder-decoder": tr.T5Config(),
        "state-space": tr.MambaConfig(),
        "multimodal": tr.LlavaConfig(),
        "q/k norms": tr.PhiConfig(qk_layernorm=True),
        "rope scaling 'longrope'": tr.LlamaConfig(rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8, "original_max_position_embeddings": 8}),
    }


@pytest.mark.parametrize("feature", sorted(_configs()))
def test_refused_configs(feature):
    with pytest.raises(ModelSupportError, match="cannot give per-head access") as info:
        from_model(_NoWeights(_configs()[feature]))
    assert feature in str(info.value)


def test_sliding_windows_per_layer(family):
    """Which layers attend through a sliding window: Mistral every layer, Qwen2 none unless
    ``use_sliding_window`` (then the layers from ``max_window_layers`` on), Gemma 2 the ones its
    ``layer_types`` call sliding."""
    import transformers as tr

    from acdc_viz.models.support import sliding_windows

    config = family("qwen2").bridge.original_model.config
    assert config.use_sliding_window is False
    assert [w.window for w in from_model(family("qwen2").bridge).layers] == [None, None]
    assert [w.window for w in from_model(family("qwen3").bridge).layers] == [None, None]
    assert sliding_windows(family("mistral").bridge.original_model.config, 2) == [4, 4]
    qwen2 = tr.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                           num_hidden_layers=3)
    assert sliding_windows(qwen2, 3) == [None, 4, 4]
    gemma2 = family("gemma2").bridge.original_model.config
    expected = [gemma2.sliding_window if "sliding" in t else None for t in gemma2.layer_types]
    assert sliding_windows(gemma2, 2) == expected and None in expected


def test_engine_takes_every_family_the_adapter_reads(family):
    """Acdc and CircuitRunner take grouped-query, multi-query and parallel models, and GPT-J;
    they refuse a graph that disagrees with the model's blocks or key/value heads."""
    clean, corrupt = token_pairs(batch=2, pos=4, d_vocab=VOCAB)
    for name in ("gpt_neox", "phi", "falcon", "llama", "gpt_neox-sequential", "gptj"):
        weights = from_model(family(name).bridge)
        CircuitRunner(weights, weights.circuit_graph(), clean, corrupt)
        if weights.parallel:                                      # the graph must agree
            with pytest.raises(SettingsError, match="blocks are parallel"):
                CircuitRunner(weights, CircuitGraph(weights.n_layers, weights.n_heads,
                                                    n_kv_heads=weights.n_kv_heads),
                              clean, corrupt)


def test_gptj_engine_is_exact_to_its_bridge_and_the_same_for_every_k(family):
    """GPT-J's bridge has no split-input hooks, so the brute-force reference checks it through
    TransformerLens 3 (tests/test_tl3_families.py, ``make test-tl3``). Here: the engine's clean
    run and recomputations give the bridge's logits (float32 scores mirrored), and K = 1, 4 and
    adaptive give the same trace."""
    bridge = family("gptj").bridge
    weights = from_model(bridge)
    assert weights.scores_dtype == torch.float32 and weights.rotary.interleaved
    assert_engine_forward_equals_bridge(bridge, weights)
    assert_same_decisions_for_every_k(weights)


@pytest.fixture(scope="module")
def gated_no_rotary(tmp_path_factory):
    """A Llama (SwiGLU, RMSNorm, no biases, multi-head) whose rotary module rotates by angle 0:
    to the bridge, exactly a gated-MLP model without rotary, which the engine runs."""
    fm = build_llama(tmp_path_factory.mktemp("llama_mha"), num_key_value_heads=4)
    for module in fm.hf.modules():
        if type(module).__name__ == "LlamaRotaryEmbedding":
            module.inv_freq.zero_()
            module.original_inv_freq.zero_()
    weights = from_model(fm.bridge)
    assert weights.rotary is not None and weights.kv_group is None and not weights.parallel
    weights = dataclasses.replace(weights, rotary=None)
    assert _max_error(fm, weights) == 0.0
    # Without the float32 softmax, clean run and passes both take SDPA's float64 softmax.
    return fm.bridge, dataclasses.replace(weights, softmax_dtype=None)


@pytest.mark.parametrize(("ablation", "positions", "hypotheses"),
                         [("resample", False, 1), ("zero", False, 4), ("mean", False, None),
                          ("resample", True, 8)])
def test_engine_runs_a_gated_mlp_exactly(gated_no_rotary, ablation, positions, hypotheses):
    """Every decision equals the brute-force reference's, run through the bridge's own
    split-input hooks (metrics agree to the bridge's float32 softmax, ~1e-7)."""
    bridge, weights = gated_no_rotary
    assert weights.layers[0].W_gate is not None
    clean, corrupt = token_pairs(batch=3, pos=4, d_vocab=VOCAB)
    trace = Acdc(weights, TokenPairs(clean, corrupt), tau=3e-3, ablation=ablation,
                 positions=positions, dtype=torch.float64, batch_hypotheses=hypotheses).run()
    ref = reference_acdc(bridge, clean, corrupt, tau=3e-3, ablation=ablation, positions=positions)
    assert [(s.edge, s.removed) for s in trace.steps] == [(r.edge, r.removed) for r in ref]
    for ours, theirs in zip(trace.steps, ref, strict=True):
        assert ours.metric_after == pytest.approx(theirs.metric_after, rel=1e-5, abs=1e-6)
    removed = sum(s.removed for s in trace.steps)
    assert 0 < removed < len(trace.steps)


def test_clip_qkv_bites(family):
    """OLMo's clip_qkv (0.5 here) clamps q, k and v right after their projection: without it the
    adapter's logits would differ from the bridge's, so the exactness checks test it."""
    fm = family("olmo-clip-qkv")
    weights = from_model(fm.bridge)
    assert {layer.clip_qkv for layer in weights.layers} == {0.5}
    unclipped = dataclasses.replace(weights, layers=[dataclasses.replace(layer, clip_qkv=None)
                                                     for layer in weights.layers])
    assert _max_error(fm, weights) <= TOLERANCE < 1e-3 < _max_error(fm, unclipped)
