"""Which models the per-head adapter reads, and the refusal that names what it does not.

Architecture facts come from the Hugging Face config and the module tree where a TransformerLens
4 bridge has them: the bridge's own ``cfg`` leaves many unset (sliding windows, q/k norms,
sandwich norms, rope scaling; see docs/model-families.md). Everything here reads configs and
module trees only, so a model is refused before any weight is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from acdc_viz.errors import ModelSupportError
from acdc_viz.models.rotary import ROPE_TYPES

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    # Bloom's tanh GELU, with its own rounded constant sqrt(2 / pi) ~ 0.79788456
    "bloom_gelu": lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
}
NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)
QK_NORMS = "q/k norms (Phi with qk_layernorm, Llama 4)"
QK_NORMS_ACROSS_HEADS = ("q/k norms over all heads together (OLMo 2): one head's query depends on "
                         "every head's input, so heads are not separable")

#: What ACDC runs on and what the adapter reads, for the messages of refused models.
SUPPORTED_FAMILIES = (
    "ACDC runs today on GPT-2-style decoder-only models (learned or shortformer positions, "
    "LayerNorm/RMSNorm or none, attention-only, or with a plain or gated MLP), on rotary "
    "models with multi-head, grouped-query or multi-query attention and sequential or parallel "
    "blocks (Llama 2/3, Qwen2/2.5, Qwen3, Mistral, OLMo, Gemma, Gemma 2 with its sandwich "
    "norms, GPT-NeoX/Pythia, Phi, GPT-J, Falcon-7B-style) and on Bloom (ALiBi)."
)


def hf_model(model: Any) -> Any:
    """The Hugging Face model a TransformerLens 4 bridge wraps, or None (TransformerLens 3,
    native bridges)."""
    original = getattr(model, "original_model", None)
    config = getattr(original, "config", None)
    return original if config is not None and hasattr(config, "model_type") else None


def submodule(model: Any, path: str) -> Any:
    """``model.<path>`` (dots and indices), or None where it does not exist."""
    obj = model
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return obj


def hf_activation(config: Any) -> str | None:
    """The MLP activation's name in a Hugging Face config."""
    for field in ("hidden_activation", "hidden_act", "activation_function", "activation"):
        name = getattr(config, field, None)
        if isinstance(name, str):
            return name
    return None


def sliding_windows(config: Any, n_layers: int) -> list[int | None]:
    """Each layer's sliding attention window in a Hugging Face config (a query sees the keys
    less than ``window`` positions back), or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * n_layers
    if layer_types:
        return [int(window) if "sliding" in str(t) else None for t in layer_types[:n_layers]]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * n_layers
    return [int(window)] * n_layers


def config_problems(config: Any) -> list[str]:
    """Features of a Hugging Face config that the adapter does not model, each with its
    families."""
    problems = []
    if getattr(config, "is_encoder_decoder", False):
        problems.append("an encoder-decoder model (is_encoder_decoder=True; T5, BART, ...)")
    experts = [f"{f}={getattr(config, f)}" for f in ("num_experts", "num_local_experts",
                                                     "n_routed_experts", "moe_num_experts")
               if (getattr(config, f, None) or 0) > 0]
    if experts:
        problems.append(f"mixture-of-experts MLPs ({', '.join(experts)}; Mixtral, Qwen-MoE, ...)")
    model_type = str(getattr(config, "model_type", ""))
    if (any(hasattr(config, f) for f in ("state_size", "ssm_state_size", "mamba_d_state"))
            or any(s in model_type for s in ("mamba", "rwkv", "jamba"))):
        problems.append(f"state-space layers (model_type={model_type!r}; Mamba, RWKV, Jamba)")
    multimodal = [f for f in ("vision_config", "audio_config", "text_config")
                  if getattr(config, f, None) is not None]
    if multimodal:
        problems.append(f"a multimodal model ({', '.join(multimodal)}; LLaVA, Gemma 3, ...)")
    if getattr(config, "alibi", False) or model_type == "mpt":      # Bloom's is read
        problems.append("ALiBi position biases outside Bloom (Falcon-RW, MPT: their bridges "
                        "offer no per-head input hooks to check it against)")
    if getattr(config, "new_decoder_architecture", False):
        problems.append("Falcon's new_decoder_architecture (Falcon-40B/180B: TransformerLens 4.3 "
                        "splits its grouped fused QKV wrongly)")
    if getattr(config, "qk_layernorm", False) or getattr(config, "use_qk_norm", False):
        problems.append(QK_NORMS)
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        problems.append("rope parameters per layer type (Gemma 3, ...)")
    elif rope.get("rope_type", "default") not in ROPE_TYPES:
        problems.append(f"rope scaling {rope['rope_type']!r} (supported: {', '.join(ROPE_TYPES)})")
    elif rope.get("llama_4_scaling_beta") is not None:
        problems.append("Llama 4's position-dependent query scale (llama_4_scaling_beta)")
    return problems


def _module_problems(model: Any) -> list[str]:
    """Features visible in a bridge's module tree (its config may not say)."""
    problems = []
    block = submodule(model, "blocks.0")
    # getattr, not hasattr: TransformerLens 3 keeps unused norms as attributes set to None.
    if block is not None and hf_model(model) is None and any(
            getattr(block, n, None) is not None for n in ("ln1_post", "ln2_post")):
        problems.append("sandwich norms on a model without its Hugging Face original (a "
                        "TransformerLens 3 HookedTransformer)")
    if block is not None and getattr(block, "ln1", None) is None and getattr(
            block, "ln1_post", None) is not None:
        problems.append("post-norms without pre-norms (OLMo 2)")
    attn = getattr(block, "attn", None)
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")] if attn is not None else []
    cfg = getattr(model, "cfg", None)
    d_head = getattr(cfg, "d_head", None)
    for norm in norms:      # per head (Qwen3, Gemma 3) is read; across heads (OLMo 2) is not
        weight = getattr(norm, "weight", None)
        if norm is not None and (weight is None or d_head is None
                                 or tuple(weight.shape) != (int(d_head),)):
            problems.append(QK_NORMS_ACROSS_HEADS)
    if getattr(model, "embed_ln", None) is not None and hf_model(model) is None:
        problems.append("a LayerNorm right after the embedding (Bloom) on a model without its "
                        "Hugging Face original")
    return problems


