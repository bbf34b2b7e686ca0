"""Docstring completion (Heimersheim & Janiak 2023) on attn-only-4l, as the ACDC paper ran it.

A Python method's docstring documents its arguments in order; after ``:param`` the model should
name the next argument of the ``def`` line::

    def load(self, files, mode, path, size, label, color):
        \"\"\"state world money

        :param path: friend water
        :param size: night house
        :param          -> " label"

The corruption (the paper's "random_random") gives the ``def`` line three other names in the
middle and the docstring two other documented names, so nothing in the corrupt prompt says which
name comes next; the method name, the outer arguments and every description stay.

attn-only-4l was trained with its own tokenizer (``NeelNanda/gpt-neox-tokenizer-digits``, 48,262
tokens), not GPT-2's, so the prompts are tokenized with that one; it comes from the Hugging Face
hub once and is cached. Tests pass GPT-2's offline tokenizer instead: the generator keeps only
words that are single tokens in whichever tokenizer it is given.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import torch

from acdc_viz.data import TokenPairs
from acdc_viz.metrics import Metric
from acdc_viz.tasks.base import TaskError
from acdc_viz.tasks.paper_common import (
    check_count,
    make_token_pairs,
    single_token_words,
    words,
)

TASK = "docstring"
TOKENIZER_NAME = "NeelNanda/gpt-neox-tokenizer-digits"

#: Argument and method names: identifiers common in Python code.
VARIABLE_NAMES: tuple[str, ...] = words(
    "data name file value path size count index key items source target config options result "
    "output input mode state user text image label model params context buffer message node "
    "parent child queue stack token query response request session table column row record "
    "field entry width height length offset limit timeout port host url device weight bias "
    "scale factor rate step epoch batch seed shape format color style level order kind group "
    "filename prefix suffix header body title content callback handler client server"
)
#: Words for the descriptions: common English nouns.
DESCRIPTION_WORDS: tuple[str, ...] = words(
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute kid "
    "body information back parent face level office door health person art war history party "
    "result change morning reason research girl guy air force education"
)
N_DESCRIPTION, N_ARG_DESCRIPTION = 3, 2


def _prompt(method: str, def_args: list[str], doc_args: list[str], description: list[str],
            arg_descriptions: list[list[str]]) -> str:
    lines = [
        "",
        f"def {method}(self, {', '.join(def_args)}):",
        f'    """{" ".join(description)}',
        "",
        *(f"    :param {arg}: {' '.join(desc)}"
          for arg, desc in zip(doc_args, arg_descriptions, strict=False)),
        "    :param",
    ]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def docstring_tokenizer() -> Any:
    """attn-only-4l's tokenizer, from the hub or its local cache; read-only, built once.

    Raises ``ModelLoadError`` (saying how to get it) when it is neither cached nor reachable.
    """
    from transformers import AutoTokenizer

    from acdc_viz.models.loading import (
        ModelLoadError,
        _env_offline,
        _hub_errors,
        _hub_offline_mode,
        _hub_reachable,
    )

    reachable = False if _env_offline() else _hub_reachable()
    try:
        with _hub_offline_mode(not reachable):
            return AutoTokenizer.from_pretrained(TOKENIZER_NAME)
    except _hub_errors() as err:
        raise ModelLoadError(
            f"The docstring task tokenizes its prompts with attn-only-4l's tokenizer "
            f"{TOKENIZER_NAME!r}, which is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(err).__name__}). Run once with access to huggingface.co (it is "
            "then cached), or copy a saved copy here and pass it: "
            "make_docstring_pairs(n, seed, tokenizer=AutoTokenizer.from_pretrained(DIR))."
        ) from err


