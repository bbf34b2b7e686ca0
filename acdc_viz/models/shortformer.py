"""Shortformer checkpoints in TransformerLens format, read without TransformerLens.

The ACDC paper's induction model, Redwood's ``redwood_attn_2l`` (hub repo
``ArthurConmy/redwood_attn_2l``), is a TransformerLens ``HookedTransformer`` state dict
(``final.pth``) with a TransformerLens-style ``config.json``: 2 layers of 8 heads, attention only,
d_model 256, d_head 32, n_ctx 2048, 50,259 tokens, LayerNorm with weights, and **shortformer**
positional embeddings. TransformerLens 4 cannot run it: its native bridge has no shortformer
positions, and ``TransformerBridge.boot_tl_legacy`` refuses the checkpoint. So we read the state
dict into the engine's ``TransformerWeights`` ourselves.

Shortformer, as TransformerLens' ``HookedTransformer`` computes it: the stream starts as the token
embedding alone; in every layer the query and key inputs are ``ln1(resid) + W_pos[:pos]`` and the
value input is ``ln1(resid)``. The positions are added *after* ``ln1`` and never reach the
stream. ACDC's corrections act on a head's input before ``ln1`` (the ACDC code hooks
``hook_q_input``), so ``Embed`` is the token embedding and the positions are no source.

We read the raw weights, as the ACDC code does (``fold_ln``, ``center_writing_weights`` and
``center_unembed`` off): ``HookedTransformer.from_pretrained`` would centre ``W_pos`` by default,
which changes a shortformer model's queries and keys.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from acdc_viz.errors import describe
from acdc_viz.models.adapter import LayerWeights, TransformerWeights, _norm
from acdc_viz.models.loading import (
    ModelLoadError,
    _env_offline,
    _hub_errors,
    _hub_offline_mode,
    _hub_reachable,
)
from acdc_viz.models.support import NORMS

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "PATH_ENV",
    "REDWOOD_CONFIG",
    "REDWOOD_REPO",
    "load_redwood_weights",
    "weights_from_state_dict",
]

REDWOOD_REPO = "ArthurConmy/redwood_attn_2l"
#: The files TransformerLens reads from the repo (it takes the one file ending in ``final.pth``).
CHECKPOINT_FILE = "final.pth"
CONFIG_FILE = "config.json"
#: Environment variable naming a local copy (a directory with ``final.pth``, or the file itself).
PATH_ENV = "ACDC_VIZ_REDWOOD_PATH"

#: The fields of redwood_attn_2l's config.json that matter here; used for a state dict given
#: without its config.json.
REDWOOD_CONFIG: dict[str, Any] = {
    "n_layers": 2,
    "n_heads": 8,
    "d_model": 256,
    "d_head": 32,
    "n_ctx": 2048,
    "d_vocab": 50259,
    "eps": 1e-5,
    "normalization_type": "LN",
    "attn_only": True,
    "attention_dir": "causal",
    "use_attn_scale": True,
    "positional_embedding_type": "shortformer",
}

#: Buffers of a HookedTransformer state dict that hold no weights (the causal mask, -inf).
_BUFFERS = ("attn.mask", "attn.IGNORE")


def _positional_type(config: dict[str, Any]) -> str:
    if "shortformer_pos" in config:
        return "shortformer" if config["shortformer_pos"] else "standard"
    return str(config.get("positional_embedding_type", "standard"))


def weights_from_state_dict(state_dict: dict[str, torch.Tensor], config: dict[str, Any], *,
                            source: str = "the checkpoint") -> TransformerWeights:
    """``TransformerWeights`` of an attention-only shortformer model from its TransformerLens
    ``HookedTransformer`` state dict and TransformerLens-style config.

    Raises ``ModelLoadError`` if the config is not an attention-only shortformer model, a weight is
    missing or has the wrong shape, or the state dict holds weights this reader would ignore.
    """
    problems = []
    if _positional_type(config) != "shortformer":
        problems.append(f"positional embeddings {_positional_type(config)!r}, not 'shortformer' "
                        "(load ordinary checkpoints with acdc_viz.load_model)")
    if not config.get("attn_only", False):
        problems.append("a model with MLPs (only attention-only models are read here)")
    kind = config.get("normalization_type", config.get("normalization"))
    if kind not in NORMS:
        problems.append(f"normalization {kind!r} (supported: {NORMS})")
    if config.get("attention_dir", "causal") not in ("causal", "bidirectional"):
        problems.append(f"attention_dir {config['attention_dir']!r}")
    if problems:
        raise ModelLoadError(f"{source} is not a model this reader supports: "
                             + "; ".join(problems))

    n_layers, n_heads = int(config["n_layers"]), int(config["n_heads"])
    d_model, d_head = int(config["d_model"]), int(config["d_head"])
    d_vocab, n_ctx = int(config["d_vocab"]), int(config["n_ctx"])
    d_out = int(config.get("d_vocab_out", -1))
    d_out = d_out if d_out > 0 else d_vocab
    expected: dict[str, tuple[int, ...]] = {
        "embed.W_E": (d_vocab, d_model),
        "pos_embed.W_pos": (n_ctx, d_model),
        "unembed.W_U": (d_model, d_out),
        "unembed.b_U": (d_out,),
    }
    for layer in range(n_layers):
        a = f"blocks.{layer}.attn"
        expected |= {f"{a}.W_{x}": (n_heads, d_model, d_head) for x in "QKV"}
        expected |= {f"{a}.b_{x}": (n_heads, d_head) for x in "QKV"}
        expected |= {f"{a}.W_O": (n_heads, d_head, d_model), f"{a}.b_O": (d_model,)}
    norms = [f"blocks.{layer}.ln1" for layer in range(n_layers)] + ["ln_final"]
    if kind in ("LN", "RMS"):
        expected |= {f"{n}.w": (d_model,) for n in norms}
    if kind == "LN":
        expected |= {f"{n}.b": (d_model,) for n in norms}

    missing = [k for k in expected if k not in state_dict]
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    unknown = [k for k in state_dict if k not in expected and not k.endswith(_BUFFERS)]
    if missing or wrong or unknown:
        details = [f"missing {missing[:6]}" if missing else "",
                   f"wrong shapes: {', '.join(wrong[:6])}" if wrong else "",
                   f"unexpected weights {unknown[:6]}" if unknown else ""]
        raise ModelLoadError(
            f"{source} does not match its config ({n_layers} layers, {n_heads} heads, d_model "
            f"{d_model}, d_head {d_head}, {d_vocab} tokens, n_ctx {n_ctx}, "
            f"normalization {kind!r}): " + "; ".join(d for d in details if d) + ". Expected a "
            "TransformerLens HookedTransformer state dict of an attention-only shortformer model "
            f"(like {REDWOOD_REPO}'s {CHECKPOINT_FILE}) with the config.json saved beside it."
        )

    sd = {k: state_dict[k].detach() for k in expected}
    eps = float(config.get("eps", 1e-5))
    scale = 1.0
    if config.get("use_attn_scale", True):
        given = float(config.get("attn_scale", -1.0) or -1.0)
        scale = given if given > 0 else d_head**0.5
    layers = []
    for layer in range(n_layers):
        a = f"blocks.{layer}.attn"
        inverse = config.get("scale_attn_by_inverse_layer_idx", False)
        layers.append(LayerWeights(
            ln1=_norm(None, sd, f"blocks.{layer}.ln1", kind, eps),
            W_Q=sd[f"{a}.W_Q"], b_Q=sd[f"{a}.b_Q"], W_K=sd[f"{a}.W_K"], b_K=sd[f"{a}.b_K"],
            W_V=sd[f"{a}.W_V"], b_V=sd[f"{a}.b_V"], W_O=sd[f"{a}.W_O"], b_O=sd[f"{a}.b_O"],
            attn_scale=scale * (layer + 1 if inverse else 1),
        ))
    final_kind = "RMS" if config.get("final_rms", False) else kind
    return TransformerWeights(
        W_E=sd["embed.W_E"],
        W_pos=None,
        layers=layers,
        ln_final=_norm(None, sd, "ln_final", final_kind, eps),
        W_U=sd["unembed.W_U"],
        b_U=sd["unembed.b_U"],
        act=F.relu,                      # unused: attention only
        causal=config.get("attention_dir", "causal") != "bidirectional",
        n_heads=n_heads,
        attn_only=True,
        d_vocab=int(sd["unembed.W_U"].shape[1]),
        n_ctx=n_ctx,
        W_pos_qk=sd["pos_embed.W_pos"],
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ModelLoadError(
            f"could not read {path} as a PyTorch state dict ({type(err).__name__}: {err}). "
            f"Expected {REDWOOD_REPO}'s {CHECKPOINT_FILE}, a file written by torch.save."
        ) from err
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelLoadError(f"{path} holds a {type(state_dict).__name__}, not a state dict of "
                             "tensors; expected a TransformerLens HookedTransformer state dict")
    return state_dict


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read {path} as JSON ({err}); expected the "
                             f"TransformerLens config.json of {REDWOOD_REPO}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds no JSON object; expected a TransformerLens config")
    return config


def _local_files(path: Path) -> tuple[Path, Path | None]:
    """The checkpoint and (if there is one) the config.json of a local copy."""
    if path.is_dir():
        checkpoint = path / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise ModelLoadError(
                f"{path} holds no {CHECKPOINT_FILE}. Expected a directory with {REDWOOD_REPO}'s "
                f"{CHECKPOINT_FILE} (and its {CONFIG_FILE}), or the path of the checkpoint file."
            )
    elif path.is_file():
        checkpoint = path
    else:
        raise ModelLoadError(
            f"{path} does not exist. Expected a directory holding {REDWOOD_REPO}'s "
            f"{CHECKPOINT_FILE} (and {CONFIG_FILE}), or the checkpoint file itself."
        )
    config = checkpoint.parent / CONFIG_FILE
    return checkpoint, config if config.is_file() else None


def _hub_files() -> tuple[Path, Path]:
    """config.json and final.pth of the hub repo, from the local cache when offline."""
    from huggingface_hub import hf_hub_download

    offline = _env_offline()
    reachable = False if offline else _hub_reachable()
    try:
        with _hub_offline_mode(not reachable):
            config = hf_hub_download(REDWOOD_REPO, CONFIG_FILE)
            checkpoint = hf_hub_download(REDWOOD_REPO, CHECKPOINT_FILE)
    except _hub_errors() as err:
        cause = describe(err)
        mode = "offline mode is set" if offline else "no network?" if not reachable else "online"
        raise ModelLoadError(
            f"Could not load redwood_attn_2l ({CHECKPOINT_FILE} and {CONFIG_FILE} of the Hugging "
            f"Face hub repo {REDWOOD_REPO}; {mode}): {cause}. To use it offline: on a machine "
            f"with access run `huggingface_hub.hf_hub_download({REDWOOD_REPO!r}, "
            f"{CHECKPOINT_FILE!r})` (and the same for {CONFIG_FILE!r}), copy both files into a "
            f"directory DIR here, and pass it: load_redwood_weights(DIR), or set {PATH_ENV}=DIR "
            "for the induction-redwood task; or set HF_HOME to a cache that already holds them."
        ) from err
    return Path(config), Path(checkpoint)


def load_redwood_weights(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransformerWeights:
    """Redwood's ``redwood_attn_2l`` as ``TransformerWeights``, ready for ``Acdc``.

    Args:
        path: a directory holding ``final.pth`` (and ``config.json``), or the checkpoint file
            itself; a checkpoint without a config.json beside it is read with
            :data:`REDWOOD_CONFIG`. None: the path in ``$ACDC_VIZ_REDWOOD_PATH`` if set, else the
            hub repo (downloaded once, then read from the Hugging Face cache, also offline).
        device, dtype: where the weights go and their float dtype.

    Raises:
        ModelLoadError: the files are missing, unreadable, or not this kind of model; the message
            says how to provide them.
    """
    from_env = path is None and bool(os.environ.get(PATH_ENV))
    if from_env:
        path = os.environ[PATH_ENV]
    if path is None:
        config_file, checkpoint = _hub_files()
        config: dict[str, Any] | None = _read_config(config_file)
        source = f"{REDWOOD_REPO}/{CHECKPOINT_FILE}"
    else:
        try:
            checkpoint, config_file_or_none = _local_files(Path(path).expanduser())
        except ModelLoadError as err:
            if from_env:
                raise ModelLoadError(f"${PATH_ENV}: {err}") from err
            raise
        config = _read_config(config_file_or_none) if config_file_or_none else None
        source = str(checkpoint)
    if config is None:
        logger.info("%s has no %s beside it; reading it with redwood_attn_2l's config",
                    checkpoint, CONFIG_FILE)
        config = REDWOOD_CONFIG
    weights = weights_from_state_dict(_read_state_dict(checkpoint), config, source=source)
    return weights.to(device, dtype)
