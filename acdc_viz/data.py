"""Clean/corrupt token pairs: the only data ACDC needs.

ACDC scores an edge by how much the model's output moves when that edge carries the activation
of a *corrupt* prompt instead of the *clean* one. Everything here works on token ids, not text,
so a model without a tokenizer (a local test model, a checkpoint copied from elsewhere) can be
analysed, and so datasets built by other tools (auto-circuit's ``PromptPairBatch``, a torch
``DataLoader``, a JSON file written by a script) come in without a tokenizer round trip.

Files are read from JSON, safetensors, or ``.pt`` through ``torch.load(weights_only=True)``:
nothing is ever unpickled, because a data file must not be able to run code. Every problem with
an input is a :class:`DataError` that names what was wrong, what was expected and what to do,
rather than a traceback from deep inside ``json`` or ``safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acdc_viz.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEPTED_SUFFIXES",
    "DataError",
    "TokenPairs",
    "data_hash",
    "load_token_pairs",
    "random_token_pairs",
    "save_token_pairs",
]

#: File suffixes that :func:`load_token_pairs` and :func:`save_token_pairs` understand.
ACCEPTED_SUFFIXES: tuple[str, ...] = (".json", ".safetensors", ".pt")

_FORMATS_HELP = (
    '.json ({"clean": [[ids...], ...], "corrupt": [[ids...], ...]}), '
    ".safetensors (tensors named 'clean' and 'corrupt'), "
    ".pt (a dict {'clean': tensor, 'corrupt': tensor}, read with torch.load(weights_only=True))"
)
_ACCEPTED_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class TokenPairs:
    """A batch of clean prompts and their corrupted counterparts, as token ids.

    Row ``i`` of ``corrupt`` is the counterfactual of row ``i`` of ``clean``; ACDC patches
    position ``p`` of one into position ``p`` of the other, so both must have exactly the same
    shape. Ids are stored as int64 because that is what embedding lookups index with; int32 input
    is widened, but clean and corrupt of *different* dtypes are refused, because that usually
    means they were produced by different pipelines and may not be aligned.

    Attributes:
        clean: int64 tensor of shape ``(batch, pos)``.
        corrupt: int64 tensor with the same shape as ``clean``.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor

    def __post_init__(self) -> None:
        """Reject anything ACDC cannot use, before a run starts: say what and how to fix it."""
        for name in ("clean", "corrupt"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise DataError(
                    f"TokenPairs.{name} must be a torch.Tensor of token ids, got "
                    f"{type(value).__name__}. Convert it first, e.g. "
                    f"torch.tensor(ids, dtype=torch.int64)."
                )
        clean, corrupt = self.clean, self.corrupt
        if clean.dtype != corrupt.dtype:
            raise DataError(
                f"clean and corrupt have different dtypes ({clean.dtype} vs {corrupt.dtype}); "
                "they should come from the same tokenization. Cast both to torch.int64 "
                "(.long()) if they really are aligned."
            )
        if clean.dtype not in _ACCEPTED_DTYPES:
            raise DataError(
                f"token ids must be integers (torch.int64 or torch.int32), got {clean.dtype}. "
                "Pass token ids, not embeddings or probabilities; if the values are whole "
                "numbers, convert them with .long()."
            )
        for name, value in (("clean", clean), ("corrupt", corrupt)):
            if value.dim() != 2:
                raise DataError(
                    f"{name} must be 2-D (batch, pos), got {value.dim()}-D with shape "
                    f"{tuple(value.shape)}. For a single prompt use ids.unsqueeze(0)."
                )
        if clean.shape != corrupt.shape:
            raise DataError(
                f"clean and corrupt must have the same shape (each corrupt row is patched "
                f"position by position into its clean row), got {tuple(clean.shape)} vs "
                f"{tuple(corrupt.shape)}. Pad or truncate them to a common length."
            )
        if clean.shape[0] < 1 or clean.shape[1] < 1:
            raise DataError(
                f"token pairs are empty (shape {tuple(clean.shape)}); need at least one prompt "
                "(batch >= 1) of at least one token (pos >= 1)."
            )
        for name, value in (("clean", clean), ("corrupt", corrupt)):
            smallest = int(value.min())
            if smallest < 0:
                raise DataError(
                    f"{name} holds a negative token id ({smallest}); ids index the vocabulary "
                    "and must be >= 0. Padding markers such as -100 must be replaced by a real "
                    "token id."
                )
        # Frozen dataclass: normalise through object.__setattr__ (only widens int32).
        object.__setattr__(self, "clean", clean.to(torch.int64))
        object.__setattr__(self, "corrupt", corrupt.to(torch.int64))

    @property
    def batch_size(self) -> int:
        """Number of prompt pairs."""
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per prompt (every prompt has the same length)."""
        return int(self.clean.shape[1])

    def to(self, device: str | torch.device) -> TokenPairs:
        """A copy on ``device`` (the ids must live where the model does)."""
        return TokenPairs(self.clean.to(device), self.corrupt.to(device))

    def check_vocab(self, d_vocab: int) -> None:
        """Raise :class:`DataError` if any id is outside a model's vocabulary of ``d_vocab``.

        An out-of-range id would otherwise surface as an opaque index error (or a device-side
        assert on GPU) in the middle of a forward pass.
        """
        largest = int(torch.maximum(self.clean.max(), self.corrupt.max()))
        if largest >= d_vocab:
            which = "clean" if int(self.clean.max()) == largest else "corrupt"
            raise DataError(
                f"{which} holds token id {largest}, but the model's vocabulary has only "
                f"{d_vocab} tokens (ids 0..{d_vocab - 1}). The tokens were probably made with "
                "another tokenizer; re-tokenize them for this model."
            )

    @classmethod
    def from_batch(cls, batch: Any) -> TokenPairs:
        """Build from a batch as other circuit tools hand it over.

        Accepts an auto-circuit-style ``PromptPairBatch`` (any object with ``.clean`` and
        ``.corrupt`` tensors), a mapping with keys ``"clean"`` and ``"corrupt"``, or a
        ``(clean, corrupt)`` tuple or list.
        """
        # Attributes first: a named tuple (clean, corrupt) or PromptPairBatch is read by name,
        # never by position, so a differently ordered container cannot swap the two.
        if hasattr(batch, "clean") and hasattr(batch, "corrupt"):
            return cls(batch.clean, batch.corrupt)
        if isinstance(batch, Mapping):
            missing = [key for key in ("clean", "corrupt") if key not in batch]
            if missing:
                raise DataError(
                    f"batch dict is missing {missing}; expected keys 'clean' and 'corrupt', "
                    f"found {sorted(map(str, batch))}."
                )
            return cls(batch["clean"], batch["corrupt"])
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            if len(batch) != 2:
                raise DataError(
                    f"a batch given as a sequence must be (clean, corrupt), got {len(batch)} items."
                )
            return cls(batch[0], batch[1])
        raise DataError(
            f"cannot read token pairs from a {type(batch).__name__}; expected an object with "
            ".clean and .corrupt (e.g. auto-circuit's PromptPairBatch), a dict with 'clean' and "
            "'corrupt', or a (clean, corrupt) tuple."
        )

    @classmethod
    def from_dataloader(cls, loader: Any) -> TokenPairs:
        """Build from the FIRST batch of ``loader`` only; the rest is never read.

        ACDC runs its patching on one fixed batch (every edge must be judged on the same
        prompts), so the batch size of the loader is the number of prompts used. To use more
        prompts, build the loader with a larger ``batch_size``.
        """
        try:
            first = next(iter(loader))
        except StopIteration:
            raise DataError(
                "the dataloader yielded no batches; it needs at least one batch of "
                "clean/corrupt pairs."
            ) from None
        return cls.from_batch(first)


def random_token_pairs(n: int, seq_len: int, d_vocab: int, seed: int = 0) -> TokenPairs:
    """Uniformly random clean ids and an independent random corrupt draw, for tests/benchmarks.

    Uses its own ``torch.Generator`` so it neither depends on nor disturbs the global RNG:
    the same arguments always give the same pairs.
    """
    for name, value in (("n", n), ("seq_len", seq_len), ("d_vocab", d_vocab)):
        if value < 1:
            raise DataError(f"random_token_pairs needs {name} >= 1, got {value}.")
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, seq_len), generator=generator, dtype=torch.int64)
    corrupt = torch.randint(0, d_vocab, (n, seq_len), generator=generator, dtype=torch.int64)
    return TokenPairs(clean, corrupt)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise DataError(
            f"{path}: unknown token-pair file format {suffix or '(no suffix)'!r}. Accepted: "
            f"{_FORMATS_HELP}."
        )
    return suffix


def load_token_pairs(path: str | Path) -> TokenPairs:
    """Read clean/corrupt token ids from a ``.json``, ``.safetensors`` or ``.pt`` file.

    The format is chosen by suffix. ``.pt`` files are read with ``weights_only=True`` and must
    hold a plain dict of tensors: arbitrary pickles are refused, because loading them can run
    code. Any problem (missing, unreadable, truncated or malformed file) is a
    :class:`DataError` naming the file and what was expected.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; expected a token-pair file ({_FORMATS_HELP}).")
    if not path.is_file():
        raise DataError(f"{path} is not a file; expected a token-pair file ({_FORMATS_HELP}).")
    if suffix == ".json":
        clean, corrupt = _read_json(path)
    elif suffix == ".safetensors":
        clean, corrupt = _read_safetensors(path)
    else:
        clean, corrupt = _read_pt(path)
    try:
        pairs = TokenPairs(clean, corrupt)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    logger.debug(
        "loaded %d token pairs of length %d from %s", pairs.batch_size, pairs.seq_len, path
    )
    return pairs


def _read_json(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``{"clean": [[...]], "corrupt": [[...]]}``: the token ids as nested lists of ints."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it as UTF-8 JSON text ({err}).") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the "
            'file may be truncated. Expected {"clean": [[ids...], ...], "corrupt": [[ids...], '
            "...]}."
        ) from None
    if not isinstance(data, dict) or "clean" not in data or "corrupt" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f'{path}: expected a JSON object with keys "clean" and "corrupt" (lists of rows of '
            f"token ids), found {found}."
        )
    return _rows_to_tensor(path, "clean", data["clean"]), _rows_to_tensor(
        path, "corrupt", data["corrupt"]
    )


