"""Per-head access to any TransformerLens model, through its weights.

ACDC needs to feed each head its own query, key and value input, and to read each head's
output separately. TransformerLens offers that through ``use_split_qkv_input`` and
``use_attn_result``, but those make every forward pass 7.5x slower, and TransformerLens 4's
native and legacy bridges do not offer them at all. So we read the weights once into
``TransformerWeights`` (plain tensors, the same layout on every backend) and run the blocks
ourselves. ``from_model`` checks our forward against the model's own before anything uses it,
so an architecture feature we do not model fails loudly instead of silently giving wrong
circuits.

Supported: learned (or no) positional embeddings, LayerNorm / RMSNorm (with or without weights)
or none, the usual MLP activations, causal or bidirectional attention, attention-only models.
Shortformer positions (``TransformerWeights.W_pos_qk``) too, but no TransformerLens 4 bridge
runs them: ``acdc_viz.models.shortformer`` reads such checkpoints itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from acdc_viz.errors import ModelSupportError

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)


@dataclass
class Norm:
    """A LayerNorm or RMSNorm; ``weight``/``bias`` are None for the ``*Pre`` (folded) kinds."""

    kind: str
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("LN"):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class LayerWeights:
    """One block. Attention weights per head: ``W_Q`` is (heads, d_model, d_head)."""

    ln1: Callable[[torch.Tensor], torch.Tensor]
    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    attn_scale: float
    ln2: Callable[[torch.Tensor], torch.Tensor] | None = None
    W_in: torch.Tensor | None = None
    b_in: torch.Tensor | None = None
    W_out: torch.Tensor | None = None
    b_out: torch.Tensor | None = None

    def mlp(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The MLP's output for the residual-stream input ``x`` (its LayerNorm included)."""
        assert self.ln2 is not None and self.W_in is not None and self.W_out is not None
        assert self.b_in is not None and self.b_out is not None
        hidden = act(torch.addmm(self.b_in, self.ln2(x).flatten(0, -2), self.W_in))
        return torch.addmm(self.b_out, hidden, self.W_out).view(x.shape)


