"""Indirect object identification (Wang et al. 2022) on GPT-2 small, as the ACDC paper ran it.

A prompt names two people, then repeats one of them (the subject, S); GPT-2 completes it with
the other (the indirect object, IO): "Then, Mary and John went to the park. John gave a ball
to" -> " Mary". The corruption is ABC: the same sentence with three fresh names in the three
name slots, so the corrupt prompt says nothing about which name is repeated, while every other
token (and so every position) stays the same.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from acdc_viz.data import TokenPairs
from acdc_viz.graph import QKV, CircuitGraph
from acdc_viz.metrics import Metric
from acdc_viz.tasks.base import TaskError
from acdc_viz.tasks.paper_common import check_count, make_token_pairs, words

TASK = "ioi"

#: Sentence frames. ``{A}`` and ``{B}`` are the first two names, ``{S}`` the repeated subject.
#: Every frame is 15 GPT-2 tokens with the names at the same positions (see NAME_POSITIONS),
#: so prompts from different frames line up position by position.
TEMPLATES: tuple[str, ...] = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Later, {A} and {B} walked to the {PLACE}. {S} handed a {OBJECT} to",
    "Yesterday, {A} and {B} came to the {PLACE}. {S} brought a {OBJECT} to",
    "Today, {A} and {B} drove to the {PLACE}. {S} threw a {OBJECT} to",
    "Soon, {A} and {B} returned to the {PLACE}. {S} offered a {OBJECT} to",
    "Once, {A} and {B} moved to the {PLACE}. {S} sent a {OBJECT} to",
)
#: Token positions of {A}, {B} and {S} in every frame.
NAME_POSITIONS: tuple[int, int, int] = (2, 4, 10)
SEQ_LEN = 15

#: First names that are one GPT-2 token each after a space.
NAMES: tuple[str, ...] = words(
    "Mary John Tom James Anna Paul Kate Mark Sarah David Lisa Peter Emma Michael Laura Daniel "
    "Rachel Steven Jessica Robert Amy Kevin Alice Brian Helen Eric Linda Jason Susan George "
    "Karen Richard Emily Andrew Chris Adam Ben Sam Joe Matt Lucy Jack Grace Ryan Tim Anne Rose "
    "Nick Kelly Jennifer"
)
PLACES: tuple[str, ...] = words(
    "store park school office restaurant hospital station garden house beach library church "
    "market lake museum airport"
)
OBJECTS: tuple[str, ...] = words(
    "drink book ring ball gift letter bag pen key cake flower card snack hat box coin phone"
)
#: ABBA: the IO comes first ("Mary and John ... John gave ... to Mary"); BABA: the S does.
ORDERS: tuple[str, ...] = ("ABBA", "BABA")


def available_prompts() -> int:
    """How many distinct clean prompts the frames and word lists make."""
    return len(TEMPLATES) * len(ORDERS) * len(NAMES) * (len(NAMES) - 1) * len(PLACES) * len(OBJECTS)


def _decode(index: int) -> tuple[str, str, str, str, str, str]:
    """The ``index``-th prompt of the product (frame, order, IO, S, place, object)."""
    index, obj = divmod(index, len(OBJECTS))
    index, place = divmod(index, len(PLACES))
    index, s = divmod(index, len(NAMES) - 1)
    index, io = divmod(index, len(NAMES))
    template, order = divmod(index, len(ORDERS))
    s += s >= io  # S ranges over the names other than IO
    return (TEMPLATES[template], ORDERS[order], NAMES[io], NAMES[s], PLACES[place],
            OBJECTS[obj])


def _sentence(template: str, first: str, second: str, subject: str, place: str, obj: str) -> str:
    return template.format(A=first, B=second, S=subject, PLACE=place, OBJECT=obj)


def make_ioi_pairs(n: int, seed: int = 0, *, tokenizer: Any = None) -> TokenPairs:
    """``n`` distinct IOI prompts (last token " to"; the answer is not included) and their ABC
    corruptions, as GPT-2 token ids without a BOS token (as in the ACDC code).

    The frame, name order, IO, S, place and object are drawn without replacement from their
    product, so prompts never repeat; ``seed`` fixes the draw. The three corrupt names are
    distinct and differ from both clean names.
    """
    check_count(TASK, n, available_prompts(), "frames x name orders x IO x S x places x objects")
    if tokenizer is None:
        from acdc_viz.tasks.gpt2_tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    rng = random.Random(seed)
    clean, corrupt = [], []
    for index in rng.sample(range(available_prompts()), n):
        template, order, io, s, place, obj = _decode(index)
        first, second = (io, s) if order == "ABBA" else (s, io)
        x, y, z = rng.sample([name for name in NAMES if name not in (io, s)], 3)
        for rows, names in ((clean, (first, second, s)), (corrupt, (x, y, z))):
            text = _sentence(template, *names, place, obj)
            rows.append(tokenizer.encode(text, add_special_tokens=False))
    return make_token_pairs(TASK, clean, corrupt)


def answers(pairs: TokenPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The IO and S token ids of each clean prompt, read from its name positions."""
    not_ioi = TaskError(
        f"these token pairs are not IOI prompts of this task: expected {SEQ_LEN} tokens with "
        f"names at positions {NAME_POSITIONS}, exactly one of the first two equal to the "
        "third. Make them with the task's make_pairs."
    )
    if pairs.seq_len != SEQ_LEN:
        raise not_ioi
    a, b, s = (pairs.clean[:, p] for p in NAME_POSITIONS)
    if not bool(((a == s) ^ (b == s)).all()):
        raise not_ioi
    return torch.where(a == s, b, a), s


