"""Load the model ACDC runs on, from a local directory or the Hugging Face hub.

Everything downstream works on a TransformerLens ``TransformerBridge``, whichever way the
weights arrive:

- a local directory in Hugging Face format (``save_pretrained``) is loaded offline with
  ``transformers`` and wrapped with ``TransformerBridge.boot_transformers(..., hf_model=...)``;
  a directory without tokenizer files still works, with a placeholder tokenizer, because ACDC
  feeds token ids, not text (so does a hub model cached without them, offline);
- a hub name goes to ``TransformerBridge.boot_transformers``, or, for the pre-HF-format
  TransformerLens checkpoints (``attn-only-4l``, ``redwood_attn_2l``, ``NeelNanda/...``,
  ``ArthurConmy/...``), to ``TransformerBridge.boot_tl_legacy``.

Offline, ``huggingface_hub`` retries a missing file with exponential backoff for about 20
seconds before giving up. :func:`load_model` avoids that wait: when ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) is set, or a quick probe shows the hub is unreachable, the load runs in
hub offline mode, so weights already in the local cache still load and missing ones fail at
once with a :class:`ModelLoadError` that says how to bring the weights over. A model that
TransformerLens cannot wrap is a :class:`ModelLoadError` too, naming what acdc_viz would refuse in
it anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from acdc_viz.errors import ModelLoadError, describe

logger = logging.getLogger(__name__)

__all__ = [
    "IDENTITY_FIELDS",
    "ModelLoadError",
    "build_tiny_gpt2",
    "load_model",
    "model_identity",
]

#: Config fields that decide a model's computational graph and numerics; hashed by
#: :func:`model_identity`. Fields a config lacks hash as ``null``.
IDENTITY_FIELDS: tuple[str, ...] = (
    "n_layers",
    "n_heads",
    "d_model",
    "d_head",
    "d_mlp",
    "d_vocab",
    "d_vocab_out",
    "n_ctx",
    "n_key_value_heads",
    "act_fn",
    "normalization_type",
    "final_rms",
    "attn_only",
    "gated_mlp",
    "parallel_attn_mlp",
    "positional_embedding_type",
    "rotary_dim",
    "rotary_base",
    "original_architecture",
)

#: Seconds to wait for the hub to answer the reachability probe.
HUB_PROBE_TIMEOUT_S = 3.0

#: Files whose presence means a model directory ships its own tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Load ``name_or_path`` as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name_or_path: a directory written by ``save_pretrained`` (must hold ``config.json``),
            or a Hugging Face hub name (``"gpt2"``), or a TransformerLens legacy checkpoint name
            (``"attn-only-4l"``, ``"NeelNanda/Attn_Only_4L512W_C4_Code"``,
            ``"redwood_attn_2l"``).
        device: where the weights go.
        dtype: floating-point dtype of the weights.

    Raises:
        ModelLoadError: the directory is not a usable model, or the hub could not provide the
            weights (the message explains how to use them offline).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_directory(path, device=device, dtype=dtype)
    name = str(name_or_path)
    if path.exists() or _looks_like_path(name):
        raise ModelLoadError(
            f"{name!r} is not a model directory: expected a directory written by "
            "save_pretrained (holding config.json and the weights) or a Hugging Face hub name "
            "such as 'gpt2'. Check the path."
        )
    return _load_from_hub(name, device=device, dtype=dtype)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else can only be a (missing) path."""
    separators = {"/", "\\", os.sep}
    return (
        name.startswith((".", "~", *separators))
        or name.count("/") > 1
        or any(sep in name for sep in separators - {"/"})
    )


