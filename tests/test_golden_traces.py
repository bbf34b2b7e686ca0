"""Refactors keep the engine's output byte for byte: every bundled task's trace, with and without
the position split, equals the one committed in ``tests/golden/`` (timings and package versions
aside).

Regenerate only on a deliberate change of the engine's results, and say why in the commit:

    python tests/test_golden_traces.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
TASKS = ("induction", "induction-gpt2", "tracr-proportion", "tracr-reverse")
PROMPTS = 6


def _trace_text(task_name: str, positions: bool) -> str:
    from acdc_viz import Acdc
    from acdc_viz.tasks import get_task

    task = get_task(task_name)
    model = task.load_model("cpu")
    pairs = task.make_pairs(PROMPTS, 0)
    metric = task.default_metric
    acdc = Acdc(
        model,
        pairs,
        tau=task.default_tau,
        metric=task.metrics[metric](pairs) if metric in task.metrics else metric,
        ablation=task.default_ablation,
        positions=positions,
        dtype=torch.float64,
        model_name=task_name,
        tokens=task.token_labels(pairs) if task.token_labels else None,
    )
    data = acdc.run().canonical_dict()
    del data["settings"]["versions"]
    return json.dumps(data, indent=0, sort_keys=True) + "\n"


def _path(task_name: str, positions: bool) -> Path:
    return GOLDEN / f"{task_name}{'-positions' if positions else ''}.json"


@pytest.mark.parametrize("positions", [False, True], ids=["plain", "positions"])
@pytest.mark.parametrize("task_name", TASKS)
def test_trace_is_byte_identical_to_golden(task_name: str, positions: bool) -> None:
    expected = _path(task_name, positions).read_text()
    assert _trace_text(task_name, positions) == expected


if __name__ == "__main__":
    torch.set_num_threads(1)
    GOLDEN.mkdir(exist_ok=True)
    for name in TASKS:
        for pos in (False, True):
            _path(name, pos).write_text(_trace_text(name, pos))
            print("wrote", _path(name, pos))
