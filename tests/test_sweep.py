"""Tau sweeps: the local executor, Ray on a local cluster, retries, resume and the summary."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from acdc_viz import Acdc, load_trace, sweep
from acdc_viz.errors import SettingsError
from acdc_viz.runtime import torch_threads
from acdc_viz.sweep import MAX_ATTEMPTS, SUMMARY_FILE, SweepError, SweepJob
from acdc_viz.tasks import get_task

TASK = "tracr-proportion"          # 23 edges, runs in milliseconds
TAUS = [1e-4, 1e-2, 1e-1, 1.0]     # canonical circuit kept at the first two, then less, then none
RAY_TASK = "tracr-reverse"         # 77 edges: enough work per run for Ray to interleave them
QUIET = {"progress": False, "num_cpus": 1}
"""One torch thread per run: fast on a busy 2-core machine, and the same as ``single_run``."""


def single_run(task_name, tau):
    """What one run on its own gives, for comparison with a sweep's trace."""
    task = get_task(task_name)
    pairs = task.make_pairs(task.default_prompts, 0)
    metric = task.metrics[task.default_metric](pairs)
    assert task.token_labels is not None
    with torch_threads(1):
        return Acdc(task.load_model("cpu"), pairs, tau=tau, metric=metric,
                    ablation=task.default_ablation, model_name=task.name,
                    tokens=task.token_labels(pairs)).run()


def canonical(trace):
    return trace.canonical_json()


# ----- local ------------------------------------------------------------------------------------


def test_local_sweep_gives_the_traces_of_single_runs():
    result = sweep(TASK, list(reversed(TAUS)), **QUIET)
    assert result.ok and [r.job.tau for r in result.runs] == TAUS        # sorted, one per tau
    assert all(r.status == "done" and r.attempts == 1 and r.errors == () for r in result.runs)
    for run in result.runs:
        assert canonical(run.trace) == canonical(single_run(TASK, run.job.tau))
    assert [r.kept_edges for r in result.runs] == [5, 5, 1, 0]


def test_summary_json_and_auc(tmp_path):
    """summary.json holds one row per run, the AUCs against the canonical circuit and the
    machine."""
    result = sweep(TASK, "1e-4,1e-2,1e-1,1", out_dir=tmp_path, **QUIET)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert SUMMARY_FILE in files and len(files) == len(TAUS) + 1
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["executor"] == "local" and summary["format_version"] == 1
    assert summary["complete"] and summary["counts"] == {"done": 4, "skipped": 0, "failed": 0}
    row = summary["runs"][0]
    assert row["tau"] == 1e-4 and row["kept_edges"] == 5 and row["edges"] == 23
    assert row["final_metric"] == pytest.approx(result.runs[0].final_metric)
    assert row["status"] == "done" and row["error"] is None and row["seconds"] >= 0
    assert load_trace(tmp_path / row["trace"]).is_complete
    (auc,) = summary["auc"]
    assert auc["edge_auc"] == 1.0 and auc["node_auc"] == 1.0     # the paper's Table 3
    assert auc["taus"] == 4
    assert summary["machine"]["cpus"] >= 1


def test_file_names_are_stable_and_safe():
    job = SweepJob("my task/1", 1e-05, "kl_repeated", "resample", positions=True)
    assert job.file_name == "my_task_1-kl_repeated-resample-pos-tau1e-05.json"
    assert SweepJob("t", 0.1 + 0.2, "kl", "zero").file_name.endswith("tau0.30000000000000004.json")


def test_resume_after_an_interrupted_sweep(tmp_path):
    """An interrupted sweep leaves complete traces and a summary; the next one skips those
    runs and gives the traces of a fresh sweep."""
    def interrupt_third(job, attempt):
        if job.tau == TAUS[2]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(TASK, TAUS, out_dir=tmp_path, **QUIET, before_job=interrupt_third)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["interrupted"] and not summary["complete"]
    assert [r["tau"] for r in summary["runs"]] == TAUS[:2]
    assert not list(tmp_path.glob(".*.tmp"))                      # nothing half-written

    seen = []
    result = sweep(TASK, TAUS, out_dir=tmp_path, **QUIET, on_result=seen.append,
                   before_job=lambda job, attempt: None)
    assert [r.status for r in result.runs] == ["skipped", "skipped", "done", "done"]
    assert [r.status for r in seen] == ["skipped", "skipped", "done", "done"]   # skipped ones first
    fresh = sweep(TASK, TAUS, **QUIET)
    assert [canonical(r.trace) for r in result.runs] == [canonical(r.trace) for r in fresh.runs]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["complete"]


