"""What a task is: a model, prompt pairs, metrics, and (when known) a canonical circuit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acdc_viz.data import TokenPairs
from acdc_viz.errors import AcdcVizError
from acdc_viz.metrics import Metric


class TaskError(AcdcVizError, ValueError):
    """An unknown task, a model that does not fit the task, or an impossible prompt request."""


@dataclass(frozen=True)
class Task:
    """A circuit-discovery task.

    Attributes:
        name: the registry key, e.g. ``"tracr-reverse"``.
        description: one line for ``acdc-viz tasks``.
        bundled: the model ships inside the package (works offline); otherwise it needs the hub.
        model_name: what ``load_model`` loads.
        load_model: ``(device) -> TransformerLens model``, or ready ``TransformerWeights`` for a
            model TransformerLens cannot run (``induction-redwood``).
        make_pairs: ``(n, seed) -> TokenPairs``; raises ``TaskError`` when asked for more distinct
            prompts than exist.
        default_prompts: how many prompt pairs a run uses by default.
        metrics: task metrics by name, each ``(pairs) -> Metric`` (they may need the prompts'
            answers). ``"kl"`` and ``"mse"`` are always available too.
        canonical_edges: ``(positions: bool, seq_len) -> set of edge names`` of the known circuit,
            or None when the task has none.
        default_tau, default_ablation, default_metric: the paper's settings for this task.
        token_labels: ``(pairs) -> list[str]``, the first prompt's tokens as text, for the figure.
        check_model: ``(model) -> None``; raises ``TaskError`` if a model does not fit the task.
        graph_shape: ``(n_layers, n_heads, attn_only)`` of the task's model, known without loading
            it (for ``acdc-viz tasks``); bundled tasks read it from their config when left None.
    """

    name: str
    description: str
    bundled: bool
    model_name: str
    load_model: Callable[[str], Any]
    make_pairs: Callable[[int, int], TokenPairs]
    default_prompts: int
    metrics: dict[str, Callable[[TokenPairs], Metric]] = field(default_factory=dict)
    canonical_edges: Callable[[bool, int], set[str]] | None = None
    default_tau: float = 0.01
    default_ablation: str = "resample"
    default_metric: str = "kl"
    token_labels: Callable[[TokenPairs], list[str]] | None = None
    check_model: Callable[[Any], None] | None = None
    graph_shape: tuple[int, int, bool] | None = None
