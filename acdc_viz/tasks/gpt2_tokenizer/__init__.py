"""GPT-2's tokenizer without the hub, from the BPE files shipped next to this module.

``transformers.GPT2Tokenizer(vocab_file=..., merges_file=...)`` silently builds an empty
tokenizer in transformers 5, so the tokenizer is assembled from ``tokenizers`` parts instead:
a BPE model on ``encoder.json`` and ``vocab.bpe``, GPT-2's byte-level pre-tokenizer (no prefix
space, as GPT-2 itself) and the byte-level decoder. ``NOTICE.md`` says where the files come
from; ``scripts/fetch_gpt2_tokenizer.sh`` rebuilds them.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from acdc_viz.tasks.base import TaskError

__all__ = ["ENDOFTEXT", "ENDOFTEXT_ID", "TOKENIZER_DIR", "gpt2_tokenizer"]

#: Where ``encoder.json`` and ``vocab.bpe`` live.
TOKENIZER_DIR = Path(str(resources.files("acdc_viz.tasks.gpt2_tokenizer")))
#: GPT-2's only special token, which doubles as BOS and EOS.
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> Any:
    """GPT-2's tokenizer as a ``transformers.PreTrainedTokenizerFast``; works offline.

    Built once per process (about 0.3 s) and shared, so treat it as read-only: adding tokens
    to it would change every task's prompts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    encoder, merges = TOKENIZER_DIR / "encoder.json", TOKENIZER_DIR / "vocab.bpe"
    missing = [p.name for p in (encoder, merges) if not p.is_file()]
    if missing:
        raise TaskError(
            f"GPT-2's tokenizer files {missing} are missing from {TOKENIZER_DIR}. They ship with "
            "acdc_viz: reinstall it, or, in a checkout, run scripts/fetch_gpt2_tokenizer.sh."
        )
    backend = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT
    )
