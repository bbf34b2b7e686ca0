"""The slow path: a circuit's logits from one full forward pass of the model itself, with hooks.

``Acdc(test_mode=True)`` checks every decision of the fast engine against this. It shares no
forward code with ``patching``: it runs the TransformerLens model, reads the heads' outputs from
``hook_z`` and the model's own ``W_O``, and rewrites queries, keys, values and MLP outputs with the
model's own LayerNorm and MLP modules. It needs only hooks that TransformerLens 3 and 4 (bridges
of every kind) both have, so it also covers models without per-head input hooks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from acdc_viz.graph import Edge
from acdc_viz.models.adapter import TransformerWeights, eval_mode
from acdc_viz.runtime import model_device


def unsupported_features(weights: TransformerWeights) -> list[str]:
    """What this slow path does not recompute (it rebuilds q, k and v as ``ln1(x) @ W + b`` and
    reads each head's output from ``hook_z``): the architecture features of ``weights`` beyond
    GPT-2 style. Their exactness is proven against ``tests/reference_acdc.py`` instead."""
    layer = weights.layers[0]
    features = {
        "rotary embeddings": weights.rotary is not None,
        "grouped-query attention": weights.kv_group is not None,
        "parallel blocks": weights.parallel,
        "sandwich norms": layer.post_attn_norm is not None,
        "q/k norms": layer.q_norm is not None,
        "sliding windows": any(w.window is not None for w in weights.layers),
        "soft caps": weights.attn_softcap is not None or weights.final_softcap is not None,
        "float32 attention": (weights.softmax_dtype is not None
                              or weights.scores_dtype is not None),
    }
    return [name for name, present in features.items() if present]


def _source_outputs(model: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each source's output (batch, pos, d_model) in a plain forward pass of the model."""
    cfg = model.cfg
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(cfg.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z")
        if not cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = {"Embed": cache["blocks.0.hook_resid_pre"]}
    for layer in range(cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for head in range(cfg.n_heads):
            out[f"A{layer}.{head}"] = z[:, :, head] @ model.W_O[layer, head]
        if not cfg.attn_only:
            out[f"MLP{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def hooked_logits(
    model: Any,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    removed: list[Edge],
    ablation: str,
    *,
    last_position_only: bool = True,
) -> torch.Tensor:
    """Logits of the circuit without ``removed`` edges, by brute force on ``model``."""
    cfg = model.cfg
    device = model_device(model)
    clean, corrupt = clean.to(device), corrupt.to(device)
    with torch.no_grad(), eval_mode(model):
        ablated = _source_outputs(model, corrupt)
    if ablation == "zero":
        ablated = {k: torch.zeros_like(v) for k, v in ablated.items()}
    elif ablation == "mean":
        ablated = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in ablated.items()}

    into: dict[str, list[Edge]] = defaultdict(list)
    for e in removed:
        into[e.dest.name].append(e)
    current: dict[str, torch.Tensor] = {}

    def correction(dest: str, like: torch.Tensor) -> torch.Tensor | None:
        if dest not in into:
            return None
        corr = torch.zeros_like(like)
        for e in into[dest]:
            diff = ablated[e.src.name] - current[e.src.name]
            if e.position is None:
                corr = corr + diff
            else:
                corr[:, e.position] += diff[:, e.position]
        return corr

    hooks = []

    def record_resid_pre(layer: int):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            current[f"resid_pre{layer}"] = x
            if layer == 0:
                current["Embed"] = x
            return x
        return hook

    def patch_qkv(layer: int, letter: str):
        W = getattr(model, f"W_{letter.upper()}")[layer]
        b = getattr(model, f"b_{letter.upper()}")[layer]
        ln1 = model.blocks[layer].ln1

        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            resid = current[f"resid_pre{layer}"]
            x = x.clone()
            for head in range(cfg.n_heads):
                corr = correction(f"A{layer}.{head}.{letter}", resid)
                if corr is not None:
                    x[:, :, head] = ln1(resid + corr) @ W[head] + b[head]
            return x
        return hook

    def record_z(layer: int):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            for head in range(cfg.n_heads):
                current[f"A{layer}.{head}"] = z[:, :, head] @ model.W_O[layer, head]
            return z
        return hook

    def record_resid_mid(layer: int):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            current[f"resid_mid{layer}"] = x
            return x
        return hook

    def patch_mlp_out(layer: int):
        """A hook that recomputes the MLP of ``layer`` from its corrected input."""
        block = model.blocks[layer]

        def hook(out: torch.Tensor, hook: Any) -> torch.Tensor:
            if current.get("inside_mlp") is not None:   # our own call to block.mlp below
                return out
            resid = current[f"resid_mid{layer}"]
            corr = correction(f"MLP{layer}", resid)
            if corr is not None:
                current["inside_mlp"] = corr
                try:
                    out = block.mlp(block.ln2(resid + corr))
                finally:
                    del current["inside_mlp"]
            current[f"MLP{layer}"] = out
            return out
        return hook

    def patch_out(x: torch.Tensor, hook: Any) -> torch.Tensor:
        corr = correction("Out", x)
        return x if corr is None else x + corr

    for layer in range(cfg.n_layers):
        hooks.append((f"blocks.{layer}.hook_resid_pre", record_resid_pre(layer)))
        for letter in "qkv":
            hooks.append((f"blocks.{layer}.attn.hook_{letter}", patch_qkv(layer, letter)))
        hooks.append((f"blocks.{layer}.attn.hook_z", record_z(layer)))
        if not cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_resid_mid", record_resid_mid(layer)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", patch_mlp_out(layer)))
    hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", patch_out))
    with torch.no_grad(), eval_mode(model):
        logits = model.run_with_hooks(clean, fwd_hooks=hooks)
    logits = getattr(logits, "logits", logits)
    return logits[:, -1] if last_position_only else logits