def _rows_to_tensor(path: Path, name: str, rows: Any) -> torch.Tensor:
    """A list of equal-length lists of non-bool ints as an int64 tensor, or a DataError."""
    if not isinstance(rows, list) or not rows:
        raise DataError(
            f'{path}: "{name}" must be a non-empty list of rows of token ids, got {rows!r:.80}.'
        )
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise DataError(
                f'{path}: "{name}" row {i} is {type(row).__name__}, expected a list of token '
                "ids (one list per prompt)."
            )
        for j, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, int):
                raise DataError(
                    f'{path}: "{name}"[{i}][{j}] is {token!r}; token ids must be integers.'
                )
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        first = len(rows[0])
        odd = next(i for i, row in enumerate(rows) if len(row) != first)
        raise DataError(
            f'{path}: "{name}" rows must have equal length, but row 0 has {first} tokens and '
            f"row {odd} has {len(rows[odd])}. Pad or truncate the prompts to a common length."
        )
    try:
        return torch.tensor(rows, dtype=torch.int64)
    except (OverflowError, RuntimeError) as err:
        raise DataError(f'{path}: "{name}" holds ids that do not fit in int64 ({err}).') from None


def _read_safetensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(
            f"{path}: not a readable safetensors file ({_short(err)}); it may be "
            "truncated or in another format. Expected tensors named 'clean' and 'corrupt'."
        ) from None
    return _pick_tensors(path, tensors, "tensors")