def _bos(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise TaskError("the docstring prompts start with a BOS token, and this tokenizer has "
                        "neither a BOS nor an EOS token")
    return int(bos)


def make_docstring_pairs(n: int, seed: int = 0, *, tokenizer: Any = None) -> TokenPairs:
    """``n`` distinct docstring prompts and their corruptions, with a BOS token first (as in the
    ACDC code). ``tokenizer`` defaults to attn-only-4l's (:func:`docstring_tokenizer`)."""
    tokenizer = tokenizer if tokenizer is not None else docstring_tokenizer()
    names = single_token_words(tokenizer, VARIABLE_NAMES)
    nouns = single_token_words(tokenizer, DESCRIPTION_WORDS, also_bare=True)
    if len(names) < 12 or len(nouns) < N_DESCRIPTION:
        raise TaskError(f"the tokenizer keeps too few one-token words for docstring prompts "
                        f"({len(names)} names, {len(nouns)} description words)")
    available = (math.perm(len(names), 7) * math.perm(len(nouns), N_DESCRIPTION)
                 * math.perm(len(nouns), N_ARG_DESCRIPTION) ** 2)
    check_count(TASK, n, available, "method and argument names x descriptions")
    bos = _bos(tokenizer)
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    clean: list[list[int]] = []
    corrupt: list[list[int]] = []
    expected: list[tuple[str, list[str]]] = []
    while len(clean) < n:
        method, p1, p2, m1, m2, m3, s1, *fresh = rng.sample(names, 12)
        description = rng.sample(nouns, N_DESCRIPTION)
        arg_descriptions = [rng.sample(nouns, N_ARG_DESCRIPTION) for _ in range(2)]
        clean_ids = [bos, *tokenizer.encode(
            _prompt(method, [p1, p2, m1, m2, m3, s1], [m1, m2], description, arg_descriptions),
            add_special_tokens=False)]
        if tuple(clean_ids) in seen:
            continue
        seen.add(tuple(clean_ids))
        r1, r2, r3, q1, q2 = fresh
        corrupt_ids = [bos, *tokenizer.encode(
            _prompt(method, [p1, p2, r1, r2, r3, s1], [q1, q2], description, arg_descriptions),
            add_special_tokens=False)]
        clean.append(clean_ids)
        corrupt.append(corrupt_ids)
        expected.append((m3, [p1, p2, m1, m2, s1, r1, r2, r3, q1, q2]))
    pairs = make_token_pairs(TASK, clean, corrupt)
    _check_answers(pairs, expected, tokenizer)
    return pairs


def _check_answers(pairs: TokenPairs, expected: list[tuple[str, list[str]]],
                   tokenizer: Any) -> None:
    """The metric finds the answers from the tokens alone; make sure it finds the right ones."""
    correct, wrong = answers(pairs)

    def ids(words: list[str]) -> list[int]:
        return [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words]

    for i, (answer, others) in enumerate(expected):
        if int(correct[i]) != ids([answer])[0] or sorted(wrong[i].tolist()) != sorted(ids(others)):
            raise TaskError(
                "this tokenizer splits the docstring prompts differently than the task expects "
                "(separators merged with names), so their answers cannot be located; use "
                f"attn-only-4l's tokenizer {TOKENIZER_NAME!r}"
            )


def answers(pairs: TokenPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer (n,) and the ten wrong names (n, 10) of each prompt, from the tokens alone.

    Clean and corrupt differ exactly at the three middle ``def`` arguments and the two
    documented names. The answer is the clean prompt's third middle argument; the wrong names
    are every other argument name of either prompt: the two outer ``def`` arguments before the
    middle ones and the one after them, the first two middle ones, and the five corrupt names.
    """
    differ = pairs.clean != pairs.corrupt
    counts = differ.sum(1)
    if not bool((counts == 5).all()):
        raise TaskError("these token pairs are not docstring prompts of this task: each clean "
                        "and corrupt prompt should differ in exactly 5 tokens. Make them with the "
                        "task's make_pairs.")
    where = torch.nonzero(differ)[:, 1].view(-1, 5)
    d0, d1, d2 = where[:, 0], where[:, 1], where[:, 2]
    if not bool(((d1 - d0 == 2) & (d2 - d1 == 2) & (d0 >= 4)).all()):
        raise TaskError("these token pairs are not docstring prompts of this task: the differing "
                        "def arguments are not one token apart by commas")
    rows = torch.arange(pairs.batch_size)[:, None]
    clean_slots = torch.stack([d0 - 4, d0 - 2, d0, d1, d2 + 2], dim=1)
    wrong = torch.cat([pairs.clean[rows, clean_slots], pairs.corrupt[rows, where]], dim=1)
    return pairs.clean[torch.arange(pairs.batch_size), d2], wrong


def docstring_metric(pairs: TokenPairs) -> Metric:
    """Minus (the answer's logit - the largest wrong name's logit) at the last position, averaged
    over prompts: the paper's docstring metric, negated so that lower is better."""
    correct, wrong = answers(pairs)

    def fn(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(circuit_logits.shape[0], device=circuit_logits.device)
        right = circuit_logits[rows, correct.to(circuit_logits.device)]
        best_wrong = circuit_logits[rows[:, None], wrong.to(circuit_logits.device)].amax(-1)
        return -(right - best_wrong).mean()

    return Metric("docstring", fn, last_position_only=True)


# The circuit: Heimersheim & Janiak's heads 0.5, 1.2, 1.4, 2.0, 3.0 and 3.6, edge by edge.
_LAYER3_HEADS = ("A3.0", "A3.6")
CANONICAL_EDGES: frozenset[str] = frozenset({
    "Embed->A0.5.v",
    "Embed->A1.4.v", "A0.5->A1.4.v",
    "Embed->A1.2.q", "A0.5->A1.2.q", "Embed->A1.2.k", "A0.5->A1.2.k",
    "Embed->A2.0.q", "A0.5->A2.0.q", "Embed->A2.0.k", "A0.5->A2.0.k", "A1.4->A2.0.v",
    *(e for h in _LAYER3_HEADS for e in (
        f"{h}->Out", f"A1.4->{h}.q", f"Embed->{h}.v", f"A0.5->{h}.v",
        f"A2.0->{h}.k", f"A1.2->{h}.k",
    )),
})
PAPER_EDGE_COUNT = 37
#: q/k/v-internal edges in the paper's count: one per head input that the circuit uses.
INTERNAL_EDGES = len({e.split("->")[1] for e in CANONICAL_EDGES if e.split("->")[1] != "Out"})
