"""Small models shipped inside the package, as safetensors plus a JSON config with its hash.

Each bundled model is a TransformerLens 4 native bridge (``TransformerBridge.boot_native``)
described by ``bundled/{name}.json`` (``{"config": TransformerBridgeConfig kwargs, "sha256": ...,
"build": how it was made}``) and its weights ``bundled/{name}.safetensors``. The hash is checked at
every load, so a truncated or edited file fails loudly instead of giving a wrong circuit.
Build scripts live in ``scripts/``; each documents its seed and how long it takes.
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
    meta = {"config": config, "sha256": sha256_of(weights), "build": build}
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return weights


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


def load_bundled(name: str, *, device: str | torch.device = "cpu",
                 directory: Path = BUNDLED_DIR) -> Any:
    """A bundled model as a TransformerLens 4 bridge, after checking its weights' hash."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    meta = bundled_meta(name, directory)
    weights = directory / f"{name}.safetensors"
    if not weights.exists():
        raise BundledModelError(f"the weights of bundled model {name!r} are missing ({weights}); "
                                "reinstall acdc_viz, or rebuild them with the script in scripts/")
    if sha256_of(weights) != meta["sha256"]:
        raise BundledModelError(
            f"the weights of bundled model {name!r} ({weights}) do not match their recorded "
            "sha256: the file is corrupt or was changed. Reinstall acdc_viz, or rebuild them with "
            "scripts/."
        )
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
