"""Tiny random-weight models of every decoder family acdc_viz is to support, booted offline.

Each builder makes a seeded Hugging Face model from its ``transformers`` config class (2 layers,
4 query heads, 2 key/value heads where the family has grouped-query attention, a small vocabulary
and context), saves it with ``save_pretrained(directory)`` without tokenizer files, and wraps it
with the real TransformerLens 4 loader ``TransformerBridge.boot_transformers``.

Two things are needed beyond GPT-2's recipe (see ``docs/model-families.md``):

- a tokenizer: with no tokenizer files in the directory, ``boot_transformers`` calls
  ``AutoTokenizer.from_pretrained(directory)``, which fails for Llama, Mistral, OLMo 2, Falcon and
  Bloom and silently gives an empty 1-5 token tokenizer for the others;
  :func:`placeholder_tokenizer` gives it a word-level tokenizer whose token ``<i>`` is id ``i``;
- ``dtype``: the bridge never casts a model passed as ``hf_model``, so the model is cast to the
  requested dtype (float64 by default) before saving and booting, and ``dtype`` is passed too so
  the bridge config agrees.

Weights are not left at the families' own initialisation: their 0.02-std weights, unit norm
weights and zero biases would hide bugs (a missing bias, ``w`` against ``1 + w`` in an RMSNorm,
near-uniform attention). :func:`randomize_` redraws every parameter so all of them matter.

The config knobs each family is known for are explicit keyword arguments of its builder, with
defaults that make them bite at these sizes (a sliding window shorter than the test sequences,
soft caps low enough to clip, partial rotary, GQA). ``FAMILIES`` maps a name to a builder
called as ``FAMILIES[name](directory)``; variants of one config class are separate names.
``KNOWN_BROKEN`` lists the names TransformerLens 4.3 does not run correctly, with the reason.

For reference logits use :func:`reload_hf` (a fresh copy from the directory): the bridge rewires
the ``hf`` model it wraps. Note that HF's "float64" forward still computes rotary angles, eager
softmax and (Llama-style) RMSNorm in float32; the doc lists the measured consequences.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

D_MODEL = 64
N_HEADS = 4
N_KV = 2
N_LAYERS = 2
D_MLP = 96
VOCAB = 96
N_CTX = 32


class FamilyModel(NamedTuple):
    """What a builder returns."""

    bridge: Any
    """The TransformerLens 4 ``TransformerBridge`` (eval mode)."""
    hf: Any
    """The Hugging Face model the bridge wraps. The bridge replaces its submodules in place, so
    calling it after boot runs through the bridge's components: load an independent reference
    with :func:`reload_hf` instead."""
    directory: Path


def placeholder_tokenizer(vocab_size: int, eos_id: int | None = None) -> Any:
    """A word-level fast tokenizer with exactly ``vocab_size`` tokens ``<0>`` ... ``<n-1>``.

    It adds no special tokens itself; its EOS (also PAD and UNK, and BOS once TransformerLens has
    set it up) is ``<eos_id>``, by default
    the last id. Only needed because ``boot_transformers`` insists on a tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if eos_id is None or not 0 <= eos_id < vocab_size:
        eos_id = vocab_size - 1
    eos = f"<{eos_id}>"
    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token=eos))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No bos_token on purpose: with one, TransformerLens' setup_tokenizer rebuilds the
    # tokenizer through AutoTokenizer.from_pretrained(init_kwargs["name_or_path"]), which a
    # tokenizer built in memory lacks (KeyError 'name_or_path'). Without one, it keeps this
    # tokenizer and sets bos_token = eos_token itself.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, unk_token=eos,
                                   pad_token=eos)


