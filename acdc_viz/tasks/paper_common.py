"""What the ACDC paper's tasks share: the models' shapes, checks, prompt plumbing, positions."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from acdc_viz.data import TokenPairs
from acdc_viz.tasks.base import TaskError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """The shape a task's model must have: its circuit names heads of exactly this model.

    A model of another shape could still run, but the canonical circuit and the prompts'
    token ids would refer to heads and tokens it does not have, so it is refused.
    """

    model_name: str
    n_layers: int
    n_heads: int
    attn_only: bool
    d_vocab: int

    @property
    def graph_shape(self) -> tuple[int, int, bool]:
        return self.n_layers, self.n_heads, self.attn_only

    def describe(self) -> str:
        mlp = "attention only" if self.attn_only else "with MLPs"
        return (f"{self.n_layers} layers, {self.n_heads} heads per layer, {mlp}, "
                f"a vocabulary of {self.d_vocab} tokens")

    def check(self, task: str, model: Any) -> None:
        """Raise ``TaskError`` unless ``model`` (a TransformerLens model, or ready
        ``TransformerWeights``) has this shape."""
        from acdc_viz.models.adapter import TransformerWeights, model_config

        cfg = model if isinstance(model, TransformerWeights) else model_config(model)
        found = Architecture(
            model_name=str(getattr(cfg, "model_name", "?")),
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            attn_only=bool(getattr(cfg, "attn_only", False)),
            d_vocab=int(getattr(cfg, "d_vocab", -1)),
        )
        if found.graph_shape != self.graph_shape or found.d_vocab != self.d_vocab:
            raise TaskError(
                f"task {task!r} needs {self.model_name}'s architecture ({self.describe()}); this "
                f"model has {found.describe()}. Load the task's model with "
                f"get_task({task!r}).load_model(device), or pick a task made for this model "
                "(`acdc-viz tasks`)."
            )


def load_checked(arch: Architecture, task: str, device: str) -> Any:
    """Load ``arch.model_name`` through :func:`acdc_viz.load_model`, then check its shape."""
    from acdc_viz.models.loading import load_model

    model = load_model(arch.model_name, device=device)
    arch.check(task, model)
    return model


def check_count(task: str, n: int, available: int, what: str) -> None:
    """``n`` distinct prompts must be at least one and at most ``available``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TaskError(f"task {task!r}: the number of prompts must be a positive integer, "
                        f"got {n!r}")
    if n > available:
        raise TaskError(
            f"task {task!r} can make at most {available} distinct prompts ({what}); {n} were "
            f"asked for. Ask for {available} or fewer."
        )


def stack_rows(task: str, rows: Sequence[Sequence[int]], what: str) -> torch.Tensor:
    """Token rows as one (n, pos) tensor; every prompt of a task must have the same length.

    Equal lengths are what lets ACDC patch position p of a corrupt prompt into position p of
    its clean one, and what a graph split by positions needs.
    """
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1:
        odd = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]))
        raise TaskError(
            f"task {task!r}: {what} prompts have different token lengths {lengths} (row 0 has "
            f"{len(rows[0])}, row {odd} has {len(rows[odd])}). The word lists hold only words "
            "that are one token each, so this means the tokenizer is not the one the task was "
            "written for."
        )
    return torch.tensor([list(r) for r in rows], dtype=torch.int64)


def make_token_pairs(task: str, clean: Sequence[Sequence[int]],
                     corrupt: Sequence[Sequence[int]]) -> TokenPairs:
    """Clean and corrupt rows, all of one length, as :class:`TokenPairs`."""
    both = stack_rows(task, [*clean, *corrupt], "clean and corrupt")
    return TokenPairs(both[: len(clean)], both[len(clean):])


def derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of ``range(n)`` that moves every index (needs ``n >= 2``)."""
    if n < 2:
        raise ValueError("a derangement needs at least two items")
    order = list(range(n))
    while True:
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def at_positions(edges: Iterable[str], positions: bool, seq_len: int) -> set[str]:
    """The paper's circuits are not split by token position; split, each edge is kept at every
    position (the paper does not say which positions an edge matters at)."""
    edges = set(edges)
    if not positions:
        return edges
    if seq_len < 1:
        raise TaskError(f"seq_len must be positive when splitting by positions, got {seq_len}")
    return {f"{e}@{p}" for e in edges for p in range(seq_len)}


def words(text: str) -> tuple[str, ...]:
    """A word list written as one string, split on whitespace."""
    return tuple(text.split())


def token_texts(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Each token id as the text it stands for (for labels in the figure)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def single_token_words(tokenizer: Any, candidates: Iterable[str], *, prefix: str = " ",
                       also_bare: bool = False) -> list[str]:
    """The words that the tokenizer turns into one token after ``prefix`` (and bare, too, with
    ``also_bare``), in their original order."""
    kept = []
    for word in candidates:
        forms = [prefix + word, word] if also_bare else [prefix + word]
        if all(len(tokenizer.encode(f, add_special_tokens=False)) == 1 for f in forms):
            kept.append(word)
    return kept