def _load_directory(directory: Path, *, device: str | torch.device, dtype: torch.dtype) -> Any:
    """Load an HF-format directory without touching the network."""
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory. "
            "Expected the output of model.save_pretrained(DIR) (config.json plus "
            "model.safetensors); write one with transformers, or with build_tiny_gpt2(DIR) for a "
            "small test model."
        )
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    hf_model: Any
    try:
        # Eager attention: the bridge's attention hooks need the explicit pattern.
        hf_model = AutoModelForCausalLM.from_pretrained(
            directory,
            dtype=dtype,
            attn_implementation="eager",
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(
            f"Could not load the model in {directory} with "
            f"transformers.AutoModelForCausalLM ({type(err).__name__}: {err}). Expected a "
            "causal language model saved with save_pretrained (config.json with a model_type, "
            "plus its weights)."
        ) from err
    hf_model = hf_model.to(device).eval()
    tokenizer = None
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning(
            "%s has no tokenizer files; using a placeholder tokenizer (token <i> is id i). "
            "ACDC works on token ids, so this only affects text shown to people.",
            directory,
        )
        tokenizer = _placeholder_tokenizer(hf_model.config)
    try:
        bridge = TransformerBridge.boot_transformers(
            str(directory), hf_model=hf_model, device=device, dtype=dtype, tokenizer=tokenizer
        )
    except _BOOT_ERRORS as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ModelLoadError(_boot_failure_message(str(directory), hf_model.config, err)) from err
    return bridge.eval()


#: What ``boot_transformers`` raises for a model it cannot wrap (RuntimeError: an HF module with
#: a part its adapter does not declare, such as Phi's ``qk_layernorm``).
_BOOT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, NotImplementedError, RuntimeError,
)


def _boot_failure_message(where: str, hf_config: Any, err: BaseException) -> str:
    """Why TransformerLens 4 could not wrap a loaded model, with acdc_viz's own verdict on its
    architecture when acdc_viz would refuse it anyway."""
    from acdc_viz.models.support import SUPPORTED_FAMILIES, config_problems

    message = (
        f"TransformerLens 4 could not wrap the model {where} ({describe(err)}). Check that "
        "its architecture is supported: TransformerBridge.list_supported_models()."
    )
    problems = config_problems(hf_config) if hf_config is not None else []
    if problems:
        message += (
            " acdc_viz would refuse it in any case: " + "; ".join(problems) + ". "
            + SUPPORTED_FAMILIES
        )
    return message


def _placeholder_tokenizer(hf_config: Any) -> Any:
    """A word-level tokenizer whose token ``<i>`` is id ``i``, for models shipped without one.

    ``boot_transformers`` insists on a tokenizer and would otherwise try to load one from the
    directory (which fails for most architectures). Having exactly ``vocab_size`` tokens keeps
    every id the tokenizer can produce inside the model's vocabulary. The tokenizer itself adds
    no BOS; the bridge's ``to_tokens`` still prepends its BOS (the EOS id) when
    ``cfg.default_prepend_bos`` asks for it, as for any model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(hf_config.vocab_size)
    eos_id = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size:
        eos_id = vocab_size - 1
    eos = f"<{eos_id}>"
    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token=eos))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, unk_token=eos, pad_token=eos
    )


def _env_offline() -> bool:
    """Offline requested through the environment, read now rather than at import time."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    requested = any((flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)
    return requested or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers at all within ``timeout`` seconds (any HTTP status counts).

    Uses ``huggingface_hub``'s own HTTP session so proxies and a custom ``HF_ENDPOINT`` are
    honoured exactly as they would be for the download.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - any failure to connect means "unreachable"
        logger.info("Hugging Face hub %s unreachable: %s", constants.ENDPOINT, err)
        return False
    return True


