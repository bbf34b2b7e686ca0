"""Faithfulness metrics: how far a circuit's output is from the full model's. Lower is better.

ACDC removes an edge when the metric grows by less than tau, so every metric here is minimised
and measured against the full model's logits on the clean prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from acdc_viz.errors import SettingsError

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A metric ``fn(circuit_logits, full_logits) -> scalar tensor``.

    With ``last_position_only`` the logits passed in are (batch, vocab) at the last position,
    which lets the engine skip unembedding the other positions. Otherwise they are
    (batch, pos, vocab).
    """

    name: str
    fn: MetricFn
    last_position_only: bool = True
    many_fn: MetricFn | None = None     # the metric of each of a stack of circuits, vectorised

    def __call__(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> float:
        value = self.fn(circuit_logits, full_logits)
        return float(value)

    def many(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        """The metric of each circuit in ``circuit_logits`` (circuits, batch, ...): a (circuits,)
        tensor left on the device, so that a chain of hypotheses costs one copy to the host."""
        if self.many_fn is not None:
            return self.many_fn(circuit_logits, full_logits)
        return torch.stack([torch.as_tensor(self.fn(c, full_logits)).reshape(())
                            for c in circuit_logits])


def kl_divergence(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """KL(full ‖ circuit), summed over the vocabulary and averaged over everything else."""
    kl = F.kl_div(
        F.log_softmax(circuit_logits, dim=-1),
        F.log_softmax(full_logits, dim=-1),
        log_target=True,
        reduction="none",
    )
    return kl.sum(-1).mean()


def kl_divergence_many(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """``kl_divergence`` of each circuit in a stack (circuits, batch, ..., vocab)."""
    kl = F.kl_div(
        F.log_softmax(circuit_logits, dim=-1),
        F.log_softmax(full_logits, dim=-1).expand_as(circuit_logits),
        log_target=True,
        reduction="none",
    )
    return kl.sum(-1).flatten(1).mean(1)


def mse_many(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """``mse`` of each circuit in a stack."""
    return (circuit_logits - full_logits).pow(2).flatten(1).mean(1)


def mse(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the logits, over the batch, (positions) and the vocabulary."""
    return (circuit_logits - full_logits).pow(2).mean()


BUILTIN: dict[str, MetricFn] = {"kl": kl_divergence, "mse": mse}
_MANY: dict[str, MetricFn] = {"kl": kl_divergence_many, "mse": mse_many}


def resolve_metric(metric: str | Metric | MetricFn, *, all_positions: bool = False) -> Metric:
    """Turn a name (``kl``, ``mse``), a ``Metric`` or a plain callable into a ``Metric``.

    A plain callable receives logits at every position, since we cannot know what it reads;
    wrap it in ``Metric(..., last_position_only=True)`` to make runs cheaper.
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN:
            raise SettingsError(
                f"unknown metric {metric!r}: expected one of {sorted(BUILTIN)}, a Metric, or a "
                "callable fn(circuit_logits, full_logits) -> scalar tensor"
            )
        name = metric if not all_positions else f"{metric}_all_positions"
        return Metric(name, BUILTIN[metric], last_position_only=not all_positions,
                      many_fn=_MANY[metric])
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, last_position_only=False)
    raise SettingsError("metric must be a name, a Metric or a callable, not "
                        f"{type(metric).__name__}")
