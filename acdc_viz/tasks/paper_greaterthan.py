"""Greater-than (Hanna et al. 2023) on GPT-2 small, as the ACDC paper ran it.

"The war lasted from the year 1732 to the year 17" -> GPT-2 puts its probability on the
two-digit endings after 32. The corruption replaces the start year's ending with "01" ("... the
year 1701 to the year 17"), which leaves almost every ending valid, so the corrupt prompt carries
no information about the threshold; every other token stays the same.
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

TASK = "greater-than"

#: Hanna et al.'s frame. ``{XX}`` is the century, ``{YY}`` the start year's two last digits.
TEMPLATE = "The {NOUN} lasted from the year {XX}{YY} to the year {XX}"
#: Token position of ``{YY}``: The, noun, lasted, from, the, year, " XX", then YY.
YEAR_POSITION = 7
SEQ_LEN = 12
CORRUPT_YY = "01"
CENTURIES: tuple[int, ...] = tuple(range(11, 18))

#: Nouns for things that last, one GPT-2 token each after a space.
NOUNS: tuple[str, ...] = words(
    "war strike drought famine siege reign trial tour voyage journey project campaign conflict "
    "crisis dynasty empire expedition festival occupation plague rebellion revolt truce boom "
    "recession marriage friendship partnership alliance treaty exile feud rivalry blockade "
    "embargo program study survey"
)


def two_digit_ids(tokenizer: Any) -> list[int]:
    """Token ids of "00", "01", ..., "99" (each is one GPT-2 token)."""
    ids = [tokenizer.encode(f"{i:02d}", add_special_tokens=False) for i in range(100)]
    if any(len(t) != 1 for t in ids):
        raise TaskError("greater-than needs a tokenizer with one token per two-digit number "
                        "(GPT-2's); this one splits some of 00..99")
    return [t[0] for t in ids]


def years(tokenizer: Any) -> list[tuple[int, int]]:
    """(century, YY) of the start years: YY from 02 to 98 (01 is the corruption and no ending
    is greater than 99), and only years that GPT-2 splits as " XX" + "YY", as in the paper."""
    kept = []
    for century in CENTURIES:
        head = tokenizer.encode(f" {century}", add_special_tokens=False)
        for yy in range(2, 99):
            tail = tokenizer.encode(f"{yy:02d}", add_special_tokens=False)
            if tokenizer.encode(f" {century}{yy:02d}", add_special_tokens=False) == head + tail:
                kept.append((century, yy))
    return kept


def make_greaterthan_pairs(n: int, seed: int = 0, *, tokenizer: Any = None) -> TokenPairs:
    """``n`` distinct greater-than prompts and their "01" corruptions, as GPT-2 token ids
    without a BOS token (as in the ACDC code). Noun and year are drawn without replacement."""
    if tokenizer is None:
        from acdc_viz.tasks.gpt2_tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    starts = years(tokenizer)
    check_count(TASK, n, len(NOUNS) * len(starts), f"{len(NOUNS)} nouns x {len(starts)} years")
    rng = random.Random(seed)
    clean, corrupt = [], []
    for index in rng.sample(range(len(NOUNS) * len(starts)), n):
        noun, (century, yy) = NOUNS[index // len(starts)], starts[index % len(starts)]
        for rows, ending in ((clean, f"{yy:02d}"), (corrupt, CORRUPT_YY)):
            text = TEMPLATE.format(NOUN=noun, XX=century, YY=ending)
            rows.append(tokenizer.encode(text, add_special_tokens=False))
    return make_token_pairs(TASK, clean, corrupt)


def start_years(pairs: TokenPairs, tokenizer: Any = None) -> torch.Tensor:
    """Each clean prompt's YY as an integer, read from its year position."""
    if tokenizer is None:
        from acdc_viz.tasks.gpt2_tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    value_of = {token: value for value, token in enumerate(two_digit_ids(tokenizer))}
    found = pairs.clean[:, YEAR_POSITION].tolist() if pairs.seq_len == SEQ_LEN else [-1]
    if any(t not in value_of for t in found):
        raise TaskError(
            f"these token pairs are not greater-than prompts of this task: expected {SEQ_LEN} "
            f"tokens with a two-digit year ending at position {YEAR_POSITION}. Make them with "
            "the task's make_pairs."
        )
    return torch.tensor([value_of[t] for t in found], dtype=torch.int64)


