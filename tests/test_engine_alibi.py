"""The ACDC engine on Bloom: ALiBi position biases, a LayerNorm after the embedding, Bloom's own
tanh GELU and its float32 softmax.

ALiBi adds ``slope_h * key position`` to head h's scores (Hugging Face rounds it in float32 and
casts it); it is per head and per key, so a head's output still depends on its own inputs only:
the graph is unchanged. Bloom's TL 4 bridge hands each head its input *after* ln1
(``hook_q_input`` equals ``ln1.hook_out``), so the brute-force reference cannot patch the stream
per head on it: it checks Bloom through TransformerLens 3's ``HookedTransformer`` of the same
weights (``tests/test_tl3_families.py``, ``make test-tl3``; every decision equal, metrics within
1.3e-8). Here: the adapter and the engine against the bridge's logits, and every K alike.
Falcon-RW's ALiBi stays refused: its bridge has no per-head input hooks at all.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_engine_forward_equals_bridge,
    assert_same_decisions_for_every_k,
    token_pairs,
)
from reference_acdc import reference_acdc

from acdc_viz.models.adapter import alibi_slopes, from_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bloom(family):
    bridge = family("bloom").bridge
    weights = from_model(bridge)
    assert weights.alibi_slopes is not None and weights.embed_norm is not None
    return bridge, weights


def test_alibi_slopes_are_hugging_faces():
    from transformers.models.bloom import modeling_bloom

    for n_heads in (1, 4, 6, 12, 16, 24):
        assert torch.equal(alibi_slopes(n_heads), modeling_bloom._get_alibi_slopes(n_heads, "cpu"))


def test_engine_forward_equals_the_bridge(bloom):
    assert_engine_forward_equals_bridge(*bloom)


def test_every_k_gives_the_same_decisions(bloom):
    assert_same_decisions_for_every_k(bloom[1])


def test_the_reference_refuses_blooms_bridge(bloom):
    clean, corrupt = token_pairs(batch=2, pos=4, d_vocab=96)
    with pytest.raises(NotImplementedError, match="after ln1"):
        reference_acdc(bloom[0], clean, corrupt, tau=3e-3)
