"""The notebooks run top to bottom from a clean kernel, as a reader would run them.

Offline notebooks must run to the end; a notebook that needs the Hugging Face hub must stop at its
first cell with a message saying so (CI has no hub: HF_HUB_OFFLINE and an empty cache make that
certain here too). The kernel imports acdc_viz from this checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

#: Offline notebooks, and what each must print.
OFFLINE = {
    "01_quickstart.ipynb": ["edges tested", "(cached)", "canonical edges kept",
                            "induction-llama: 15 of 82 edges kept, 15 / 15 canonical"],
    "02_ground_truth_tracr.ipynb": [
        "BOS 3 1 2  ->   2 1 3",
        "77 edges; canonical 10, ACDC kept 10, both 10: the same circuit",
        "tracr-reverse: edge AUC 1.000, node AUC 1.000",
        "tracr-proportion: edge AUC 1.000, node AUC 1.000",
        "tracr-reverse, resample ablation: edge AUC 0.600",
    ],
    "04_your_own_model.ipynb": [
        "TransformerBridge 2 layers x 2 heads",
        "the model copies the first letter in 100% of prompts",
        "368 edges tested",
        "wrote exports/copy-first.html",
        "wrote exports/copy-first-step10.html",
        "wrote exports/copy-first.trace.json",
        "46 edges scored",
    ],
}
#: Notebooks that need the hub, and the exception their first cell raises without it.
HUB = {"03_ioi_gpt2.ipynb": "NeedsTheHub"}

PLOTLY = "application/vnd.plotly.v1+json"


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this environment: this checkout first on its path, and no hub."""
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_every_notebook_is_tested():
    """The numbered notebooks are the tutorials; each is either run or checked for its message."""
    assert sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == sorted([*OFFLINE, *HUB])


@pytest.mark.parametrize("name", sorted([*OFFLINE, *HUB]))
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{name} is stored with outputs: clear them (Edit > Clear Outputs of All Cells)"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_notebook_runs(name, tmp_path, kernel_env):
    nb = execute(name, tmp_path)
    text = printed(nb)
    for expected in OFFLINE[name]:
        assert expected in text, f"{name} did not print {expected!r}"
    if name == "02_ground_truth_tracr.ipynb":         # the circuit, the sweep and the ROC
        figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if PLOTLY in o.get("data", {})]
        assert len(figures) == 3
    if name == "04_your_own_model.ipynb":
        from acdc_viz.export import find_browser

        exports = tmp_path / "exports"
        assert (exports / "copy-first.trace.json").stat().st_size > 0
        if find_browser() is not None:               # CI installs chromium (make browser)
            assert "wrote exports/copy-first.png" in text
            assert (exports / "copy-first.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert "no PNG:" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_notebook_stops_cleanly_offline(name, tmp_path, kernel_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    with pytest.raises(CellExecutionError) as info:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert info.value.ename == HUB[name]
    assert "needs the Hugging Face hub" in info.value.evalue
    code = [c for c in nb.cells if c.cell_type == "code"]
    error = code[0].outputs[-1]
    assert error.output_type == "error"
    assert len(error.traceback) == 1, "the reader sees the message, not a traceback"
    assert all(not c.outputs for c in code[1:]), "nothing runs after the first cell"
