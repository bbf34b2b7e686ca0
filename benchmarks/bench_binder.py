"""What Binder would install, installed and run here: the environment's size and the quickstart's
peak memory, against mybinder.org's limits (2 GB of RAM at most).

Builds a fresh virtual environment (no system site packages) from ``binder/requirements.txt``,
with two changes that only make it installable on a machine without download.pytorch.org:

- the ``--extra-index-url https://download.pytorch.org/whl/cpu`` line is dropped, and
- ``torch==X`` becomes ``torch==X+cpu``: the very build that index serves Binder, found here
  among the local wheels (pip's ``find-links``). Where no such wheel exists, pip fails at once
  instead of downloading a CUDA build of several GB.

``.`` (the repository) becomes the repository's absolute path. Then it runs
``notebooks/01_quickstart.ipynb`` with that environment's own nbclient and ipykernel, from a
clean kernel, and reads the kernel's peak resident memory (``ru_maxrss``) from inside it.
Prints JSON.

    python benchmarks/bench_binder.py [--venv DIR] [--notebook notebooks/01_quickstart.ipynb]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "binder" / "requirements.txt"
QUICKSTART = REPO / "notebooks" / "01_quickstart.ipynb"
BINDER_RAM_MB = 2048
"""mybinder.org: 1 GB of RAM guaranteed, 2 GB at most."""

_PYTORCH_INDEX = re.compile(r"^\s*--(extra-)?index-url\s+https://download\.pytorch\.org/")
_TORCH_PIN = re.compile(r"^torch==([0-9][0-9.]*)\s*$")

# Appended to the notebook in memory: where the kernel ran, and its peak resident memory.
_PROBE = ("import json as _j, resource as _r, sys as _s\n"
          "print('BINDER_PROBE', _j.dumps({'prefix': _s.prefix,\n"
          "      'acdc_viz': getattr(_s.modules.get('acdc_viz'), '__file__', None),\n"
          "      'peak_rss_kb': _r.getrusage(_r.RUSAGE_SELF).ru_maxrss}))")

# Runs inside the new environment: executes the notebook, prints one JSON line.
_RUNNER = r"""
import json, sys, time
import nbformat
from nbclient import NotebookClient

nb = nbformat.read(sys.argv[1], as_version=4)
stored_with_outputs = any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
nb.cells.append(nbformat.v4.new_code_cell(sys.argv[2]))
start = time.perf_counter()
NotebookClient(nb, timeout=600, kernel_name="python3").execute()
seconds = time.perf_counter() - start
printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
probe = json.loads(printed.split("BINDER_PROBE", 1)[1].strip().splitlines()[0])
print(json.dumps({"seconds": seconds, "printed": printed, "probe": probe,
                  "stored_with_outputs": stored_with_outputs}))
"""


def binder_requirements(text: str, repo: Path = REPO) -> str:
    """``binder/requirements.txt`` as installable here (see the module docstring)."""
    out, pinned = [], False
    for line in text.splitlines():
        if _PYTORCH_INDEX.match(line):
            continue
        if line.strip() == ".":
            line = str(repo)
        match = _TORCH_PIN.match(line.strip())
        if match:
            line, pinned = f"torch=={match.group(1)}+cpu", True
        out.append(line)
    if not pinned:
        raise ValueError("binder/requirements.txt must pin torch exactly (torch==X.Y.Z), so that "
                         "the CPU build is what gets installed")
    return "\n".join(out) + "\n"


def _clean_env() -> dict[str, str]:
    """The environment for the new venv's processes: nothing leaks in from this one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def dir_size_mb(path: Path) -> float:
    """Bytes of the files under ``path`` (links not followed), in MB."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root, name)
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 2**20


def build_venv(venv: Path, requirements: str) -> dict:
    """Create ``venv`` and install ``requirements`` into it; what got installed."""
    env = _clean_env()
    req = venv.parent / f"{venv.name}-requirements.txt"
    req.write_text(requirements)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                          "-r", str(req)], check=False, env=env, capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip could not install binder/requirements.txt (as {req}):\n"
                           f"{pip.stdout[-3000:]}\n{pip.stderr[-5000:]}")
    seconds = time.perf_counter() - start
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format=json",
                              "--disable-pip-version-check"],
                             check=True, env=env, capture_output=True, text=True).stdout
    packages = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listing)}
    site = next((venv / "lib").glob("python3*/site-packages"))
    return {
        "install_seconds": round(seconds, 1),
        "packages": len(packages),
        "versions": {k: packages.get(k) for k in ("torch", "transformer-lens", "jupyterlab",
                                                   "ipykernel", "ipywidgets", "plotly",
                                                   "anywidget", "acdc-viz")},
        "nvidia_packages": sorted(k for k in packages if k.startswith(("nvidia", "triton"))),
        "venv_mb": round(dir_size_mb(venv)),
        "torch_mb": round(dir_size_mb(site / "torch")),
    }


def run_notebook(venv: Path, notebook: Path, workdir: Path) -> dict:
    """Execute ``notebook`` from a clean kernel of ``venv``; seconds, outputs, peak memory."""
    workdir.mkdir(parents=True, exist_ok=True)
    runner = workdir / "run_notebook.py"
    runner.write_text(_RUNNER)
    proc = subprocess.run([str(venv / "bin" / "python"), str(runner), str(notebook), _PROBE],
                          check=False, cwd=workdir, env=_clean_env(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{notebook.name} failed in the Binder environment:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    probe = result["probe"]
    return {
        "notebook": notebook.name,
        "seconds": round(result["seconds"], 1),
        "kernel_prefix": probe["prefix"],
        "kernel_acdc_viz": probe["acdc_viz"],
        "kernel_peak_rss_mb": round(probe["peak_rss_kb"] / 1024),
        "printed": result["printed"],
        "stored_with_outputs": result["stored_with_outputs"],
    }


def measure(venv: Path, notebook: Path = QUICKSTART) -> dict:
    """Build the Binder environment at ``venv`` (a fresh path) and run ``notebook`` in it."""
    if venv.exists():
        raise FileExistsError(f"{venv} exists: give a fresh path, so the environment is built anew")
    venv.parent.mkdir(parents=True, exist_ok=True)
    installed = build_venv(venv, binder_requirements(REQUIREMENTS.read_text()))
    ran = run_notebook(venv, notebook, venv.parent / f"{venv.name}-work")
    import torch  # only for the machine record

    return {
        "benchmark": "binder_environment",
        **installed,
        **ran,
        "binder_ram_limit_mb": BINDER_RAM_MB,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=None,
                        help="where to build the environment (a fresh path; default: a temporary "
                             "directory, removed afterwards)")
    parser.add_argument("--notebook", type=Path, default=QUICKSTART)
    args = parser.parse_args()
    tmp = None
    if args.venv is None:
        tmp = Path(tempfile.mkdtemp(prefix="acdc-binder-"))
        args.venv = tmp / "venv"
    try:
        result = measure(args.venv.resolve(), args.notebook.resolve())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.pop("printed")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
