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

Through a TransformerLens 4 bridge of a Hugging Face model (issue 13, see
``docs/model-families.md``) also: rotary embeddings (full or partial, half-split or GPT-J's
interleaved pairs, rope scaling default/linear/dynamic/llama3/yarn; ``acdc_viz.models.rotary``),
grouped- and multi-query attention (keys and values stored per KV group, ``kv_group``), gated
MLPs, parallel attention + MLP blocks (one or two norms), missing biases (zeros), unembedding
biases, Gemma's ``1 + w`` RMSNorm and embedding scale, OLMo's parameter-free LayerNorm, per-head
q/k norms (Qwen3) and sliding-window attention (Mistral; Qwen2's upper layers). Where
Hugging Face computes in float32 inside a float64 model (RMSNorm, OLMo's LayerNorm, the eager
softmax, GPT-J's attention scores, rotary angles), we do the same, so that the logits agree to
~1e-15 (0 for most families) rather than ~1e-7. Everything else those families can have
(sandwich norms, q/k norms over all heads, soft caps, ALiBi, ...) is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from acdc_viz.errors import ModelSupportError
from acdc_viz.graph import CircuitGraph
from acdc_viz.models.rotary import Rotary, rotary_from_model
from acdc_viz.models.support import (
    ACTIVATIONS,
    check_supported,
    hf_activation,
    hf_model,
    sliding_windows,
    submodule,
)


@dataclass
class Norm:
    """A LayerNorm or RMSNorm; ``weight``/``bias`` are None for the ``*Pre`` (folded) kinds."""

    kind: str
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    offset: float = 0.0
    """The weight acts as ``offset + weight`` (Gemma's RMSNorm: 1 + w)."""
    upcast: str = ""
    """Hugging Face's float32 islands: "" computes in the input's dtype; "normed" normalises in
    float32 and casts back before the weight (Llama's RMSNorm, OLMo's LayerNorm); "all" applies
    the weight in float32 too and casts last (Gemma's RMSNorm)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast or self.offset:
            return self._hf_style(x)
        if self.kind.startswith("LN"):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight

    def _hf_style(self, x: torch.Tensor) -> torch.Tensor:
        """The norm with Hugging Face's order of casts (``upcast``) and ``offset``."""
        work = x.float() if self.upcast else x
        if self.kind.startswith("LN"):
            normed = F.layer_norm(work, x.shape[-1:], None, None, self.eps)
        else:
            normed = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        in_float32 = self.upcast == "all"
        out = normed if in_float32 else normed.to(x.dtype)
        if self.weight is not None:
            weight = self.weight.float() if in_float32 else self.weight
            out = out * (self.offset + weight if self.offset else weight)
        if self.bias is not None:
            out = out + (self.bias.float() if in_float32 else self.bias)
        return out.to(x.dtype)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class LayerWeights:
    """One block. Attention weights per head: ``W_Q`` is (heads, d_model, d_head); ``W_K``,
    ``W_V``, ``b_K`` and ``b_V`` are per key/value head (fewer than the query heads under
    grouped-query attention, see ``TransformerWeights.kv_group``). With a gated MLP, ``W_gate``
    is the activated branch and ``W_in`` the linear one."""

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
    W_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A norm of each head's query after its projection, before rotary (Qwen3); None: none."""
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    clip_qkv: float | None = None
    """q, k and v are clamped to [-clip_qkv, clip_qkv] right after their projection (OLMo);
    elementwise, so per head. None: no clipping."""
    window: int | None = None
    """Sliding-window attention (Mistral): a query sees only the keys less than ``window``
    positions back; None: every earlier key."""
    post_attn_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Sandwich norms (Gemma 2): a norm of the summed attention output (b_O included) before the
    residual add; the layer's attention is then one source (``attention_output``)."""
    post_mlp_norm: Callable[[torch.Tensor], torch.Tensor] | None = None

    def mlp(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The MLP's output for the residual-stream input ``x`` (its LayerNorm included)."""
        assert self.ln2 is not None and self.W_in is not None and self.W_out is not None
        assert self.b_in is not None and self.b_out is not None
        normed = self.ln2(x).flatten(0, -2)
        if self.W_gate is None:
            hidden = act(torch.addmm(self.b_in, normed, self.W_in))
        else:
            gate = (normed @ self.W_gate if self.b_gate is None
                    else torch.addmm(self.b_gate, normed, self.W_gate))
            hidden = act(gate) * torch.addmm(self.b_in, normed, self.W_in)
        out = torch.addmm(self.b_out, hidden, self.W_out).view(x.shape)
        return out if self.post_mlp_norm is None else self.post_mlp_norm(out)

    def attention_output(self, heads: torch.Tensor) -> torch.Tensor:
        """What the attention adds to the stream, from the per-head outputs (heads, ..., d):
        their sum plus b_O, normed when the block has sandwich norms."""
        out = heads.sum(0) + self.b_O
        return out if self.post_attn_norm is None else self.post_attn_norm(out)


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
    rotary: Rotary | None = None
    """Rotary embeddings of q and k (after their projection and bias), or None."""
    kv_group: tuple[int, ...] | None = None
    """Grouped- or multi-query attention: the key/value head each query head reads; None when
    every query head has its own."""
    parallel: bool = False
    """Attention and MLP both read the block's input stream (GPT-NeoX, Phi, GPT-J, Falcon); the
    MLP's ``ln2`` is then its own norm (GPT-NeoX) or the same as ``ln1``."""
    alibi_slopes: torch.Tensor | None = None
    """ALiBi (Bloom): each head's slope (heads,), float32; the scores of a query gain
    ``slope * key position``, rounded as Hugging Face rounds it (in float32, then cast)."""
    embed_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A norm applied to the embedding before the first block (Bloom); None: none."""
    attn_softcap: float | None = None
    """Soft-capping of the attention scores, ``cap * tanh(scores / cap)`` (Gemma 2); None: none."""
    final_softcap: float | None = None
    """Soft-capping of the logits (Gemma 2); None: none."""
    embed_scale: float | None = None
    """The token embedding is multiplied by this, in the weights' dtype (Gemma: sqrt(d_model))."""
    softmax_dtype: torch.dtype | None = None
    """The dtype of the attention softmax when it differs from the weights' (Hugging Face's eager
    attention: float32, cast back after); None: the weights' dtype."""
    scores_dtype: torch.dtype | None = None
    """The dtype of q, k and the scaled scores when it differs from the weights' (GPT-J:
    float32); None: the weights' dtype."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (``n_heads`` unless grouped- or multi-query)."""
        return self.n_heads if self.kv_group is None else max(self.kv_group) + 1

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    def circuit_graph(self, n_positions: int | None = None) -> CircuitGraph:
        """The computational graph of this model (its blocks, heads and key/value heads)."""
        return CircuitGraph(self.n_layers, self.n_heads, attn_only=self.attn_only,
                            n_positions=n_positions, parallel=self.parallel,
                            n_kv_heads=self.n_kv_heads, sandwich=self.sandwich)

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.W_E[tokens]
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        return x if self.embed_norm is None else self.embed_norm(x)

    def alibi(self, heads: slice | torch.Tensor, n_keys: int) -> torch.Tensor | None:
        """The ALiBi bias of ``heads`` for keys at positions 0..n_keys-1, (heads, 1, n_keys) in
        the weights' dtype; None without ALiBi."""
        if self.alibi_slopes is None:
            return None
        positions = torch.arange(n_keys, device=self.alibi_slopes.device, dtype=torch.float32)
        return (self.alibi_slopes[heads].float()[:, None, None] * positions).to(self.dtype)

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or values (batch, kv heads, pos, d_head) repeated for each query head."""
        if self.kv_group is None:
            return t
        return t.index_select(1, torch.tensor(self.kv_group, device=t.device))

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Per-head outputs (heads, batch, pos, d_model); q: (batch, heads, pos, d_head), k and v
        (batch, kv heads, pos, d_head), all rotated already."""
        w = self.layers[layer]
        k, v = self.expand_kv(k), self.expand_kv(v)
        if self.eager(w):
            z = self.eager_attention(q, k, v, 1.0 / w.attn_scale, w.window,
                                     self.alibi(slice(None), k.shape[2]))
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               scale=1.0 / w.attn_scale)
        return torch.einsum("bhpe,hed->hbpd", z, w.W_O)

    def eager(self, w: LayerWeights) -> bool:
        """Whether a block's attention needs ``eager_attention`` (float32 steps, a sliding
        window or soft caps) rather than ``scaled_dot_product_attention``."""
        return (self.softmax_dtype is not None or self.scores_dtype is not None
                or w.window is not None or self.attn_softcap is not None
                or self.alibi_slopes is not None)

    def eager_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float, window: int | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention as Hugging Face's eager code computes it, with its float32 steps. Keys
        cover positions 0.. and queries the last ones (the bottom-right causal triangle);
        ``window`` hides the keys ``window`` or more positions back; ``bias`` (ALiBi, per head
        and key) is added to the scaled scores."""
        if self.scores_dtype is not None:
            q32, k32 = q.to(self.scores_dtype), k.to(self.scores_dtype)
            scores = (torch.matmul(q32, k32.transpose(-1, -2)) * scale).to(q.dtype)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        if self.attn_softcap is not None:
            scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        if self.causal:
            n_q, n_k = scores.shape[-2:]
            visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            if window is not None:
                visible &= ~torch.ones_like(visible).tril(n_k - n_q - window)
            scores = scores.masked_fill(~visible, float("-inf"))
        pattern = torch.softmax(scores, dim=-1, dtype=self.softmax_dtype).to(v.dtype)
        return torch.matmul(pattern, v)

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
        """q (batch, heads, pos, d_head), k and v (batch, kv heads, pos, d_head) from one
        normalised input, q and k rotated when the model has rotary embeddings."""
        w = self.layers[layer]
        biases = self.qkv_biases(layer, 0, 0, normed.shape[1])
        q, k, v = (
            torch.einsum("bpd,hde->bhpe", normed, W) + b[None]
            for W, b in zip((w.W_Q, w.W_K, w.W_V), biases, strict=True)
        )
        if w.clip_qkv is not None:
            q, k, v = (t.clamp(-w.clip_qkv, w.clip_qkv) for t in (q, k, v))
        q = q if w.q_norm is None else w.q_norm(q)
        k = k if w.k_norm is None else w.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary.rotate(q), self.rotary.rotate(k)
        return q, k, v

    @property
    def sandwich(self) -> bool:
        """Whether the attention output is normed before the residual add (Gemma 2): each
        layer's attention is then one source, ``A{l}``, in the circuit graph."""
        return self.layers[0].post_attn_norm is not None

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        logits = self.ln_final(resid) @ self.W_U + self.b_U
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain logits, used to check the weights against the model's own forward."""
        resid = self.embed(tokens)
        for layer, w in enumerate(self.layers):
            heads = self.attention(layer, *self.qkv(layer, w.ln1(resid)))
            if self.parallel and not self.attn_only:
                resid = resid + w.attention_output(heads) + w.mlp(resid, self.act)
                continue
            resid = resid + w.attention_output(heads)
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
                return replace(obj, weight=conv(obj.weight), bias=conv(obj.bias))
            if isinstance(obj, LayerWeights):
                return LayerWeights(**{k: conv(v) for k, v in vars(obj).items()})
            if isinstance(obj, Rotary):
                return obj.to(device)
            return obj

        fields = {k: conv(v) for k, v in vars(self).items() if k != "layers"}
        if self.alibi_slopes is not None:          # float32 whatever the run's dtype, as in HF
            fields["alibi_slopes"] = self.alibi_slopes.to(device)
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


def _bridge_norm(model: Any, sd: dict[str, torch.Tensor], prefix: str, kind: str | None,
                 eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm at ``prefix`` of a bridge, computed as the Hugging Face module it wraps does."""
    module = getattr(submodule(model, prefix), "original_component", None)
    name = type(module).__name__
    weight = sd.get(f"{prefix}.weight")
    if name == "OlmoLayerNorm":                      # no parameters, float32, eps fixed
        return Norm("LN", 1e-5, upcast="normed")
    if name.endswith("RMSNorm") and weight is not None:
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", eps)))
        if name.startswith("Gemma"):
            return Norm("RMS", eps, weight, offset=1.0, upcast="all")
        return Norm("RMS", eps, weight, upcast="normed")
    if isinstance(module, torch.nn.LayerNorm):
        eps = float(module.eps)
        if weight is None:
            return Norm("LN", eps)
        return _norm(model, sd, prefix, "LN", eps)
    return _norm(model, sd, prefix, kind, eps)


def _stacked(model: Any, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``model.<name>`` (a bias stacked over layers), or zeros of ``shape`` where the model has
    none (TransformerLens 4 raises AttributeError for a bias-free projection)."""
    try:
        value = getattr(model, name)
    except AttributeError:
        value = None
    if value is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return value


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _read_layer(model: Any, cfg: Any, sd: dict[str, torch.Tensor], layer: int,
                tensors: dict[str, torch.Tensor], scale: float, parallel: bool) -> LayerWeights:
    """One block's weights; ``tensors`` holds the stacked weight surface."""
    kind, eps = cfg.normalization_type, float(getattr(cfg, "eps", 1e-5))
    read_norm = _bridge_norm if hf_model(model) is not None else _norm
    prefix = f"blocks.{layer}"
    t = {k: _clone(v[layer]) for k, v in tensors.items()}
    lw = LayerWeights(
        ln1=read_norm(model, sd, f"{prefix}.ln1", kind, eps),
        W_Q=t["W_Q"], b_Q=t["b_Q"], W_K=t["W_K"], b_K=t["b_K"], W_V=t["W_V"], b_V=t["b_V"],
        W_O=t["W_O"], b_O=t["b_O"], attn_scale=scale,
    )
    if submodule(model, f"{prefix}.ln1_post") is not None:       # sandwich norms (Gemma 2)
        lw.post_attn_norm = read_norm(model, sd, f"{prefix}.ln1_post", kind, eps)
    if submodule(model, f"{prefix}.attn.q_norm") is not None:     # per head: support checked it
        lw.q_norm, lw.k_norm = (read_norm(model, sd, f"{prefix}.attn.{n}", "RMS", eps)
                                for n in ("q_norm", "k_norm"))
    hf = hf_model(model)
    if hf is not None:
        lw.window = sliding_windows(hf.config, int(cfg.n_layers))[layer]
        clip = getattr(hf.config, "clip_qkv", None)
        lw.clip_qkv = None if clip is None else float(clip)
    if "W_in" not in tensors:
        return lw
    own_ln2 = (submodule(model, f"{prefix}.ln2") is not None or f"{prefix}.ln2.weight" in sd
               or f"{prefix}.ln2.w" in sd or not parallel or kind is None)
    lw.ln2 = read_norm(model, sd, f"{prefix}.ln2", kind, eps) if own_ln2 else lw.ln1
    lw.W_in, lw.b_in, lw.W_out, lw.b_out = t["W_in"], t["b_in"], t["W_out"], t["b_out"]
    if submodule(model, f"{prefix}.ln2_post") is not None:
        lw.post_mlp_norm = read_norm(model, sd, f"{prefix}.ln2_post", kind, eps)
    if "W_gate" in t:
        lw.W_gate = t["W_gate"]
        gate_bias = sd.get(f"{prefix}.mlp.gate.bias")
        lw.b_gate = None if gate_bias is None else _clone(gate_bias)
    return lw


def _weight_surface(model: Any, attn_only: bool) -> dict[str, torch.Tensor]:
    """The stacked weights (W_Q ... b_out, W_gate), with zeros for missing biases."""
    W_Q, W_K, W_O = model.W_Q, model.W_K, model.W_O
    t = {"W_Q": W_Q, "W_K": W_K, "W_V": model.W_V, "W_O": W_O,
         "b_Q": _stacked(model, "b_Q", (*W_Q.shape[:2], W_Q.shape[-1]), W_Q),
         "b_K": _stacked(model, "b_K", (*W_K.shape[:2], W_K.shape[-1]), W_K),
         "b_V": _stacked(model, "b_V", (*W_K.shape[:2], W_K.shape[-1]), W_K),
         "b_O": _stacked(model, "b_O", (W_O.shape[0], W_O.shape[-1]), W_O)}
    if not attn_only:
        W_in, W_out = model.W_in, model.W_out
        t |= {"W_in": W_in, "W_out": W_out,
              "b_in": _stacked(model, "b_in", (W_in.shape[0], W_in.shape[-1]), W_in),
              "b_out": _stacked(model, "b_out", (W_out.shape[0], W_out.shape[-1]), W_out)}
        try:
            gate = getattr(model, "W_gate", None)
        except AttributeError:
            gate = None
        if gate is not None:
            t["W_gate"] = gate
    return t


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2022) in float32: for the largest power of two p <= n,
    the geometric sequence 2^(-8 i / p), i = 1..p; the remaining heads take every other term of
    the sequence for 2p."""
    def geometric(p: int, count: int, step: int) -> torch.Tensor:
        base = torch.full((), 2 ** (-(2 ** -(math.log2(p) - 3))), dtype=torch.float32)
        return torch.pow(base, torch.arange(1, 1 + step * count, step, dtype=torch.int32))

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(p, p, 1)
    if p < n_heads:
        slopes = torch.cat([slopes, geometric(2 * p, min(p, n_heads - p), 2)])
    return slopes


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _kv_group(n_heads: int, n_kv: int) -> tuple[int, ...] | None:
    """The KV head of each query head (TransformerLens' and HF's ``repeat_interleave``)."""
    if n_kv == n_heads:
        return None
    if n_kv < 1 or n_heads % n_kv:
        raise ModelSupportError(f"{n_heads} query heads cannot share {n_kv} key/value heads")
    return tuple(h // (n_heads // n_kv) for h in range(n_heads))


def _read_weights(model: Any, cfg: Any) -> TransformerWeights:
    """Everything ``from_model`` reads, once ``_check_supported`` has passed."""
    hf = hf_model(model)
    sd = model.state_dict()
    attn_only = bool(getattr(cfg, "attn_only", False))
    tensors = _weight_surface(model, attn_only)
    n_heads, d_head = int(cfg.n_heads), int(tensors["W_Q"].shape[-1])
    base_scale = (
        (float(cfg.attn_scale) if getattr(cfg, "attn_scale", -1.0) > 0 else cfg.d_head**0.5)
        if getattr(cfg, "use_attn_scale", True) else 1.0
    )
    hf_config = getattr(hf, "config", None)
    query_scalar = getattr(hf_config, "query_pre_attn_scalar", None)
    if query_scalar:                                          # Gemma 2: not sqrt(d_head)
        base_scale = float(query_scalar) ** 0.5
    by_layer = getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False)
                    or type(submodule(model, "blocks.0")).__name__ == "ParallelBlockBridge")
    layers = [_read_layer(model, cfg, sd, layer, tensors,
                          base_scale * (layer + 1 if by_layer else 1), parallel)
              for layer in range(int(cfg.n_layers))]
    pos = getattr(cfg, "positional_embedding_type", "standard")
    kind, eps = cfg.normalization_type, float(getattr(cfg, "eps", 1e-5))
    if hf is not None:
        ln_final = _bridge_norm(model, sd, "ln_final", kind, eps)
        act_name = hf_activation(hf.config) or getattr(cfg, "act_fn", None)
    else:
        ln_final = _norm(model, sd, "ln_final",
                         getattr(cfg, "final_rms", False) and "RMS" or kind, eps)
        act_name = getattr(cfg, "act_fn", None)
    model_type = str(getattr(hf_config, "model_type", ""))
    if model_type == "bloom":                 # its config names no activation
        act_name = "bloom_gelu"
    attn_bridge = type(submodule(model, "blocks.0.attn")).__name__
    bloom = model_type == "bloom"
    W_U = model.W_U
    return TransformerWeights(
        W_E=_clone(model.W_E),
        W_pos=_clone(model.W_pos) if pos == "standard" else None,
        layers=layers,
        ln_final=ln_final,
        W_U=_clone(W_U),
        b_U=(_clone(model.b_U) if getattr(model, "b_U", None) is not None
             else torch.zeros(W_U.shape[1], dtype=W_U.dtype, device=W_U.device)),
        act=ACTIVATIONS.get(act_name or "relu", F.relu),
        causal=getattr(cfg, "attention_dir", "causal") != "bidirectional",
        n_heads=n_heads,
        attn_only=attn_only,
        d_vocab=W_U.shape[1],
        n_ctx=int(cfg.n_ctx),
        rotary=rotary_from_model(hf, d_head) if pos == "rotary" else None,
        kv_group=_kv_group(n_heads, int(tensors["W_K"].shape[1])),
        parallel=parallel,
        attn_softcap=_optional_float(getattr(hf_config, "attn_logit_softcapping", None)),
        final_softcap=_optional_float(getattr(hf_config, "final_logit_softcapping", None)),
        embed_scale=(float(getattr(hf_config, "hidden_size", 0)) ** 0.5
                     if model_type.startswith("gemma") else None),
        # HF's eager attention (which these bridges reproduce) takes its softmax in float32;
        # GPT-J's computes q.k in float32 too. GPT-NeoX's and Falcon's bridges use the model's
        # dtype throughout.
        softmax_dtype=(torch.float32 if attn_bridge == "PositionEmbeddingsAttentionBridge"
                       or bloom else None),
        alibi_slopes=alibi_slopes(n_heads) if bloom else None,
        embed_norm=_bridge_norm(model, sd, "embed_ln", "LN", eps) if bloom else None,
        scores_dtype=torch.float32 if model_type == "gptj" else None,
    )


def from_model(model: Any, check_tokens: torch.Tensor | None = None, *,
               atol: float = 1e-4) -> TransformerWeights:
    """Read a TransformerLens model's weights (4.x bridge or 3.x HookedTransformer).

    A model with a feature the adapter does not model is refused first, from its configs and
    module tree alone (``ModelSupportError`` naming the feature). If ``check_tokens`` is given,
    our forward is compared with ``model(check_tokens)``, and a ``ModelSupportError`` is raised
    when they differ by more than ``atol`` (relative to the logits' scale).
    """
    cfg = model_config(model)
    check_supported(cfg, model)
    try:
        with torch.no_grad():
            weights = _read_weights(model, cfg)
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


def model_hash(model: Any) -> str:
    """The config hash a trace records for ``model``: ``config_hash`` of its config, or
    ``"weights"`` for bare ``TransformerWeights`` (a resumed trace must have the same)."""
    if isinstance(model, TransformerWeights):
        return "weights"
    return config_hash(model_config(model))
