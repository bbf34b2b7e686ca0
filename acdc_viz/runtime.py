"""Where acdc_viz runs: package versions, the machine, a model's device and display name, and
torch's thread count changed only inside a ``with`` block.

One home for these facts, so that traces, sweep summaries, benchmarks and ``acdc-viz
--version`` report them the same way.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from acdc_viz.errors import SettingsError


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (``acdc_viz`` or ``acdc-viz``), or None."""
    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def package_versions(packages: tuple[str, ...] = ("acdc_viz", "torch", "transformer_lens"),
                     ) -> dict[str, str | None]:
    """``{package: version or None}`` for each of ``packages``."""
    return {p: package_version(p) for p in packages}


def machine_info() -> dict[str, Any]:
    """Where a sweep or a benchmark ran (recorded in summaries and benchmark output)."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": package_versions(("acdc_viz", "torch", "ray"))}


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter; CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def display_name(model: Any, name: str | None = None) -> str:
    """How traces and the widget name a model: ``name``, else its config's ``model_name``."""
    return name or getattr(getattr(model, "cfg", None), "model_name", None) or "model"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged), then restored.

    CPU results depend on the thread count in their last bits (the order of a reduction), so
    runs with the same thread count give bit-identical traces, and runs with different counts
    agree to about 1e-9 (relative) in their metrics.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: CUDA when available for None; an error for CUDA without it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {str(device)!r} was asked for, but CUDA is not available "
                            "here; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``"float32"``, ``"bfloat16"``, ...) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def run_versions() -> dict[str, str]:
    """The versions a trace records: Python, acdc_viz, torch and TransformerLens."""
    versions = {"python": platform.python_version()}
    versions.update({p: v or "unknown" for p, v in package_versions().items()})
    return versions