@torch.no_grad()
def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter: matrices ~ N(0, 1/fan_in), vectors (norm weights, biases) get
    N(0, 0.3) added. Tied parameters are visited once (``named_parameters`` dedups them)."""
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if p.dim() >= 2:
            p.copy_(noise * p.shape[-1] ** -0.5)
        else:
            p.add_(0.3 * noise)


def _first_int(x: Any) -> int | None:
    if isinstance(x, (list, tuple)):
        x = x[0] if x else None
    return x if isinstance(x, int) else None


def build(config: Any, model_cls: type, directory: str | os.PathLike[str], *, seed: int = 0,
          dtype: torch.dtype = torch.float64, tokenizer: Any = "placeholder") -> FamilyModel:
    """Build ``model_cls(config)`` with seeded random weights, save it, boot it as a bridge.

    ``tokenizer="placeholder"`` passes :func:`placeholder_tokenizer`; ``None`` lets
    ``boot_transformers`` look for tokenizer files in the directory (there are none).
    """
    from transformer_lens.model_bridge import TransformerBridge

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config._attn_implementation = "eager"  # what the bridge forces anyway; sdpa differs ~1e-7
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = model_cls(config)
    randomize_(hf, torch.Generator().manual_seed(seed))
    hf = hf.to(dtype).eval()
    hf.save_pretrained(directory)
    if tokenizer == "placeholder":
        tokenizer = placeholder_tokenizer(config.vocab_size, _first_int(config.eos_token_id))
    bridge = TransformerBridge.boot_transformers(str(directory), hf_model=hf, device="cpu",
                                                 dtype=dtype, tokenizer=tokenizer)
    return FamilyModel(bridge.eval(), hf, directory)


def reload_hf(directory: str | os.PathLike[str], dtype: torch.dtype = torch.float64) -> Any:
    """An independent copy of the saved model (eager attention), for reference logits."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager",
                                                local_files_only=True).eval()


def _rope(theta: float = 10000.0, scaling: dict | None = None,
          partial: float | None = None) -> dict:
    """A transformers 5 ``rope_parameters`` dict. ``scaling`` holds ``rope_type`` and its knobs."""
    params: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
    if scaling:
        params.update(scaling)
    if partial is not None:
        params["partial_rotary_factor"] = partial
    return params


#: RoPE scaling variants that ``transformers`` configs carry, with knobs that change the
#: frequencies at test lengths (``original_max_position_embeddings`` below the context). Dynamic
#: scaling only acts on sequences longer than ``max_position_embeddings`` (and is stateful: HF
#: recomputes ``inv_freq`` when a longer sequence arrives), so its registry entry also lowers
#: ``max_position_embeddings`` to 8.
ROPE_SCALING: dict[str, dict] = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

