"""Small models shipped inside the package, with the hashes of their files checked at every load.

A bundled model is described by ``bundled/{name}.json``: ``{"sha256": ..., "build": how it was
made, ...}``, in one of two formats, told apart by its ``format``:

- native (no ``format``): a TransformerLens 4 native bridge (``TransformerBridge.boot_native``);
  ``config`` holds the ``TransformerBridgeConfig`` keyword arguments, the weights are
  ``bundled/{name}.safetensors`` and ``sha256`` is their hash;
- ``"transformers"``: a Hugging Face model directory ``bundled/{name}/`` (``save_pretrained`` of
  the model and its tokenizer), loaded through ``acdc_viz.models.loading.load_model``, the same
  TransformerLens 4 path (``TransformerBridge.boot_transformers``) as any local checkpoint;
  ``sha256`` maps each file of the directory to its hash, and the directory must hold exactly
  those files (a stray one could change what ``transformers`` loads).

The hashes are checked at every load, so a truncated or edited file fails loudly instead of
giving a wrong circuit. Build scripts live in ``scripts/``; each documents its seed and how long
it takes.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch

from acdc_viz.errors import AcdcVizError

BUNDLED_DIR = Path(str(resources.files("acdc_viz.tasks") / "bundled"))


class BundledModelError(AcdcVizError, RuntimeError):
    """A bundled model's files are missing or corrupt."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_bundled(model: Any, name: str, config: dict[str, Any], build: dict[str, Any],
                 directory: Path = BUNDLED_DIR) -> Path:
    """Write ``model``'s weights and config (used by the build scripts, not at run time)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    _write_meta(directory, name, {"config": config, "sha256": sha256_of(weights), "build": build})
    return weights


def save_bundled_transformers(model: Any, tokenizer: Any, name: str, build: dict[str, Any],
                              directory: Path = BUNDLED_DIR) -> Path:
    """Write a Hugging Face model and its tokenizer as the directory ``{name}/`` and its JSON.

    For the build scripts. An existing ``{name}/`` is replaced, so no stale file outlives a
    rebuild (the loader refuses files the JSON does not list).
    """
    import shutil

    folder = directory / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = sorted(folder.iterdir())
    for path in files:  # save_pretrained leaves the weights private (0600): package data is not
        path.chmod(0o644)
    hashes = {path.name: sha256_of(path) for path in files}
    _write_meta(directory, name, {"format": "transformers", "sha256": hashes, "build": build})
    return folder


def _write_meta(directory: Path, name: str, meta: dict[str, Any]) -> None:
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def bundled_names(directory: Path = BUNDLED_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.json"))


def bundled_meta(name: str, directory: Path = BUNDLED_DIR) -> dict[str, Any]:
    path = directory / f"{name}.json"
    if not path.exists():
        raise BundledModelError(
            f"no bundled model named {name!r} (looked for {path}); bundled models: "
            f"{bundled_names(directory) or 'none'}. Reinstall acdc_viz, or rebuild it with "
            "scripts/."
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundledModelError(f"{path} is corrupt ({exc}); reinstall acdc_viz") from exc


def _check_file(name: str, path: Path, sha256: str) -> None:
    """Raise ``BundledModelError`` unless ``path`` exists and has the recorded hash."""
    if not path.is_file():
        raise BundledModelError(f"the file {path.name} of bundled model {name!r} is missing "
                                f"({path}); reinstall acdc_viz, or rebuild it with the script in "
                                "scripts/")
    if sha256_of(path) != sha256:
        raise BundledModelError(
            f"the file {path.name} of bundled model {name!r} ({path}) does not match its "
            "recorded sha256: the file is corrupt or was changed. Reinstall acdc_viz, or rebuild "
            "it with scripts/."
        )


def load_bundled(name: str, *, device: str | torch.device = "cpu",
                 directory: Path = BUNDLED_DIR) -> Any:
    """A bundled model as a TransformerLens 4 bridge, after checking its files' hashes."""
    meta = bundled_meta(name, directory)
    if meta.get("format") == "transformers":
        return _load_transformers(name, meta["sha256"], device, directory)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    weights = directory / f"{name}.safetensors"
    _check_file(name, weights, meta["sha256"])
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise BundledModelError(f"could not read {weights}: {exc}") from exc
    # boot_native is attached to the class when its sources load: invisible to the type checker
    boot_native = cast(Any, TransformerBridge).boot_native
    model = boot_native(TransformerBridgeConfig(**meta["config"]), device=device)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    model.eval()
    return model


def _load_transformers(name: str, hashes: dict[str, str], device: str | torch.device,
                       directory: Path) -> Any:
    """A bundled Hugging Face directory, checked file by file, through ``load_model``."""
    from transformers.utils import logging as hf_logging

    from acdc_viz.models.loading import load_model

    folder = directory / name
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    stray = sorted(present - set(hashes))
    if stray:
        raise BundledModelError(
            f"bundled model {name!r} ({folder}) holds files its JSON does not list: {stray}. "
            "Remove them, or reinstall acdc_viz."
        )
    for file, sha256 in sorted(hashes.items()):
        _check_file(name, folder / file, sha256)
    # transformers' per-load progress bar is noise for a model this small
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = load_model(folder, device=device)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    # named after the directory's path by boot_transformers: traces and titles would then carry
    # where the package happens to be installed
    model.cfg.model_name = name
    return model
