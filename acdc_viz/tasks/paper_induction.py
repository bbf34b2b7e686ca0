"""Induction on Redwood's 2-layer attention-only model, the ACDC paper's induction task.

The paper runs ACDC on ``redwood_attn_2l`` with KL divergence measured only at the positions
where induction can predict the next token, on OpenWebText excerpts that Redwood stored on the
hub, corrupted by shuffling the batch. Offline we cannot ship those excerpts, so the prompts here
are their cleanest form: a random segment of GPT-2 tokens repeated once, after a BOS token. In
the second copy every next token is predictable by induction (and in the first, by nothing), so
the metric reads the second copy. The corruption, as in the paper, gives each prompt another
prompt of the batch.

The model uses shortformer positional embeddings (added to each attention layer's query and key
inputs after ``ln1``, never to the residual stream). TransformerLens 4 cannot run them, so
:func:`load_redwood` reads the checkpoint itself (``acdc_viz.models.shortformer``) and returns the
engine's ``TransformerWeights``, which ``Acdc`` takes directly. There is no TransformerLens model,
so ``Acdc(test_mode=True)`` is not available for this task. The paper gives no canonical circuit
for this task.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from acdc_viz.data import TokenPairs
from acdc_viz.metrics import Metric
from acdc_viz.tasks.base import TaskError
from acdc_viz.tasks.paper_common import Architecture, check_count, derangement

TASK = "induction-redwood"
MODEL_NAME = "redwood_attn_2l"
ARCHITECTURE = Architecture(MODEL_NAME, n_layers=2, n_heads=8, attn_only=True, d_vocab=50259)

#: Tokens per copy of the repeated segment; prompts are 1 + 2 * SEGMENT tokens long.
SEGMENT = 20
BOS_ID = 50256
#: Segment tokens are drawn from GPT-2's ordinary tokens (ids below <|endoftext|>).
N_ORDINARY = 50256


def make_induction_pairs(n: int, seed: int = 0) -> TokenPairs:
    """``n`` distinct prompts ``BOS, x_1..x_S, x_1..x_S`` (S = SEGMENT random GPT-2 token ids);
    the corrupt prompt of row i is the clean prompt of another row (so ``n >= 2``)."""
    check_count(TASK, n, N_ORDINARY**SEGMENT, "random segments")
    if n < 2:
        raise TaskError(f"task {TASK!r} corrupts each prompt with another prompt of the batch, so "
                        f"it needs at least 2 prompts, got {n}")
    rng = random.Random(seed)
    segments: dict[tuple[int, ...], None] = {}
    while len(segments) < n:
        segments[tuple(rng.randrange(N_ORDINARY) for _ in range(SEGMENT))] = None
    clean = torch.tensor([[BOS_ID, *s, *s] for s in segments], dtype=torch.int64)
    return TokenPairs(clean, clean[derangement(n, rng)])


def repeated_positions(seq_len: int) -> torch.Tensor:
    """The positions of the second copy: there the next token is known from the first."""
    segment = (seq_len - 1) // 2
    if seq_len != 1 + 2 * segment or segment < 1:
        raise TaskError(f"induction prompts are BOS + two equal segments (odd length >= 3), "
                        f"got length {seq_len}")
    return torch.arange(1 + segment, seq_len)


def kl_repeated_metric(pairs: TokenPairs) -> Metric:
    """KL(full model || circuit) averaged over the positions of the second copy (the paper's
    induction metric, with its mask of induction positions)."""
    positions = repeated_positions(pairs.seq_len)

    def fn(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        pos = positions.to(circuit_logits.device)
        kl = F.kl_div(F.log_softmax(circuit_logits[:, pos], dim=-1),
                      F.log_softmax(full_logits[:, pos], dim=-1), log_target=True,
                      reduction="none")
        return kl.sum(-1).mean()

    return Metric("kl_repeated", fn, last_position_only=False)


def load_redwood(device: str, path: str | None = None) -> Any:
    """``redwood_attn_2l`` as ``TransformerWeights``: from ``path`` (a directory holding
    ``final.pth`` and ``config.json``, or the checkpoint file), else from
    ``$ACDC_VIZ_REDWOOD_PATH``, else from the Hugging Face hub (or its cache). A ``ModelLoadError``
    says how to provide the files offline."""
    from acdc_viz.models.shortformer import load_redwood_weights

    return load_redwood_weights(path, device=device)