def build_gpt_neox(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                   rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                   rope_scaling=None, **kw) -> FamilyModel:
    """Pythia / GPT-NeoX: partial rotary (``rotary_pct`` of d_head, half-split pairing), parallel
    attention + MLP with two LayerNorms, biases everywhere, untied unembedding without bias."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        hidden_act="gelu", rope_parameters=_rope(scaling=rope_scaling, partial=rotary_pct),
        use_parallel_residual=use_parallel_residual, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0, eos_token_id=0, **kw)
    return build(cfg, GPTNeoXForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_llama(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                num_key_value_heads=N_KV, rope_scaling=None, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False, max_position_embeddings=N_CTX,
                **kw) -> FamilyModel:
    """Llama: full rotary (half-split), GQA, SwiGLU, RMSNorm, untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads,
        intermediate_size=D_MLP, max_position_embeddings=max_position_embeddings,
        hidden_act="silu", rope_parameters=_rope(500000.0, rope_scaling),
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias, mlp_bias=mlp_bias, bos_token_id=1, eos_token_id=2, **kw)
    return build(cfg, LlamaForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_qwen2(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                num_key_value_heads=N_KV, tie_word_embeddings=True, **kw) -> FamilyModel:
    """Qwen2 / Qwen2.5: like Llama, plus biases on q, k, v (not o); tied (as Qwen2.5-0.5B)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads,
        intermediate_size=D_MLP, max_position_embeddings=N_CTX, hidden_act="silu",
        rope_parameters=_rope(1000000.0), tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=VOCAB - 1, **kw)
    return build(cfg, Qwen2ForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_qwen3(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                num_key_value_heads=N_KV, head_dim=24, tie_word_embeddings=True,
                **kw) -> FamilyModel:
    """Qwen3: per-head RMSNorm on q and k (before rotary), no q/k/v bias, explicit
    ``head_dim`` (here 24, so n_heads * d_head = 96 != d_model = 64)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        intermediate_size=D_MLP, max_position_embeddings=N_CTX, hidden_act="silu",
        rope_parameters=_rope(1000000.0), tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=VOCAB - 1, **kw)
    return build(cfg, Qwen3ForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_mistral(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                  num_key_value_heads=N_KV, sliding_window=4, **kw) -> FamilyModel:
    """Mistral: Llama plus sliding-window attention on every layer (window 4 here, shorter than
    the test sequences, so it changes the logits)."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads,
        head_dim=D_MODEL // N_HEADS,
        intermediate_size=D_MLP, max_position_embeddings=N_CTX, hidden_act="silu",
        rope_parameters=_rope(), sliding_window=sliding_window, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, **kw)
    return build(cfg, MistralForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_gemma(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                num_key_value_heads=N_KV, head_dim=16, **kw) -> FamilyModel:
    """Gemma (1): GeGLU (tanh gelu), RMSNorm as ``x * (1 + w)``, embeddings scaled by
    sqrt(d_model), tied unembedding."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        hidden_activation="gelu_pytorch_tanh", rope_parameters=_rope(),
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)
    return build(cfg, GemmaForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_gemma2(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                 num_key_value_heads=N_KV, head_dim=16, query_pre_attn_scalar=32, sliding_window=4,
                 layer_types=("sliding_attention", "full_attention"),
                 attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **kw) -> FamilyModel:
    """Gemma 2: Gemma plus sandwich norms (pre- and post-norm around attention and MLP),
    attention and final-logit soft caps, alternating sliding-window/global layers, and the
    attention scale ``query_pre_attn_scalar ** -0.5`` (32 here, not head_dim 16)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        hidden_activation="gelu_pytorch_tanh", rope_parameters=_rope(),
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window,
        layer_types=list(layer_types), attn_logit_softcapping=attn_logit_softcapping,
        final_logit_softcapping=final_logit_softcapping, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)
    return build(cfg, Gemma2ForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_phi(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
              partial_rotary_factor=0.5, qk_layernorm=False, **kw) -> FamilyModel:
    """Phi (1/1.5/2): partial rotary, parallel attention + MLP sharing one LayerNorm, biases
    everywhere including the unembedding (``lm_head.bias``), untied."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        hidden_act="gelu_new", rope_parameters=_rope(partial=partial_rotary_factor),
        qk_layernorm=qk_layernorm, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        **kw)
    return build(cfg, PhiForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_gptj(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
               rotary_dim=8, **kw) -> FamilyModel:
    """GPT-J: interleaved rotary (pairs (0,1), (2,3), ...) on the first ``rotary_dim`` of 16
    head dims, parallel attention + MLP sharing one LayerNorm, no q/k/v/o biases, unembedding
    with a bias, untied."""
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(
        vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP,
        n_positions=N_CTX, rotary_dim=rotary_dim, activation_function="gelu_new",
        tie_word_embeddings=False, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **kw)
    return build(cfg, GPTJForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_olmo(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
               clip_qkv=None, **kw) -> FamilyModel:
    """OLMo (1): LayerNorm *without* weight or bias, SwiGLU, full rotary, optional
    ``clip_qkv`` (clamps q, k, v activations)."""
    from transformers import OlmoConfig, OlmoForCausalLM

    cfg = OlmoConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, intermediate_size=D_MLP,
        max_position_embeddings=N_CTX, hidden_act="silu", rope_parameters=_rope(),
        clip_qkv=clip_qkv, tie_word_embeddings=False, pad_token_id=1, eos_token_id=VOCAB - 1, **kw)
    return build(cfg, OlmoForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_olmo2(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                num_key_value_heads=N_KV, **kw) -> FamilyModel:
    """OLMo 2: no pre-norms; RMSNorm applied to the attention and MLP *outputs* before the
    residual add; q/k RMSNorm over the whole projection (all heads at once); SwiGLU."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=num_key_value_heads,
        intermediate_size=D_MLP, max_position_embeddings=N_CTX, hidden_act="silu",
        rope_parameters=_rope(500000.0), tie_word_embeddings=False, pad_token_id=1,
        eos_token_id=VOCAB - 1, **kw)
    return build(cfg, Olmo2ForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_falcon(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                 new_decoder_architecture=False, multi_query=True, num_kv_heads=None,
                 parallel_attn=True, alibi=False, bias=False, num_ln_in_parallel_attn=None,
                 **kw) -> FamilyModel:
    """Falcon. Default: Falcon-7B style (multi-query: one K/V head, parallel attention + MLP
    with one LayerNorm, rotary, exact GELU, no biases, tied).
    ``new_decoder_architecture=True`` is the 40B/180B style (``num_kv_heads`` groups, two
    LayerNorms with ``num_ln_in_parallel_attn=2``);
    ``alibi=True`` replaces rotary by ALiBi (as falcon-rw, registered with sequential blocks,
    per-head-interleaved qkv and biases)."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, new_decoder_architecture=new_decoder_architecture,
        multi_query=multi_query, num_kv_heads=num_kv_heads, parallel_attn=parallel_attn,
        alibi=alibi, bias=bias, num_ln_in_parallel_attn=num_ln_in_parallel_attn,
        max_position_embeddings=N_CTX, ffn_hidden_size=D_MLP, rope_parameters=_rope(),
        tie_word_embeddings=True, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **kw)
    return build(cfg, FalconForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


def build_bloom(directory, *, seed=0, dtype=torch.float64, tokenizer="placeholder",
                **kw) -> FamilyModel:
    """Bloom: ALiBi, a LayerNorm right after the embedding, fused per-head-interleaved qkv,
    Bloom's own tanh-GELU (rounded constants: ~3e-10 away from torch's tanh GELU), an MLP of
    fixed width 4 * d_model (the config has no knob), biases everywhere, tied."""
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **kw)
    return build(cfg, BloomForCausalLM, directory, seed=seed, dtype=dtype, tokenizer=tokenizer)


#: Builders by name. Every builder takes ``(directory, *, seed=0, dtype=torch.float64,
#: tokenizer="placeholder", <family knobs>, **config_overrides)``.
FAMILIES: dict[str, Callable[..., FamilyModel]] = {
    "gpt_neox": build_gpt_neox,
    "gpt_neox-sequential": functools.partial(build_gpt_neox, use_parallel_residual=False),
    "llama": build_llama,
    "llama-mqa-tied": functools.partial(build_llama, num_key_value_heads=1,
                                        tie_word_embeddings=True),
    **{f"llama-rope-{k}": functools.partial(build_llama, rope_scaling=v)
       for k, v in ROPE_SCALING.items()},
    "llama-rope-dynamic": functools.partial(build_llama, rope_scaling=ROPE_SCALING["dynamic"],
                                            max_position_embeddings=8),
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "mistral": build_mistral,
    "gemma": build_gemma,
    "gemma2": build_gemma2,
    "phi": build_phi,
    "phi-qk-layernorm": functools.partial(build_phi, qk_layernorm=True),
    "gptj": build_gptj,
    "olmo": build_olmo,
    "olmo-clip-qkv": functools.partial(build_olmo, clip_qkv=0.5),
    "olmo2": build_olmo2,
    "falcon": build_falcon,
    "falcon-new-decoder": functools.partial(build_falcon, new_decoder_architecture=True,
                                            multi_query=False, num_kv_heads=N_KV,
                                            num_ln_in_parallel_attn=2),
    "falcon-alibi": functools.partial(build_falcon, alibi=True, multi_query=False, bias=True,
                                      parallel_attn=False),
    "bloom": build_bloom,
}

#: Registry entries that TransformerLens 4.3 does not run correctly (measured; see
#: docs/model-families.md): name -> (exception a bridge-vs-HF check raises, reason).
KNOWN_BROKEN: dict[str, tuple[type[Exception], str]] = {
    "phi-qk-layernorm": (
        RuntimeError,
        "TL 4.3's Phi adapter declares no q_norm/k_norm, so boot refuses the model: \"HF module "
        "has 'q_layernorm' but adapter did not declare 'q_norm'\"",
    ),
    "falcon-new-decoder": (
        AssertionError,
        "TL 4.3's Falcon adapter splits the fused query_key_value of new_decoder_architecture "
        "as [all Q | all K | all V], but HF lays it out per KV group ([q..q k v] per group): "
        "W_Q/W_K/W_V are wrong and the logits differ from HF by ~4",
    ),
}
