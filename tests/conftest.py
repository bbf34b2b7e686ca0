"""Tiny models built locally (no hub): GPT-2 architecture bridges and native attention-only bridges."""

from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)


def gpt2_bridge(tmp_dir, *, n_layer=2, n_head=3, n_embd=24, vocab_size=50, n_positions=16, seed=0):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                    vocab_size=vocab_size, n_positions=n_positions))
    hf.save_pretrained(tmp_dir)
    hf.eval()  # a freshly built HF model is in training mode (dropout on)
    return TransformerBridge.boot_transformers(str(tmp_dir), hf_model=hf, device="cpu")


def native_bridge(*, normalization_type=None, attn_only=True, n_layers=2, n_heads=4, d_model=32,
                  d_vocab=50, seed=0, attention_dir="causal"):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=d_model, d_head=d_model // n_heads, n_layers=n_layers, n_ctx=16,
                                  n_heads=n_heads, d_vocab=d_vocab, attn_only=attn_only,
                                  normalization_type=normalization_type, seed=seed, act_fn="gelu",
                                  attention_dir=attention_dir)
    return TransformerBridge.boot_native(cfg)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    return gpt2_bridge(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def attn_only():
    return native_bridge()


@pytest.fixture(scope="session")
def native_ln():
    return native_bridge(normalization_type="LN", attn_only=False)


def token_pairs(batch=4, pos=6, d_vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    corrupt = torch.randint(0, d_vocab, (batch, pos), generator=g)
    return clean, corrupt