def _short(err: BaseException) -> str:
    """The error's type and first line, clipped: torch's full text suggests weights_only=False,
    which is exactly the unsafe step this module refuses to take."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _read_pt(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``torch.save`` file of the two tensors, read with ``weights_only`` (runs no code)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise DataError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({_short(err)}). "
            "Expected a dict {{'clean': tensor, 'corrupt': tensor}} saved with "
            "torch.save; arbitrary pickled objects are refused because loading them can run "
            "code. Consider .safetensors instead."
        ) from None
    if not isinstance(data, Mapping):
        raise DataError(
            f"{path}: holds a {type(data).__name__}, expected a dict "
            "{'clean': tensor, 'corrupt': tensor}."
        )
    return _pick_tensors(path, data, "keys")


def _pick_tensors(
    path: Path, data: Mapping[str, Any], what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [key for key in ("clean", "corrupt") if key not in data]
    if missing:
        raise DataError(
            f"{path}: missing {missing}; expected {what} named 'clean' and 'corrupt', found "
            f"{sorted(map(str, data))}. Rename them, e.g. save_file({{'clean': ..., "
            "'corrupt': ...}})."
        )
    extra = sorted(set(map(str, data)) - {"clean", "corrupt"})
    if extra:
        logger.debug("%s: ignoring extra %s %s", path, what, extra)
    return data["clean"], data["corrupt"]


def save_token_pairs(pairs: TokenPairs, path: str | Path) -> Path:
    """Write ``pairs`` where :func:`load_token_pairs` can read them back; format by suffix.

    ``.json`` is for files people read or write by hand, ``.safetensors`` for large batches,
    ``.pt`` for code that already uses ``torch.save``. Returns the path written.
    """
    if not isinstance(pairs, TokenPairs):
        raise DataError(
            f"save_token_pairs expects a TokenPairs, got {type(pairs).__name__}; wrap the "
            "tensors with TokenPairs(clean, corrupt) first."
        )
    path = Path(path)
    suffix = _suffix(path)
    clean = pairs.clean.detach().cpu().contiguous()
    corrupt = pairs.corrupt.detach().cpu().contiguous()
    if suffix == ".json":
        payload = {"clean": clean.tolist(), "corrupt": corrupt.tolist()}
        path.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"clean": clean, "corrupt": corrupt}, str(path))
    else:
        torch.save({"clean": clean, "corrupt": corrupt}, path)
    logger.debug("saved %d token pairs to %s", pairs.batch_size, path)
    return path


def data_hash(pairs: TokenPairs) -> str:
    """A short hash of the prompt pairs: a resumed run must have the same."""
    digest = hashlib.sha256()
    for tokens in (pairs.clean, pairs.corrupt):
        digest.update(str(tuple(tokens.shape)).encode())
        digest.update(tokens.to("cpu", torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]