def test_a_corrupt_or_foreign_trace_is_run_again(tmp_path):
    """A cut-off trace, or one recorded with other prompts, is run again instead of skipped."""
    sweep(TASK, TAUS[:3], out_dir=tmp_path, **QUIET)
    runs = sweep(TASK, TAUS[:3], out_dir=tmp_path, **QUIET).runs
    files = {r.job.tau: r.path for r in runs if r.path is not None}
    text = files[TAUS[0]].read_text()
    files[TAUS[0]].write_text(text[: len(text) // 2])                   # cut off
    other = sweep(TASK, [TAUS[1]], prompts=10, **QUIET).runs[0].trace  # other prompts
    assert other is not None
    from acdc_viz.trace import save_trace

    save_trace(other, files[TAUS[1]])
    result = sweep(TASK, TAUS[:3], out_dir=tmp_path, **QUIET)
    assert [r.status for r in result.runs] == ["done", "done", "skipped"]
    assert load_trace(files[TAUS[0]]).is_complete
    assert sweep(TASK, TAUS[:3], out_dir=tmp_path, **QUIET, resume=False).runs[2].status == "done"


def test_a_failing_run_is_retried_once_then_reported(tmp_path):
    """A run that fails once succeeds on its retry; one that fails twice is reported, and
    the others still finish."""
    marker = tmp_path / "failed-once"

    def flaky(job, attempt):
        if job.tau == TAUS[0] and not marker.exists():
            marker.touch()
            raise RuntimeError("transient trouble")
        if job.tau == TAUS[1]:
            raise RuntimeError(f"always broken (attempt {attempt})")

    result = sweep(TASK, TAUS, out_dir=tmp_path / "out", **QUIET, before_job=flaky)
    first, broken, *rest = result.runs
    assert first.status == "done" and first.attempts == 2
    assert first.errors == ("RuntimeError: transient trouble",)
    assert broken.status == "failed" and broken.trace is None and broken.attempts == MAX_ATTEMPTS
    assert broken.error == "RuntimeError: always broken (attempt 2)" and len(broken.errors) == 2
    assert all(r.status == "done" for r in rest) and not result.ok
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["counts"]["failed"] == 1
    assert summary["runs"][1]["error"].startswith("RuntimeError")
    assert not (tmp_path / "out" / broken.job.file_name).exists()
    with pytest.raises(SweepError, match="always broken"):
        result.raise_for_failures()


def test_bad_settings_fail_before_anything_runs(gpt2):
    """Invalid settings raise SettingsError before any run starts."""
    from conftest import token_pairs

    with pytest.raises(SettingsError, match="executor"):
        sweep(TASK, TAUS, executor="threads", progress=False)
    with pytest.raises(SettingsError, match="ablation"):
        sweep(TASK, TAUS, ablation="blur", progress=False)
    with pytest.raises(SettingsError, match="metric"):
        sweep(TASK, TAUS, metric="accuracy", progress=False)
    with pytest.raises(SettingsError, match="tau"):
        sweep(TASK, [1e-3, float("nan")], progress=False)
    with pytest.raises(SettingsError, match="test_mode"):
        sweep(TASK, TAUS, executor="ray", test_mode=True, progress=False)
    with pytest.raises(SettingsError, match="pairs"):
        sweep(gpt2, TAUS, progress=False)
    with pytest.raises(SettingsError, match="own prompts"):
        sweep(TASK, TAUS, token_pairs(), progress=False)


def test_a_model_with_several_metrics_and_ablations(gpt2):
    from conftest import token_pairs

    pairs = token_pairs()
    result = sweep(gpt2, [1e-3, 1e-2], pairs, metric=["kl", "mse"], ablation=["resample", "zero"],
                   model_name="tiny", **QUIET)
    assert len(result.runs) == 8 and result.ok
    assert [(r.job.metric, r.job.ablation) for r in result.runs[::2]] == [
        ("kl", "resample"), ("kl", "zero"), ("mse", "resample"), ("mse", "zero")]
    run = result.runs[7]                                         # mse, zero, 1e-2
    with torch_threads(1):
        alone = Acdc(gpt2, pairs, tau=1e-2, metric="mse", ablation="zero", model_name="tiny").run()
    assert canonical(run.trace) == canonical(alone)
    assert result.canonical == {} and result.summary()["auc"] == []


def test_num_cpus_sets_torch_threads_for_local_runs_only_while_they_run(monkeypatch):
    import torch

    module = importlib.import_module("acdc_viz.sweep")
    real, inside = module.run_job, []
    monkeypatch.setattr(module, "run_job",
                        lambda *a, **k: inside.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    sweep(TASK, TAUS[:2], num_cpus=1, progress=False)
    assert inside == [1, 1] and torch.get_num_threads() == before
    sweep(TASK, TAUS[:1], progress=False)
    assert inside[-1] == before                      # by default, torch's setting is left alone


def test_cancel_stops_the_sweep():
    cancel = threading.Event()
    result = sweep(TASK, TAUS, **QUIET, cancel=cancel,
                   on_result=lambda run: cancel.set())
    assert result.cancelled and not result.ok and len(result.runs) == 1


def test_importing_acdc_viz_never_imports_ray():
    code = ("import sys, acdc_viz, acdc_viz.sweep, acdc_viz.cli; "
            "assert callable(acdc_viz.sweep); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_the_sweep_module_and_function_coexist():
    module = importlib.import_module("acdc_viz.sweep")
    assert module.sweep is sweep and callable(sweep)


# ----- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'acdc_viz[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_traces():
    # One torch thread, as in each Ray task: CPU results depend on the thread count in their
    # last bits, so equal counts are what makes the traces bit-identical.
    result = sweep(RAY_TASK, TAUS, **QUIET)
    return {r.job.tau: canonical(r.trace) for r in result.runs}


@pytest.mark.slow
def test_ray_gives_the_local_traces_and_puts_the_inputs_once(ray_cluster, local_traces,
                                                            monkeypatch):
    puts = []
    real_put = ray_cluster.put
    monkeypatch.setattr(ray_cluster, "put",
                        lambda value, **kw: puts.append(value) or real_put(value, **kw))
    order = []
    result = sweep(RAY_TASK, TAUS, executor="ray", progress=False, on_result=order.append)
    assert len(puts) == 1                              # one model and its prompts, for four tasks
    assert result.ok and result.executor == "ray"
    assert {r.job.tau: canonical(r.trace) for r in result.runs} == local_traces
    assert sorted(r.job.tau for r in order) == TAUS and all(r.attempts == 1 for r in result.runs)


@pytest.mark.slow
def test_ray_worker_killed_mid_sweep_is_retried(ray_cluster, local_traces, tmp_path):
    """A Ray worker that dies mid-run is retried once, and the sweep's traces are the
    local ones."""
    marker = str(tmp_path / "killed")
    victim = TAUS[1]

    def kill_worker_once(job, attempt):
        if job.tau == victim and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)                                # the worker process dies, as in an OOM kill

    result = sweep(RAY_TASK, TAUS, executor="ray", progress=False, before_job=kill_worker_once,
                   out_dir=tmp_path / "out")
    assert os.path.exists(marker) and result.ok
    runs = {r.job.tau: r for r in result.runs}
    assert runs[victim].attempts == 2 and len(runs[victim].errors) == 1
    assert "died" in runs[victim].errors[0].lower() or "crash" in runs[victim].errors[0].lower()
    assert all(runs[t].attempts == 1 for t in TAUS if t != victim)
    assert {t: canonical(r.trace) for t, r in runs.items()} == local_traces
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["complete"] and summary["runs"][1]["attempts"] == 2


@pytest.mark.slow
def test_ray_failure_is_reported_after_one_retry(ray_cluster):
    def broken(job, attempt):
        if job.tau == TAUS[-1]:
            raise ValueError(f"no luck at attempt {attempt}")

    result = sweep(TASK, TAUS, executor="ray", progress=False, before_job=broken)
    *good, bad = result.runs
    assert all(r.status == "done" for r in good)
    assert bad.status == "failed" and bad.attempts == 2
    assert bad.error == "ValueError: no luck at attempt 2"


@pytest.mark.slow
def test_cli_sweep_on_ray(ray_cluster, tmp_path, capsys):
    from acdc_viz.cli import main

    out = tmp_path / "s"
    assert main(["sweep", "--task", TASK, "--taus", "1e-4,1", "--executor", "ray",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["executor"] == "ray" and summary["counts"]["done"] == 2