def _cfg_problems(cfg: Any, hf: Any) -> list[str]:
    """Features named by the TransformerLens config."""
    problems = []
    pos = getattr(cfg, "positional_embedding_type", "standard")
    if pos == "alibi" and (hf is None or hf.config.model_type != "bloom"):
        problems.append("ALiBi position biases outside Bloom (Falcon-RW, MPT)")
    elif pos == "rotary" and hf is None:
        problems.append("rotary embeddings (positional_embedding_type='rotary') on a model without "
                        "its Hugging Face original: rotary models are read through a "
                        "TransformerLens 4 bridge (TransformerBridge.boot_transformers)")
    elif pos not in ("standard", None, "rotary", "alibi"):
        problems.append(f"positional_embedding_type={pos!r} (supported: 'standard', 'rotary')")
    if getattr(cfg, "normalization_type", None) not in NORMS:
        problems.append(f"normalization_type={cfg.normalization_type!r} (supported: {NORMS})")
    act = hf_activation(hf.config) if hf is not None else None
    act = act or getattr(cfg, "act_fn", None)
    if not getattr(cfg, "attn_only", False) and act not in ACTIVATIONS:
        problems.append(f"activation {act!r} (supported: {sorted(ACTIVATIONS)})")
    if hf is None and getattr(cfg, "use_local_attn", False):    # else read from HF's config
        problems.append("sliding-window attention on a model without its Hugging Face original "
                        "(a TransformerLens 3 HookedTransformer): use_local_attn=True")
    if hf is None and getattr(cfg, "use_normalization_before_and_after", False):
        problems.append("sandwich norms on a model without its Hugging Face original (a "
                        "TransformerLens 3 HookedTransformer): use_normalization_before_and_after")
    if getattr(cfg, "post_embedding_ln", False) and hf is None:
        problems.append("a LayerNorm right after the embedding (Bloom) on a model without its "
                        "Hugging Face original: post_embedding_ln=True")
    if hf is None and (getattr(cfg, "attn_scores_soft_cap", -1.0) > 0
                       or getattr(cfg, "output_logits_soft_cap", -1.0) > 0):
        problems.append("soft-capping of attention scores or logits (Gemma 2)")  # else: HF's
    if (getattr(cfg, "num_experts", None) or 0) > 0:
        problems.append(f"mixture-of-experts MLPs (num_experts={cfg.num_experts})")
    if (pos == "rotary" and hf is not None and hf.config.model_type != "gptj"
            and (getattr(cfg, "rotary_adjacent_pairs", False)
                 or getattr(cfg, "rotary_interleaved_cos_sin", False))):
        problems.append("adjacent-pair rotary (GLM, ERNIE, Cohere)")
    return problems


def check_supported(cfg: Any, model: Any = None) -> None:
    """Refuse a model with a feature the adapter does not model, naming every one of them.

    Reads only configs and the module tree (before any weight is touched). Architecture facts
    come from the Hugging Face config where a bridge has one: TransformerLens 4's ``cfg`` leaves
    many of them unset (sliding windows, q/k norms, sandwich norms, rope scaling).
    """
    hf = hf_model(model)
    problems = _cfg_problems(cfg, hf)
    if hf is not None:
        problems += config_problems(hf.config)
    if model is not None:
        problems += _module_problems(model)
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ModelSupportError(
            "acdc_viz cannot give per-head access to this model: " + "; ".join(problems) + ". "
            + SUPPORTED_FAMILIES + " Please open an issue naming the architecture."
        )