def logit_diff_metric(pairs: TokenPairs) -> Metric:
    """Minus the mean logit difference logit(IO) - logit(S) at the last position.

    Negated so that lower is better, as ACDC's rule expects: removing an edge the circuit needs
    lowers the logit difference, which raises this metric.
    """
    io, s = answers(pairs)

    def fn(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(circuit_logits.shape[0], device=circuit_logits.device)
        io_, s_ = io.to(circuit_logits.device), s.to(circuit_logits.device)
        return -(circuit_logits[rows, io_] - circuit_logits[rows, s_]).mean()

    return Metric("logit_diff", fn, last_position_only=True)


# The circuit: Wang et al.'s 26 heads in 7 classes, and how the classes connect.
HEAD_CLASSES: dict[str, tuple[tuple[int, int], ...]] = {
    "name mover": ((9, 6), (9, 9), (10, 0)),
    "backup name mover": ((9, 0), (9, 7), (10, 1), (10, 2), (10, 6), (10, 10), (11, 2), (11, 9)),
    "negative name mover": ((10, 7), (11, 10)),
    "s-inhibition": ((7, 3), (7, 9), (8, 6), (8, 10)),
    "induction": ((5, 5), (5, 8), (5, 9), (6, 9)),
    "duplicate token": ((0, 1), (0, 10), (3, 0)),
    "previous token": ((2, 2), (4, 11)),
}
#: Which inputs of each class read the token embeddings.
READS_EMBED: dict[str, str] = {
    "previous token": "qkv", "duplicate token": "qkv", "s-inhibition": "q",
    "negative name mover": "kv", "name mover": "kv", "backup name mover": "kv",
}
#: (writer class, reader class, the reader's inputs it writes to).
CLASS_EDGES: tuple[tuple[str, str, str], ...] = (
    ("previous token", "induction", "kv"),
    ("induction", "s-inhibition", "kv"),
    ("duplicate token", "s-inhibition", "kv"),
    ("s-inhibition", "name mover", "q"),
    ("s-inhibition", "backup name mover", "q"),
    ("s-inhibition", "negative name mover", "q"),
)
WRITES_OUT: tuple[str, ...] = ("name mover", "backup name mover", "negative name mover")


def _heads(cls: str) -> list[str]:
    return [f"A{layer}.{head}" for layer, head in HEAD_CLASSES[cls]]


def canonical_edges() -> set[str]:
    """The paper's IOI circuit in our graph's edges (963; the paper counts 1,041, see
    docs/paper-tasks.md).

    Wang et al. left the MLPs out of their analysis, so the paper keeps them whole: every edge
    among Embed, the MLPs and Out, every circuit head's edge into an MLP, and every MLP's edge
    into a circuit head. Between heads, and from Embed into heads, only the class connections
    above are kept, and only the three name-mover classes write to Out.
    """
    graph = CircuitGraph(12, 12)
    circuit = {h for cls in HEAD_CLASSES for h in _heads(cls)}
    edges: set[str] = set()
    for edge in graph.edges:
        src, dest = edge.src, edge.dest
        mlp_path = src.kind in ("embed", "mlp") and dest.kind in ("mlp", "out")
        head_to_mlp = src.name in circuit and dest.kind == "mlp"
        mlp_to_head = src.kind == "mlp" and dest.node in circuit
        if mlp_path or head_to_mlp or mlp_to_head:
            edges.add(edge.name)
    for cls, letters in READS_EMBED.items():
        edges.update(f"Embed->{h}.{x}" for h in _heads(cls) for x in letters)
    for writer, reader, letters in CLASS_EDGES:
        edges.update(f"{w}->{r}.{x}"
                     for w in _heads(writer) for r in _heads(reader) for x in letters)
    edges.update(f"{h}->Out" for cls in WRITES_OUT for h in _heads(cls))
    return edges


#: The paper's count, which adds one q/k/v-internal edge per circuit head and input.
PAPER_EDGE_COUNT = 1041
INTERNAL_EDGES = sum(len(v) for v in HEAD_CLASSES.values()) * len(QKV)
