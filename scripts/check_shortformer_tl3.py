"""Check acdc_viz's shortformer reader and engine against TransformerLens 3's HookedTransformer.

TransformerLens 4 has no shortformer model, so the tests compare with a reference written in
plain torch (tests/test_shortformer.py). This script closes the loop against the implementation
the ACDC paper ran on: TransformerLens 3.x ``HookedTransformer`` with
``positional_embedding_type="shortformer"``, patched the way the ACDC code patches it
(``use_split_qkv_input`` + ``use_attn_result``: a removed edge adds ``ablated - current`` of its
source to the destination's ``hook_{q,k,v}_input``, or to the final ``hook_resid_post``).

TransformerLens 3 cannot be installed next to 4, so unpack its wheel somewhere else:

    pip download transformer-lens==3.9.0 better-abc --no-deps -d /tmp/tl3
    cd /tmp/tl3 && for w in *.whl; do python -m zipfile -e "$w" site; done
    PYTHONPATH=/tmp/tl3/site python scripts/check_shortformer_tl3.py

It builds a random checkpoint with redwood_attn_2l's key names (tests/conftest.py), loads it both
ways, and prints the largest logit differences as JSON.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import shortformer_checkpoint, token_pairs
from transformer_lens import HookedTransformer, HookedTransformerConfig

from acdc_viz.graph import CircuitGraph
from acdc_viz.models.shortformer import load_redwood_weights
from acdc_viz.patching import CircuitRunner


def tl_model(sd: dict, cfg: dict) -> HookedTransformer:
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_ctx=cfg["n_ctx"], d_head=cfg["d_head"],
        n_heads=cfg["n_heads"], d_vocab=cfg["d_vocab"], attn_only=True, act_fn="gelu_new",
        normalization_type="LN", positional_embedding_type="shortformer", eps=cfg["eps"],
        dtype=torch.float64, device="cpu"))
    missing, unexpected = model.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
    assert not missing, missing
    assert all(k.endswith(("attn.mask", "attn.IGNORE")) for k in unexpected), unexpected
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    return model.eval()


def sources(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens)
    out = {"Embed": cache["blocks.0.hook_resid_pre"]}
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            out[f"A{layer}.{h}"] = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
    return out


def patched_logits(model, clean, removed, ablated) -> torch.Tensor:
    current: dict[str, torch.Tensor] = {}

    def correction(dest: str, like: torch.Tensor) -> torch.Tensor:
        corr = torch.zeros_like(like)
        for e in removed:
            if e.dest.name == dest:
                diff = ablated[e.src.name] - current[e.src.name]
                if e.position is None:
                    corr += diff
                else:
                    corr[:, e.position] += diff[:, e.position]
        return corr

    def record_embed(x, hook):
        current["Embed"] = x
        return x

    def patch_input(layer, letter):
        def hook(x, hook):           # (batch, pos, head, d_model)
            x = x.clone()
            for h in range(model.cfg.n_heads):
                x[:, :, h] += correction(f"A{layer}.{h}.{letter}", x[:, :, h])
            return x
        return hook

    def record_result(layer):
        def hook(x, hook):
            for h in range(model.cfg.n_heads):
                current[f"A{layer}.{h}"] = x[:, :, h]
            return x
        return hook

    def patch_out(x, hook):
        return x + correction("Out", x)

    hooks = [("blocks.0.hook_resid_pre", record_embed)]
    for layer in range(model.cfg.n_layers):
        hooks += [(f"blocks.{layer}.hook_{x}_input", patch_input(layer, x)) for x in "qkv"]
        hooks.append((f"blocks.{layer}.attn.hook_result", record_result(layer)))
    hooks.append((f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", patch_out))
    return model.run_with_hooks(clean, fwd_hooks=hooks)


def main() -> None:
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        redwood = {"n_heads": 8, "d_model": 256, "d_head": 32, "d_vocab": 50259, "n_ctx": 2048}
        for label, shape in (("small", {}), ("redwood-shaped", redwood)):
            directory, sd, cfg = shortformer_checkpoint(Path(tmp) / label, **shape)
            model = tl_model(sd, cfg)
            clean, corrupt = token_pairs(batch=3, pos=7, d_vocab=cfg["d_vocab"])
            weights = load_redwood_weights(directory, dtype=torch.float64)
            with torch.no_grad():
                full = model(clean)
                report[f"{label} forward"] = (weights.forward(clean) - full).abs().max().item()
                ablated = sources(model, corrupt)
                for positions in (False, True):
                    graph = CircuitGraph(cfg["n_layers"], cfg["n_heads"], attn_only=True,
                                         n_positions=7 if positions else None)
                    runner = CircuitRunner(weights, graph, clean, corrupt, "resample",
                                           last_position_only=False)
                    removed = random.Random(0).sample(list(graph.edges), len(graph.edges) // 3)
                    for e in removed:
                        runner.set_removed(e, True)
                    theirs = patched_logits(model, clean, removed, ablated)
                    key = f"{label} circuit, positions={positions}"
                    report[key] = (runner.logits_from(0, "attn") - theirs).abs().max().item()
                    report[key + " (effect of the removals)"] = (theirs - full).abs().max().item()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
