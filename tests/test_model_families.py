"""Every decoder family of issue 13 boots offline through TransformerLens 4 and matches HF.

The models come from ``tests/model_families.py`` (tiny, random, float64, no tokenizer files).
Besides logit parity, a few facts that ``docs/model-families.md`` reports and that the per-head
adapter will rely on are pinned here, so a TransformerLens upgrade that changes them fails loudly.
"""

from __future__ import annotations

import pytest
import torch
from model_families import (
    FAMILIES,
    KNOWN_BROKEN,
    N_HEADS,
    N_KV,
    VOCAB,
    build_llama,
    reload_hf,
)

# HF's float64 forward is not float64 throughout: eager attention takes its softmax in float32
# (and rotary angles are computed in float32). Bridges that hand attention to HF's own module
# reproduce that bit for bit (error 0). The GPT-NeoX and rotary Falcon bridges re-implement
# attention with a float64 softmax instead, so they differ from HF by ~2e-7.
FLOAT32_SOFTMAX_IN_HF_ONLY = 1e-6
TOLERANCE = {name: FLOAT32_SOFTMAX_IN_HF_ONLY
             for name in ("gpt_neox", "gpt_neox-sequential", "falcon")}
DEFAULT_TOLERANCE = 1e-12

BROKEN = {name: pytest.mark.xfail(strict=True, raises=exc, reason=reason)
          for name, (exc, reason) in KNOWN_BROKEN.items()}

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
def _params(names):
    return [pytest.param(n, marks=BROKEN[n]) if n in BROKEN else n for n in names]


@pytest.mark.parametrize("name", _params(FAMILIES))
def test_bridge_logits_equal_hf(name, family):
    fm = family(name)
    assert not any(fm.directory.glob("tokenizer*")) and not any(fm.directory.glob("vocab*"))
    assert fm.bridge.cfg.dtype == torch.float64
    with torch.no_grad():
        ours = fm.bridge(TOKENS)
        ref = reload_hf(fm.directory)(TOKENS).logits
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOLERANCE.get(name, DEFAULT_TOLERANCE), f"{name}: max |logit diff| {err:.3g}"


def test_boot_needs_a_tokenizer_when_the_directory_has_none(tmp_path):
    """Without the placeholder, boot_transformers calls AutoTokenizer on the directory: for
    Llama that fails; for Qwen2 it "works" and gives a one-token tokenizer (text is garbage)."""
    with pytest.raises(ValueError, match="backend tokenizer"):
        build_llama(tmp_path / "llama", tokenizer=None)
    bridge = FAMILIES["qwen2"](tmp_path / "qwen2", tokenizer=None).bridge
    assert len(bridge.tokenizer) == 1


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "mistral", "olmo2", "falcon"])
def test_grouped_kv_weights_and_split_inputs_are_per_kv_head(name, family):
    bridge = family(name).bridge
    n_kv = bridge.cfg.n_key_value_heads
    assert n_kv == (1 if name == "falcon" else N_KV)
    assert bridge.W_Q.shape[1] == N_HEADS and bridge.W_K.shape[1] == n_kv
    assert bridge.W_V.shape[1] == n_kv
    bridge.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(TOKENS)
    finally:
        bridge.set_use_split_qkv_input(False)
    assert cache["blocks.0.hook_q_input"].shape[2] == N_HEADS
    assert cache["blocks.0.hook_k_input"].shape[2] == n_kv


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_gemma_norm_is_one_plus_weight_and_embedding_is_scaled(name, family):
    bridge = family(name).bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(TOKENS)
    scale = bridge.cfg.d_model ** 0.5
    torch.testing.assert_close(cache["hook_embed"], bridge.W_E[TOKENS] * scale, rtol=0, atol=0)
    x, w = cache["blocks.0.ln1.hook_in"], bridge.state_dict()["blocks.0.ln1.weight"]
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + bridge.cfg.eps)
    # HF computes this norm in float32 even for a float64 model.
    torch.testing.assert_close(cache["blocks.0.ln1.hook_out"], normed * (1 + w), rtol=0, atol=1e-5)


def test_gemma2_attention_scale_and_soft_caps(family):
    bridge = family("gemma2").bridge
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TOKENS)
    q = cache["blocks.1.attn.hook_rot_q"]
    k = cache["blocks.1.attn.hook_rot_k"].repeat_interleave(N_HEADS // N_KV, dim=2)
    scale = bridge.original_model.config.query_pre_attn_scalar ** -0.5
    raw = torch.einsum("bqhe,bkhe->bhqk", q, k) * scale
    cap = bridge.cfg.attn_scores_soft_cap
    causal = torch.tril(torch.ones(TOKENS.shape[1], TOKENS.shape[1], dtype=torch.bool))
    scores = cache["blocks.1.attn.hook_attn_scores"][..., causal]  # layer 1 is global
    torch.testing.assert_close(scores, cap * torch.tanh(raw[..., causal] / cap))
    assert logits.abs().max() < bridge.cfg.output_logits_soft_cap


def test_gptj_has_no_split_hooks(family):
    bridge = family("gptj").bridge
    with pytest.raises(NotImplementedError):
        bridge.set_use_split_qkv_input(True)
    with pytest.raises(NotImplementedError):
        bridge.set_use_attn_result(True)


def test_falcon_alibi_split_flag_is_a_silent_no_op(family):
    bridge = family("falcon-alibi").bridge
    bridge.set_use_split_qkv_input(True)  # accepted without error or warning ...
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(TOKENS)
    finally:
        bridge.set_use_split_qkv_input(False)
    assert "blocks.0.hook_q_input" not in cache  # ... but no per-head input hook fires


def test_bloom_start_at_layer_does_not_reproduce_the_forward(family):
    bridge = family("bloom").bridge
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TOKENS)
        resumed = bridge(cache["blocks.1.hook_resid_pre"], start_at_layer=1)
    assert (resumed - logits).abs().max() > 1e-2


def test_olmo2_query_norm_couples_heads(family):
    """OLMo 2 normalises q over all heads at once: one head's query input moves the others."""
    bridge = family("olmo2").bridge
    store = {}

    def zero_head0(t, hook):
        t = t.clone()
        t[:, :, 0] = 0
        return t

    def grab(t, hook):
        store["result"] = t.detach().clone()

    bridge.set_use_split_qkv_input(True)
    bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            bridge.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_result", grab)])
            base = store["result"]
            bridge.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_q_input", zero_head0),
                                                     ("blocks.0.attn.hook_result", grab)])
    finally:
        bridge.set_use_split_qkv_input(False)
        bridge.set_use_attn_result(False)
    assert (store["result"][:, :, 1:] - base[:, :, 1:]).abs().max() > 1e-4