@dataclass
class TransformerWeights:
    """A decoder-only transformer as plain tensors, the engine's view of any TL model."""

    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    layers: list[LayerWeights]
    ln_final: Callable[[torch.Tensor], torch.Tensor]
    W_U: torch.Tensor
    b_U: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    causal: bool
    n_heads: int
    attn_only: bool
    d_vocab: int
    n_ctx: int
    W_pos_qk: torch.Tensor | None = None
    """Shortformer positions (n_ctx, d_model), or None. TransformerLens' ``"shortformer"``
    embedding adds them to each layer's query and key inputs *after* ``ln1``, never to the stream
    or the values (``W_pos`` is then None). ACDC's corrections act on the stream before ``ln1``,
    so the positions are no source: they are never ablated."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.W_E[tokens]
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        return x

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Per-head outputs (heads, batch, pos, d_model); q, k, v: (batch, heads, pos, d_head)."""
        w = self.layers[layer]
        z = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=1.0 / w.attn_scale)
        return torch.einsum("bhpe,hed->hbpd", z, w.W_O)

    def qkv_biases(self, layer: int, q_start: int, kv_start: int,
                   stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The biases of q, k and v, each (heads, positions or 1, d_head).

        With shortformer positions, ``(ln1(x) + pos) @ W + b = ln1(x) @ W + (pos @ W + b)``: q's
        bias then covers positions ``q_start..stop-1`` and k's ``kv_start..stop-1``.
        """
        w = self.layers[layer]
        b_q, b_k, b_v = (b[:, None, :] for b in (w.b_Q, w.b_K, w.b_V))
        if self.W_pos_qk is not None:
            b_q = b_q + torch.einsum("pd,hde->hpe", self.W_pos_qk[q_start:stop], w.W_Q)
            b_k = b_k + torch.einsum("pd,hde->hpe", self.W_pos_qk[kv_start:stop], w.W_K)
        return b_q, b_k, b_v

    def qkv(self, layer: int,
            normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (batch, heads, pos, d_head) for all heads from one normalised input."""
        w = self.layers[layer]
        biases = self.qkv_biases(layer, 0, 0, normed.shape[1])
        q, k, v = (
            torch.einsum("bpd,hde->bhpe", normed, W) + b[None]
            for W, b in zip((w.W_Q, w.W_K, w.W_V), biases, strict=True)
        )
        return q, k, v

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        return self.ln_final(resid) @ self.W_U + self.b_U

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain logits, used to check the weights against the model's own forward."""
        resid = self.embed(tokens)
        for layer, w in enumerate(self.layers):
            heads = self.attention(layer, *self.qkv(layer, w.ln1(resid)))
            resid = resid + heads.sum(0) + w.b_O
            if not self.attn_only:
                resid = resid + w.mlp(resid, self.act)
        return self.unembed(resid)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TransformerWeights:
        """A copy on another device or in another float dtype."""

        def conv(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.to(device=device, dtype=dtype if obj.is_floating_point() else None)
            if isinstance(obj, Norm):
                return Norm(obj.kind, obj.eps, conv(obj.weight), conv(obj.bias))
            if isinstance(obj, LayerWeights):
                return LayerWeights(**{k: conv(v) for k, v in vars(obj).items()})
            return obj

        fields = {k: conv(v) for k, v in vars(self).items() if k != "layers"}
        return TransformerWeights(layers=[conv(x) for x in self.layers], **fields)


def model_config(model: Any) -> Any:
    """``model.cfg``, or a ModelSupportError saying what kind of model acdc_viz expects."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_layers"):
        raise ModelSupportError(
            f"{type(model).__name__} has no TransformerLens config (model.cfg with n_layers, "
            "n_heads, ...). acdc_viz runs on TransformerLens models: a TransformerLens 4 "
            "TransformerBridge (TransformerBridge.boot_transformers(...)) or a TransformerLens 3 "
            "HookedTransformer."
        )
    return cfg


def _norm(model: Any, sd: dict[str, torch.Tensor], prefix: str, kind: str | None,
          eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind is None:
        return _identity
    if kind.endswith("Pre"):
        return Norm(kind, eps)
    weight = sd.get(f"{prefix}.weight", sd.get(f"{prefix}.w"))
    bias = sd.get(f"{prefix}.bias", sd.get(f"{prefix}.b"))
    if weight is None:
        raise ModelSupportError(f"could not find the {kind} weights of {prefix!r} in the model's "
                                "state_dict")
    return Norm(kind, eps, weight, bias if kind == "LN" else None)


def _check_supported(cfg: Any) -> None:
    """Refuse a config with a feature the engine does not model, naming every one of them."""
    problems = []
    pos = getattr(cfg, "positional_embedding_type", "standard")
    if pos not in ("standard", None):
        problems.append(f"positional_embedding_type={pos!r} (supported: 'standard')")
    if getattr(cfg, "normalization_type", None) not in _NORMS:
        problems.append(f"normalization_type={cfg.normalization_type!r} (supported: {_NORMS})")
    if not getattr(cfg, "attn_only", False) and getattr(cfg, "act_fn", None) not in _ACTIVATIONS:
        problems.append(f"act_fn={cfg.act_fn!r} (supported: {sorted(_ACTIVATIONS)})")
    for flag in ("parallel_attn_mlp", "gated_mlp", "use_local_attn", "use_qk_norm",
                 "use_normalization_before_and_after", "post_embedding_ln"):
        if getattr(cfg, flag, False):
            problems.append(f"{flag}=True")
    kv = getattr(cfg, "n_key_value_heads", None)
    if kv not in (None, cfg.n_heads):
        problems.append(f"grouped-query attention (n_key_value_heads={kv})")
    if (getattr(cfg, "attn_scores_soft_cap", -1.0) > 0
            or getattr(cfg, "output_logits_soft_cap", -1.0) > 0):
        problems.append("logit soft-capping")
    if problems:
        raise ModelSupportError(
            "acdc_viz cannot give per-head access to this model yet: " + "; ".join(problems) + ". "
            "Supported today: GPT-2-style decoder-only models (learned positions, LayerNorm/"
            "RMSNorm or none, attention-only or with a plain MLP). Please open an issue naming the "
            "architecture."
        )


def from_model(model: Any, check_tokens: torch.Tensor | None = None, *,
               atol: float = 1e-4) -> TransformerWeights:
    """Read a TransformerLens model's weights (4.x bridge or 3.x HookedTransformer).

    If ``check_tokens`` is given, our forward is compared with ``model(check_tokens)``, and a
    ``ModelSupportError`` is raised when they differ by more than ``atol`` (relative to the
    logits' scale).
    """
    cfg = model_config(model)
    _check_supported(cfg)
    try:
        with torch.no_grad():
            sd = model.state_dict()
            n_layers, n_heads = cfg.n_layers, cfg.n_heads
            eps = float(getattr(cfg, "eps", 1e-5))
            kind = cfg.normalization_type
            attn_only = bool(getattr(cfg, "attn_only", False))
            d_head = cfg.d_head
            base_scale = (
                (float(cfg.attn_scale) if getattr(cfg, "attn_scale", -1.0) > 0 else d_head**0.5)
                if getattr(cfg, "use_attn_scale", True) else 1.0
            )
            W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O
            b_Q, b_K, b_V, b_O = model.b_Q, model.b_K, model.b_V, model.b_O
            if not attn_only:
                W_in, b_in, W_out, b_out = model.W_in, model.b_in, model.W_out, model.b_out
            layers = []
            for layer in range(n_layers):
                by_layer = getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
                scale = base_scale * (layer + 1 if by_layer else 1)
                lw = LayerWeights(
                    ln1=_norm(model, sd, f"blocks.{layer}.ln1", kind, eps),
                    W_Q=W_Q[layer].detach().clone(), b_Q=b_Q[layer].detach().clone(),
                    W_K=W_K[layer].detach().clone(), b_K=b_K[layer].detach().clone(),
                    W_V=W_V[layer].detach().clone(), b_V=b_V[layer].detach().clone(),
                    W_O=W_O[layer].detach().clone(), b_O=b_O[layer].detach().clone(),
                    attn_scale=scale,
                )
                if not attn_only:
                    lw.ln2 = _norm(model, sd, f"blocks.{layer}.ln2", kind, eps)
                    lw.W_in, lw.b_in = W_in[layer].detach().clone(), b_in[layer].detach().clone()
                    lw.W_out = W_out[layer].detach().clone()
                    lw.b_out = b_out[layer].detach().clone()
                layers.append(lw)
            pos = getattr(cfg, "positional_embedding_type", "standard")
            weights = TransformerWeights(
                W_E=model.W_E.detach().clone(),
                W_pos=model.W_pos.detach().clone() if pos == "standard" else None,
                layers=layers,
                ln_final=_norm(model, sd, "ln_final",
                               getattr(cfg, "final_rms", False) and "RMS" or kind, eps),
                W_U=model.W_U.detach().clone(),
                b_U=(model.b_U.detach().clone() if getattr(model, "b_U", None) is not None
                     else torch.zeros(model.W_U.shape[1], dtype=model.W_U.dtype,
                                      device=model.W_U.device)),
                act=_ACTIVATIONS.get(getattr(cfg, "act_fn", None) or "relu", F.relu),
                causal=getattr(cfg, "attention_dir", "causal") != "bidirectional",
                n_heads=n_heads,
                attn_only=attn_only,
                d_vocab=model.W_U.shape[1],
                n_ctx=int(cfg.n_ctx),
            )
    except (AttributeError, NotImplementedError, KeyError, IndexError) as exc:
        raise ModelSupportError(
            f"could not read the weights ACDC needs from {type(model).__name__}: {exc!r}. Expected "
            "the TransformerLens weight surface (W_E, W_pos, W_Q/W_K/W_V/W_O with biases, "
            "W_in/W_out, W_U)."
        ) from exc
    if check_tokens is not None:
        verify(model, weights, check_tokens, atol=atol)
    return weights


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Run the model without dropout, restoring every module's training flag afterwards.

    A TransformerLens 4 bridge wraps a Hugging Face model whose root modules are not among its
    own ``modules()``, so both are saved and ``model.eval()`` does the switching.
    """
    roots = [model, getattr(model, "original_model", None)]
    modules = {id(m): m for r in roots if hasattr(r, "modules") for m in r.modules()}
    flags = {k: m.training for k, m in modules.items()}
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        for k, m in modules.items():
            m.training = flags[k]


def verify(model: Any, weights: TransformerWeights, tokens: torch.Tensor, *,
           atol: float = 1e-4) -> float:
    """Compare ``weights.forward`` with the model's logits (dropout off); raise if they differ."""
    with torch.no_grad(), eval_mode(model):
        theirs = model(tokens.to(weights.device))
        theirs = getattr(theirs, "logits", theirs).to(weights.dtype)
        ours = weights.forward(tokens.to(weights.device))
    err = (theirs - ours).abs().max().item()
    scale = max(1.0, theirs.abs().max().item())
    if not err <= atol * scale:
        raise ModelSupportError(
            f"acdc_viz's per-head view of this model does not reproduce its forward pass (max "
            f"logit difference {err:.3g}, tolerance {atol * scale:.3g}). The architecture has a "
            "feature the engine does not model; running ACDC on it would give wrong circuits. "
            "Please report the model's config."
        )
    return err


def config_hash(cfg: Any) -> str:
    """A short stable hash of the config fields that change the computation."""
    keys = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
            "normalization_type", "attn_only", "positional_embedding_type", "attention_dir")
    blob = json.dumps({k: str(getattr(cfg, k, None)) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
