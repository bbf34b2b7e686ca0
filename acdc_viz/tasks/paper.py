"""The ACDC paper's tasks (Conmy et al. 2023, §4): IOI, greater-than, docstring and induction.

Their models come from the Hugging Face hub (``bundled=False``): GPT-2 small through
``TransformerBridge.boot_transformers``, attn-only-4l through ``boot_tl_legacy``, and
redwood_attn_2l (shortformer, which TransformerLens 4 cannot run) through our own reader,
``acdc_viz.models.shortformer``, as ``TransformerWeights``. The prompts are
made here, offline for the GPT-2 tasks (GPT-2's tokenizer ships with acdc_viz). Each canonical
circuit is the paper's, written in our graph's edge names; ``docs/paper-tasks.md`` explains how
each maps to the paper's edge count.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from acdc_viz.data import TokenPairs
from acdc_viz.tasks import paper_docstring, paper_greaterthan, paper_induction, paper_ioi
from acdc_viz.tasks.base import Task
from acdc_viz.tasks.paper_common import Architecture, at_positions, load_checked, token_texts

logger = logging.getLogger(__name__)

__all__ = ["ATTN_ONLY_4L", "GPT2_SMALL", "TASKS"]

GPT2_SMALL = Architecture("gpt2", n_layers=12, n_heads=12, attn_only=False, d_vocab=50257)
ATTN_ONLY_4L = Architecture("attn-only-4l", n_layers=4, n_heads=8, attn_only=True, d_vocab=48262)


def _gpt2_labels(pairs: TokenPairs) -> list[str]:
    from acdc_viz.tasks.gpt2_tokenizer import gpt2_tokenizer

    return token_texts(gpt2_tokenizer(), pairs.clean[0].tolist())


def _docstring_labels(pairs: TokenPairs) -> list[str]:
    from acdc_viz.models.loading import ModelLoadError

    try:
        tokenizer = paper_docstring.docstring_tokenizer()
    except ModelLoadError as err:
        logger.warning("showing token ids instead of text: %s", err)
        return [str(i) for i in pairs.clean[0].tolist()]
    return token_texts(tokenizer, pairs.clean[0].tolist())


def _canonical(edges: Any) -> Any:
    """``(positions, seq_len) -> edge names`` for a fixed set of unsplit edges."""
    def canonical_edges(positions: bool, seq_len: int) -> set[str]:
        return at_positions(edges(), positions, seq_len)

    return canonical_edges


TASKS: list[Task] = [
    Task(
        name="ioi",
        description="indirect object identification, GPT-2 small, ABC corruption (paper §4)",
        bundled=False,
        model_name=GPT2_SMALL.model_name,
        load_model=functools.partial(load_checked, GPT2_SMALL, "ioi"),
        make_pairs=paper_ioi.make_ioi_pairs,
        default_prompts=100,
        metrics={"logit_diff": paper_ioi.logit_diff_metric},
        canonical_edges=_canonical(paper_ioi.canonical_edges),
        default_tau=0.0575,
        default_ablation="resample",
        default_metric="kl",
        token_labels=_gpt2_labels,
        check_model=functools.partial(GPT2_SMALL.check, "ioi"),
        graph_shape=GPT2_SMALL.graph_shape,
    ),
    Task(
        name="greater-than",
        description='greater-than years, GPT-2 small, "01" corruption (paper §4)',
        bundled=False,
        model_name=GPT2_SMALL.model_name,
        load_model=functools.partial(load_checked, GPT2_SMALL, "greater-than"),
        make_pairs=paper_greaterthan.make_greaterthan_pairs,
        default_prompts=100,
        metrics={"prob_diff": paper_greaterthan.prob_diff_metric},
        canonical_edges=_canonical(paper_greaterthan.canonical_edges),
        default_tau=0.01585,
        default_ablation="resample",
        default_metric="kl",
        token_labels=_gpt2_labels,
        check_model=functools.partial(GPT2_SMALL.check, "greater-than"),
        graph_shape=GPT2_SMALL.graph_shape,
    ),
    Task(
        name="docstring",
        description="docstring argument completion, attn-only-4l (paper §4)",
        bundled=False,
        model_name=ATTN_ONLY_4L.model_name,
        load_model=functools.partial(load_checked, ATTN_ONLY_4L, "docstring"),
        make_pairs=paper_docstring.make_docstring_pairs,
        default_prompts=50,
        metrics={"docstring": paper_docstring.docstring_metric},
        canonical_edges=_canonical(lambda: paper_docstring.CANONICAL_EDGES),
        default_tau=0.095,
        default_ablation="resample",
        default_metric="kl",
        token_labels=_docstring_labels,
        check_model=functools.partial(ATTN_ONLY_4L.check, "docstring"),
        graph_shape=ATTN_ONLY_4L.graph_shape,
    ),
    Task(
        name="induction-redwood",
        description="induction, redwood_attn_2l (shortformer, read by acdc_viz itself)",
        bundled=False,
        model_name=paper_induction.MODEL_NAME,
        load_model=paper_induction.load_redwood,
        make_pairs=paper_induction.make_induction_pairs,
        default_prompts=50,
        metrics={"kl_repeated": paper_induction.kl_repeated_metric},
        canonical_edges=None,
        default_tau=0.5623,
        default_ablation="resample",
        default_metric="kl_repeated",
        token_labels=_gpt2_labels,
        check_model=functools.partial(paper_induction.ARCHITECTURE.check, "induction-redwood"),
        graph_shape=paper_induction.ARCHITECTURE.graph_shape,
    ),
]