@contextlib.contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Temporarily put ``huggingface_hub`` (and so ``transformers``) in offline mode.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import; both libraries consult
    ``huggingface_hub.constants.HF_HUB_OFFLINE`` on every call, so flipping it here makes an
    environment variable set later (or a failed probe) take effect. Not thread-safe.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _legacy_repo(name: str) -> str | None:
    """The legacy TransformerLens repo ``name`` refers to, or None for an HF-format model.

    Accepts the official repo (``NeelNanda/Attn_Only_4L512W_C4_Code``), TransformerLens' short
    alias (``attn-only-4l``, ``redwood_attn_2l``), and a short alias behind its owner
    (``NeelNanda/attn-only-4l``).
    """
    from transformer_lens.model_bridge.sources.tl_legacy import TL_LEGACY_PREFIXES
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    official = resolve_model_alias(name)
    if official is None and name.startswith(TL_LEGACY_PREFIXES):
        official = resolve_model_alias(name.split("/", 1)[1])
        if official is None or not official.startswith(TL_LEGACY_PREFIXES):
            official = name
    if official is not None and official.startswith(TL_LEGACY_PREFIXES):
        return official
    return None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub could not provide the files"."""
    from huggingface_hub import errors

    types: list[type[BaseException]] = [
        OSError,  # includes ConnectionError, OfflineModeIsEnabled, LocalEntryNotFoundError
        ValueError,  # transformers: "... does not appear to have a file named ..."
        errors.EntryNotFoundError,
    ]
    # The HTTP client's own errors, for whichever client huggingface_hub has loaded (a client
    # that was never imported cannot have raised anything). huggingface_hub.errors imports its
    # client's HTTPError, so that one is always among them.
    for module in ("httpx2", "httpx", "requests"):
        lib = sys.modules.get(module)
        base = getattr(lib, "HTTPError", None) or getattr(lib, "RequestException", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            types.append(base)
    return tuple(types)


def _load_from_hub(name: str, *, device: str | torch.device, dtype: torch.dtype) -> Any:
    """A hub model as a TransformerBridge (a legacy TransformerLens checkpoint through
    ``boot_tl_legacy``), from the local cache only when the hub is unreachable."""
    from transformer_lens.model_bridge import TransformerBridge

    legacy = _legacy_repo(name)
    if legacy is not None and legacy != name:
        logger.info("%r is the TransformerLens legacy checkpoint %r", name, legacy)
    if legacy == "ArthurConmy/redwood_attn_2l":
        raise ModelLoadError(
            f"{name!r} uses shortformer positional embeddings, which no TransformerBridge runs "
            "(boot_tl_legacy refuses it). acdc_viz reads it itself, as TransformerWeights that "
            "Acdc accepts: acdc_viz.models.shortformer.load_redwood_weights(), or the task "
            "get_task('induction-redwood').load_model(device)."
        )
    offline = _env_offline()
    reachable = False if offline else _hub_reachable()
    if not offline and not reachable:
        logger.warning(
            "The Hugging Face hub is unreachable; loading %r from the local cache only.", name
        )
    try:
        with _hub_offline_mode(not reachable):
            if legacy is not None:
                # attached to the class when its sources load: invisible to the type checker
                boot_tl_legacy = cast(Any, TransformerBridge).boot_tl_legacy
                bridge = boot_tl_legacy(legacy, device=device, dtype=dtype)
            else:
                tokenizer = None if reachable else _cached_placeholder_tokenizer(name)
                bridge = TransformerBridge.boot_transformers(
                    name, device=device, dtype=dtype, tokenizer=tokenizer
                )
    except _hub_errors() as err:
        raise ModelLoadError(
            _hub_failure_message(name, legacy, reachable=reachable, err=err)
        ) from err
    except _BOOT_ERRORS as err:  # the files are there, but TransformerLens cannot wrap them
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ModelLoadError(_boot_failure_message(repr(name), _cached_config(name), err)) from err
    return bridge.eval()


def _cached_snapshot(name: str) -> Path | None:
    """The local cache's snapshot directory of hub model ``name`` (holding its config.json),
    or None. Reads the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _cached_config(name: str) -> Any:
    """The Hugging Face config of a cached hub model, or None."""
    snapshot = _cached_snapshot(name)
    if snapshot is None:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(snapshot, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _cached_placeholder_tokenizer(name: str) -> Any:
    """Offline, for a hub model whose cached snapshot has no tokenizer files: the placeholder
    tokenizer (as for a local directory). None otherwise, so that ``boot_transformers`` loads
    the real one (or reports the missing files).

    Without it, ``boot_transformers`` would fail on the missing tokenizer for some families
    (Llama) and silently build an empty one for others (Qwen2, Phi).
    """
    snapshot = _cached_snapshot(name)
    if snapshot is None or any((snapshot / f).is_file() for f in _TOKENIZER_FILES):
        return None
    config = _cached_config(name)
    if config is None or getattr(config, "vocab_size", None) is None:
        return None
    logger.warning(
        "the cached %r has no tokenizer files; using a placeholder tokenizer (token <i> is id "
        "i). ACDC works on token ids, so this only affects text shown to people.",
        name,
    )
    return _placeholder_tokenizer(config)


def _hub_failure_message(name: str, legacy: str | None, *, reachable: bool,
                         err: BaseException) -> str:
    """Why a hub model could not be loaded, and what to do: check the name, or get it cached."""
    cause = describe(err)
    if not cause.endswith((".", "!", "?")):
        cause += "."
    if reachable:
        what = (
            f"Could not load {name!r} from the Hugging Face hub: {cause} Check the name (hub "
            "ids look like 'gpt2' or 'EleutherAI/pythia-70m') and, for gated models, that "
            "HF_TOKEN is set."
        )
    else:
        mode = "offline mode is set" if _env_offline() else "no network?"
        what = f"Could not load {name!r} from the Hugging Face hub ({mode}): {cause}"
    if legacy is not None:
        return (
            f"{what} {legacy!r} is a legacy TransformerLens checkpoint, not in Hugging Face "
            "format: it cannot be re-saved with save_pretrained, and TransformerBridge."
            "boot_tl_legacy lists the repo's files on the hub even when they are cached, so it "
            "needs network access. Run where huggingface.co is reachable, or use a model in "
            "Hugging Face format offline (a directory from save_pretrained, passed as "
            "--model DIR / load_model(DIR); build_tiny_gpt2(DIR) makes a small one)."
        )
    return (
        f"{what} To use these weights offline: on a machine with access (and HF_TOKEN set, for "
        "a gated model such as Llama or Gemma) run "
        f"`transformers.AutoModelForCausalLM.from_pretrained({name!r}).save_pretrained(DIR)` "
        f"(and `transformers.AutoTokenizer.from_pretrained({name!r}).save_pretrained(DIR)`), "
        "copy DIR here and pass its path (--model DIR / load_model(DIR)); or set HF_HOME to a "
        "cache that already holds them."
    )


def model_identity(model: Any) -> dict[str, Any]:
    """Name, shape and a config hash of ``model``, to record next to ACDC results.

    The hash covers :data:`IDENTITY_FIELDS` of ``model.cfg`` (a ``TransformerBridgeConfig`` or
    ``HookedTransformerConfig``), as canonical JSON, so results can be matched to the model
    architecture they were computed on. It does not cover the weights: two checkpoints of the
    same architecture share a hash and are told apart by ``name``.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError(
            f"model_identity needs a TransformerLens model with a .cfg, got "
            f"{type(model).__name__}. Load it with load_model()."
        )
    fields = {field: _jsonable(getattr(cfg, field, None)) for field in IDENTITY_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return {
        "name": getattr(cfg, "model_name", None),
        "config_hash": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "attn_only": bool(getattr(cfg, "attn_only", False)),
    }


def _jsonable(value: Any) -> Any:
    """Config values as plain JSON (enums, dtypes and the like by their string form)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def build_tiny_gpt2(
    directory: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    vocab_size: int = 100,
    n_positions: int = 32,
    seed: int = 0,
) -> Path:
    """Write a small randomly initialised GPT-2 in Hugging Face format to ``directory``.

    For tests and the offline demo: it loads through the same path as a real checkpoint
    (:func:`load_model` on a directory) in well under a second. The same ``seed`` always gives
    the same weights. The global torch RNG is reseeded, then restored.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    logger.info("wrote a tiny GPT-2 (%d layers, %d heads) to %s", n_layer, n_head, directory)
    return directory
