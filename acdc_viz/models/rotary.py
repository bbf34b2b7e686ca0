"""Rotary position embeddings, reproduced bit for bit from a Hugging Face model's rotary module.

Hugging Face computes the rotation angles ``position * inv_freq`` and their cos/sin in float32,
even in a float64 model, scales them by the rope variant's ``attention_scaling`` (yarn) and only
then casts them to the model's dtype. ``Rotary`` keeps the module's float32 ``inv_freq`` and
repeats those steps, so its cos/sin equal the model's exactly (``rotary_from_model`` checks that
against the module itself). The scaling variants that only change ``inv_freq`` (linear, llama3,
yarn) come for free; "dynamic" NTK scaling recomputes ``inv_freq`` from the sequence length.

Two pairings of the rotated dimensions exist: Hugging Face's ``rotate_half`` (dimension i with
i + dim/2, GPT-NeoX, Llama and nearly everyone) and GPT-J's interleaved pairs (2i, 2i + 1). Only
the first ``dim`` dimensions of a head rotate (partial rotary: GPT-NeoX, Phi, GPT-J); the rest
pass through.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch

from acdc_viz.errors import ModelSupportError

#: Rope variants whose angles ``rotary_from_model`` reproduces.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class DynamicNTK:
    """Hugging Face's "dynamic" rope: beyond ``max_positions`` tokens the base grows with the
    sequence length (computed, as HF does, in float32 tensor arithmetic)."""

    base: float
    dim: int
    factor: float
    max_positions: int

    def inv_freq(self, seq_len: int) -> torch.Tensor | None:
        """The frequencies for a sequence of ``seq_len`` tokens; None while unscaled.

        Hugging Face's module is stateful (after a longer sequence it keeps that length's
        frequencies); this is what it computes for a sequence of this length seen first.
        """
        if seq_len <= self.max_positions:
            return None
        n = torch.tensor(seq_len)
        n = torch.maximum(n, torch.tensor(self.max_positions, dtype=n.dtype))
        growth = (self.factor * n / self.max_positions) - (self.factor - 1)
        base = self.base * growth ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).to(dtype=torch.float) / self.dim
        return 1.0 / (base**exponents)


@dataclass
class Rotary:
    """The rotation of q and k: ``inv_freq`` (dim/2,) in float32 as the model's module holds it."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    interleaved: bool = False
    """GPT-J's pairing (2i, 2i + 1); otherwise Hugging Face's ``rotate_half`` (i, i + dim/2)."""
    dynamic: DynamicNTK | None = None

    @property
    def dim(self) -> int:
        """How many leading dimensions of each head rotate."""
        return 2 * self.inv_freq.numel()

    def to(self, device: torch.device | str | None) -> Rotary:
        """A copy on ``device``; the frequencies stay float32 whatever the weights' dtype."""
        return replace(self, inv_freq=self.inv_freq.to(device=device))

    def cos_sin(self, start: int, stop: int, seq_len: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (stop - start, dim/2) of positions ``start..stop-1``, in ``dtype``, for a
        sequence of ``seq_len`` tokens (only "dynamic" rope depends on it)."""
        inv_freq = self.inv_freq
        if self.dynamic is not None:
            scaled = self.dynamic.inv_freq(seq_len)
            inv_freq = inv_freq if scaled is None else scaled.to(inv_freq.device)
        positions = torch.arange(start, stop, device=inv_freq.device)
        angles = positions[:, None].float() * inv_freq.float()
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, x: torch.Tensor, start: int = 0, seq_len: int | None = None) -> torch.Tensor:
        """Rotate q or k (..., positions, d_head) whose positions are ``start, start + 1, ...``
        of a sequence of ``seq_len`` tokens (default: the last position is the last token)."""
        n = x.shape[-2]
        cos, sin = self.cos_sin(start, start + n, seq_len or start + n, x.dtype)
        dim = self.dim
        if self.interleaved:
            first, second = x[..., 0:dim:2], x[..., 1:dim:2]
        else:
            first, second = x[..., : dim // 2], x[..., dim // 2 : dim]
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
        if self.interleaved:
            rotated = torch.stack([new_first, new_second], dim=-1).flatten(-2)
        else:
            rotated = torch.cat([new_first, new_second], dim=-1)
        return torch.cat([rotated, x[..., dim:]], dim=-1) if dim < x.shape[-1] else rotated


def _rotary_module(hf_model: Any) -> Any:
    """The Hugging Face model's one rotary-embedding module (not TransformerLens' wrapper)."""
    found = {id(m): m for m in hf_model.modules()
             if type(m).__name__.endswith("RotaryEmbedding")}
    if len(found) != 1:
        raise ModelSupportError(
            f"expected one rotary-embedding module in the Hugging Face model, found {len(found)} "
            "(per-layer rotary embeddings, as in Gemma 3, are not supported)")
    return next(iter(found.values()))


def _gptj_rotary(module: Any, dim: int) -> Rotary:
    """GPT-J keeps a float32 sin/cos table ``embed_positions`` (positions, [sin | cos])."""
    table = module.embed_positions
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
    rotary = Rotary(inv_freq.to(device=table.device, dtype=torch.float32), interleaved=True)
    n = min(int(table.shape[0]), 2048)
    cos, sin = rotary.cos_sin(0, n, n, torch.float32)
    if table.shape[-1] != dim or not (torch.equal(table[:n, : dim // 2].float(), sin)
                                      and torch.equal(table[:n, dim // 2 :].float(), cos)):
        raise ModelSupportError("GPT-J's rotary table (embed_positions) is not the sinusoid "
                                f"table of rotary_dim={dim} with base 10000")
    return rotary


def rotary_from_model(hf_model: Any, d_head: int) -> Rotary:
    """The ``Rotary`` of a Hugging Face model, checked against its own rotary module."""
    config = hf_model.config
    module = _rotary_module(hf_model)
    if config.model_type == "gptj":
        return _gptj_rotary(module, int(getattr(config, "rotary_dim", None) or d_head))
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES or params.get("llama_4_scaling_beta") is not None:
        raise ModelSupportError(
            f"rope scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if not hasattr(module, "inv_freq"):
        raise ModelSupportError(f"the rotary module {type(module).__name__} has no inv_freq")
    inv_freq = getattr(module, "original_inv_freq", module.inv_freq).detach().float().clone()
    dynamic = None
    if rope_type == "dynamic":
        dynamic = DynamicNTK(float(params["rope_theta"]), 2 * inv_freq.numel(),
                             float(params["factor"]), int(config.max_position_embeddings))
    rotary = Rotary(inv_freq, float(getattr(module, "attention_scaling", 1.0)), False, dynamic)
    if rotary.dim > d_head:
        raise ModelSupportError(f"rotary dimension {rotary.dim} exceeds d_head={d_head}")
    # The module's own output for the first positions. A copy, called with fewer positions than
    # the unscaled context: a dynamic module then resets to its unscaled frequencies, whatever
    # sequences the model has seen, and the model's own module is left as it was.
    n = max(1, min(int(getattr(config, "max_position_embeddings", 64) or 64) - 1, 2048))
    probe = torch.zeros(1, dtype=torch.float32, device=inv_freq.device)
    with torch.no_grad():
        theirs_cos, theirs_sin = copy.deepcopy(module)(
            probe, torch.arange(n, device=inv_freq.device)[None])
    cos, sin = rotary.cos_sin(0, n, n, torch.float32)
    half = rotary.dim // 2
    for theirs, ours in ((theirs_cos[0], cos), (theirs_sin[0], sin)):
        if theirs.shape[-1] != rotary.dim or not (torch.equal(theirs[:, :half], ours)
                                                  and torch.equal(theirs[:, half:], ours)):
            raise ModelSupportError(
                f"the rotary module {type(module).__name__} computes cos/sin differently from "
                "Hugging Face's standard rotary embedding (position * inv_freq in float32)")
    return rotary
