"""Whatever Binder would install, installed and run: binder/requirements.txt in a fresh virtual
environment, and the quickstart executed in it (benchmarks/bench_binder.py does the work).

Slow (a full pip install): `make test-binder` runs it, and `make test` calls that.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_binder.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_binder", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_requirements_keep_the_cpu_index_and_the_repo():
    """Binder itself needs the PyTorch CPU index line; the test replaces it, it never goes away."""
    lines = [line.strip() for line in bench.REQUIREMENTS.read_text().splitlines()]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert lines.index("--extra-index-url https://download.pytorch.org/whl/cpu") < next(
        i for i, line in enumerate(lines) if line.startswith("torch=="))
    assert "." in lines


def test_requirements_as_installed_here(tmp_path):
    text = bench.binder_requirements("--extra-index-url https://download.pytorch.org/whl/cpu\n"
                                     "torch==2.13.0\n.\njupyterlab>=4.2\n", repo=tmp_path)
    assert text.splitlines() == ["torch==2.13.0+cpu", str(tmp_path), "jupyterlab>=4.2"]
    with pytest.raises(ValueError, match="pin torch exactly"):
        bench.binder_requirements("torch>=2\n.\n")


@pytest.mark.slow
@pytest.mark.binder
def test_binder_environment_runs_the_quickstart(tmp_path):
    venv = tmp_path / "venv"
    try:
        result = bench.measure(venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)           # 1.7 GB: pytest keeps its tmp dirs
    printed = result.pop("printed")
    (tmp_path / "binder.json").write_text(json.dumps(result, indent=1))
    print("\nbinder environment:", json.dumps(result, indent=1))

    assert result["nvidia_packages"] == [], "a CUDA build of torch was installed"
    assert result["versions"]["torch"].endswith("+cpu")
    assert result["versions"]["acdc-viz"] and result["versions"]["ipykernel"]
    assert Path(result["kernel_prefix"]).resolve() == venv.resolve(), \
        "the quickstart ran outside the Binder environment"
    assert Path(result["kernel_acdc_viz"]).resolve().is_relative_to(venv.resolve()), \
        "the quickstart imported acdc_viz from outside the Binder environment"
    assert not result["stored_with_outputs"]
    assert "edges tested" in printed and "(cached)" in printed and "canonical edges kept" in printed
    assert result["kernel_peak_rss_mb"] < bench.BINDER_RAM_MB
