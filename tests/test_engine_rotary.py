"""The batched ACDC engine on rotary models, against the bridge and the brute-force reference.

Families without grouped-query attention and without parallel blocks (issue 13): Llama with as
many key/value heads as query heads (SwiGLU, RMSNorm, no biases; also with yarn rope, whose
cos/sin carry an ``attention_scaling``), OLMo 1 (parameter-free LayerNorm), GPT-NeoX with
sequential blocks (partial rotary, biases) and Gemma with multi-head attention (``1 + w``
RMSNorm, embedding scale). All are float64 models whose Hugging Face attention takes its softmax
in float32 (except GPT-NeoX's bridge, which stays in float64); the engine mirrors that, and so
does the reference, which runs the bridge's own forward through its split-input hooks. So the
metrics agree to float64 rounding (measured <= 1e-15) and every decision is equal: for every
ablation, with and without positions (causal-prefix reuse on), with K = 1, 4 and the adaptive K.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_engine_equals_reference,
    assert_engine_forward_equals_bridge,
    token_pairs,
)
from model_families import ROPE_SCALING, VOCAB, build_gemma, build_llama
from reference_acdc import reference_acdc

from acdc_viz import Acdc, TokenPairs
from acdc_viz.models.adapter import from_model

torch.set_num_threads(1)

TAU = 3e-3
#: Metrics of engine and reference, both float64 with HF's float32 softmax mirrored.
METRIC_TOLERANCE = 1e-9
#: (ablation, positions) per family: the full matrix on Llama, three cases on the others. Each
#: case runs the reference once and the engine with every K of ``HYPOTHESES``.
FULL = [(a, p) for a in ("resample", "zero", "mean") for p in (False, True)]
SOME = [("resample", False), ("zero", True), ("mean", False)]
CASES = {"llama-mha": FULL, "llama-mha-yarn": [("resample", False)],
         "gpt_neox-sequential": SOME, "olmo": SOME, "gemma-mha": SOME,
         "olmo-clip-qkv": SOME}
HYPOTHESES = (1, 4, None)


@pytest.fixture(scope="module")
def rotary_model(tmp_path_factory, family):
    """``rotary_model(name)``: (bridge, weights) of one of the families in ``CASES``."""
    builders = {
        "llama-mha": lambda d: build_llama(d, num_key_value_heads=4),
        "llama-mha-yarn": lambda d: build_llama(d, num_key_value_heads=4,
                                                rope_scaling=ROPE_SCALING["yarn"]),
        "gemma-mha": lambda d: build_gemma(d, num_key_value_heads=4),
    }
    built: dict = {}

    def get(name):
        if name not in built:
            fm = (builders[name](tmp_path_factory.mktemp(name)) if name in builders
                  else family(name))
            weights = from_model(fm.bridge)
            assert weights.rotary is not None and weights.kv_group is None
            assert not weights.parallel
            built[name] = fm.bridge, weights
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_forward_equals_the_bridge(rotary_model, name):
    """The engine's clean run and its recomputations give the bridge's own logits."""
    assert_engine_forward_equals_bridge(*rotary_model(name))


@pytest.mark.parametrize(("name", "ablation", "positions"),
                         [(n, a, p) for n, cases in sorted(CASES.items()) for a, p in cases])
def test_engine_equals_reference_on_rotary_models(rotary_model, name, ablation, positions):
    """Every step (edge, decision, metrics) equals the brute-force reference's, for K = 1, 4
    and the adaptive K."""
    bridge, weights = rotary_model(name)
    assert_engine_equals_reference(bridge, weights, tau=TAU, ablation=ablation,
                                   positions=positions, hypotheses=HYPOTHESES,
                                   tolerance=METRIC_TOLERANCE, label=name)

def test_all_positions_metric_on_a_rotary_model(rotary_model):
    """The metric over every position (the causal prefix's logits come from the cache)."""
    bridge, weights = rotary_model("llama-mha")
    clean, corrupt = token_pairs(batch=2, pos=4, d_vocab=VOCAB, seed=3)
    ref = reference_acdc(bridge, clean, corrupt, tau=TAU, positions=True, all_positions=True)
    trace = Acdc(weights, TokenPairs(clean, corrupt), tau=TAU, positions=True,
                 all_positions=True, dtype=torch.float64, batch_hypotheses=4).run()
    assert [(s.edge, s.removed) for s in trace.steps] == [(r.edge, r.removed) for r in ref]
    for ours, theirs in zip(trace.steps, ref, strict=True):
        assert abs(ours.metric_after - theirs.metric_after) <= METRIC_TOLERANCE
    assert 0 < sum(r.removed for r in ref) < len(ref)
