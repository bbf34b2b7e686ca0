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
            it (for ``acdc-viz tasks``), with its key/value heads as a fourth element when fewer
            than its heads; bundled tasks read it from their config when left None.
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
    graph_shape: tuple[int, int, bool] | tuple[int, int, bool, int] | None = None

    def prepare(self, device: str = "cpu", prompts: int | None = None,
                seed: int = 0) -> PreparedTask:
        """Load the model, check it fits, and make ``prompts`` prompt pairs (default: the task's).

        The one set-up that the CLI, sweeps and the widget share.
        """
        model = self.load_model(device)
        if self.check_model is not None:
            self.check_model(model)
        pairs = self.make_pairs(prompts or self.default_prompts, seed)
        metrics: dict[str, Any] = {"kl": "kl", "mse": "mse"}
        metrics.update({name: make(pairs) for name, make in self.metrics.items()})
        tokens = self.token_labels(pairs) if self.token_labels else None
        return PreparedTask(self, model, pairs, metrics, tokens)


@dataclass(frozen=True)
class PreparedTask:
    """A task ready to run: its model loaded, its prompts made, its metrics built for them.

    ``metrics`` maps each metric name (``"kl"``, ``"mse"`` and the task's own) to what
    ``Acdc(metric=...)`` takes; ``tokens`` labels the figure's columns.
    """

    task: Task
    model: Any
    pairs: TokenPairs
    metrics: dict[str, Any]
    tokens: list[str] | None

    def canonical(self, positions: bool) -> frozenset[str] | None:
        """The task's canonical circuit for these prompts, or None when it has none."""
        if self.task.canonical_edges is None:
            return None
        return frozenset(self.task.canonical_edges(positions, self.pairs.seq_len))