def prob_diff_metric(pairs: TokenPairs) -> Metric:
    """Minus the probability difference P(ending > YY) - P(ending <= YY) at the last position,
    averaged over prompts (negated so that lower is better, as ACDC's rule expects)."""
    from acdc_viz.tasks.gpt2_tokenizer import gpt2_tokenizer

    digit_ids = torch.tensor(two_digit_ids(gpt2_tokenizer()))
    yy = start_years(pairs)
    # sign[i, j] = +1 for endings j above prompt i's YY, -1 at or below it.
    sign = torch.where(torch.arange(100)[None, :] > yy[:, None], 1.0, -1.0)

    def fn(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(circuit_logits, dim=-1)[:, digit_ids.to(circuit_logits.device)]
        return -(probs * sign.to(probs)).sum(-1).mean()

    return Metric("prob_diff", fn, last_position_only=True)


# The circuit: Hanna et al.'s groups of heads and MLPs (None marks an MLP).
GROUPS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "heads 0.3, 0.5": ((0, 3), (0, 5)),
    "head 0.1": ((0, 1),),
    "early MLPs": ((0, None), (1, None), (2, None), (3, None)),
    "mid heads": ((5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)),
    "late MLPs": ((8, None), (9, None), (10, None), (11, None)),
}
READS_EMBED = ("heads 0.3, 0.5", "head 0.1", "early MLPs")
WRITES_OUT = ("mid heads", "late MLPs")
GROUP_EDGES: tuple[tuple[str, str], ...] = (
    ("head 0.1", "early MLPs"),
    ("head 0.1", "mid heads"),
    ("heads 0.3, 0.5", "mid heads"),
    ("early MLPs", "mid heads"),
    ("mid heads", "late MLPs"),
)


def _source(layer: int, head: int | None) -> str:
    return f"MLP{layer}" if head is None else f"A{layer}.{head}"


def _inputs(layer: int, head: int | None) -> list[str]:
    return [f"MLP{layer}"] if head is None else [f"A{layer}.{head}.{x}" for x in QKV]


def canonical_edges() -> set[str]:
    """The paper's greater-than circuit in our graph's edges (235; the paper counts 262, see
    docs/paper-tasks.md).

    Group to group as in GROUP_EDGES (every member to every input of every later member), the
    MLPs inside each MLP group chained, and, because Hanna et al. found the mid heads' queries
    to be read from a clean residual stream, every MLP before the last mid head connected to
    every later one and to each mid head's query.
    """
    graph = CircuitGraph(12, 12)
    valid = set(graph.edge_index)
    wanted: set[str] = set()
    for group in READS_EMBED:
        wanted.update(f"Embed->{d}" for member in GROUPS[group] for d in _inputs(*member))
    for group in WRITES_OUT:
        wanted.update(f"{_source(*member)}->Out" for member in GROUPS[group])
    pairs = [*GROUP_EDGES, ("early MLPs", "early MLPs"), ("late MLPs", "late MLPs")]
    for writer, reader in pairs:
        wanted.update(f"{_source(*w)}->{d}" for w in GROUPS[writer] for r in GROUPS[reader]
                      for d in _inputs(*r))
    last_mid = max(layer for layer, _ in GROUPS["mid heads"])
    wanted.update(f"MLP{a}->MLP{b}" for a in range(last_mid) for b in range(a + 1, last_mid))
    wanted.update(f"MLP{m}->A{layer}.{head}.q" for layer, head in GROUPS["mid heads"]
                  for m in range(layer))
    # Group pairs name members in every layer order; only writers before readers are edges.
    return wanted & valid


PAPER_EDGE_COUNT = 262
INTERNAL_EDGES = sum(1 for g in GROUPS.values() for _, h in g if h is not None) * len(QKV)
