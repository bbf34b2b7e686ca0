"""`acdc-viz run`: the main job, its summary line, its files, and its errors."""

from __future__ import annotations

import json

import pytest
from conftest import token_pairs

from acdc_viz.cli import main
from acdc_viz.data import TokenPairs, save_token_pairs
from acdc_viz.models.loading import build_tiny_gpt2
from acdc_viz.trace import load_trace


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default model is built in ~/.cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_default_run_writes_a_complete_trace(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["run", "--out", str(out), "--quiet"]) == 0      # the bundled induction task
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "edges tested 81" in line and "edges kept" in line
    assert "final metric" in line and " s;" in line
    trace = load_trace(out)
    assert trace.is_complete and trace.settings["model"]["name"] == "induction"
    assert trace.tokens[0] == "BOS"


def test_built_in_random_model(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["run", "--model", "tiny-gpt2", "--tau", "1e-5", "--out", str(out), "--quiet"]) == 0
    assert "edges tested 110" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["induction-gpt2", "tracr-reverse", "tracr-proportion"])
def test_every_bundled_task_runs_offline(task, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["run", "--task", task, "--out", str(out), "--quiet"]) == 0
    assert load_trace(out).is_complete


def test_tasks_and_roc(capsys):
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "tracr-reverse" in listing and "bundled" in listing and "32491" in listing
    assert main(["roc", "--task", "tracr-proportion", "--taus", "1e-4,1e-2,1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["edge_auc"] == 1.0 and len(result["points"]) == 3


def test_stop_and_resume_from_the_cli(tmp_path):
    out = tmp_path / "t.json"
    main(["run", "--out", str(out), "--quiet", "--max-steps", "7"])
    assert load_trace(out).resume_from == 7
    main(["run", "--out", str(out), "--quiet", "--resume", str(out)])
    full = tmp_path / "full.json"
    main(["run", "--out", str(full), "--quiet"])
    assert load_trace(out).canonical_json() == load_trace(full).canonical_json()


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_model_directory_and_data_file(tmp_path, suffix, capsys):
    model_dir = build_tiny_gpt2(tmp_path / "m", n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    data = save_token_pairs(TokenPairs(*token_pairs(batch=2, pos=3)), tmp_path / f"d{suffix}")
    out = tmp_path / "t.json"
    assert main(["run", "--model", str(model_dir), "--data", str(data), "--positions", "--ablation",
                 "zero", "--metric", "mse", "--tau", "1e-3", "--out", str(out), "--quiet"]) == 0
    trace = load_trace(out)
    assert trace.graph.n_positions == 3 and trace.settings["ablation"] == "zero"


def error_of(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_are_clear_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert "tau must be" in error_of(capsys, ["run", "--tau", "nan", "--out", str(out)])
    assert "unknown task" in error_of(capsys, ["run", "--task", "nope", "--out", str(out)])
    assert "--task brings" in error_of(capsys, ["run", "--task", "induction", "--data", "x.json"])
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"clean": [[1, 2, 3], [1, 2]], "corrupt": [[1, 2, 3], [1, 2]]}))
    assert "length" in error_of(capsys, ["run", "--model", "tiny-gpt2", "--data", str(ragged),
                                         "--positions", "--out", str(out)])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not safetensors")
    assert "garbage.safetensors" in error_of(capsys, ["run", "--model", "tiny-gpt2", "--data",
                                                      str(garbage), "--out", str(out)])
    truncated = tmp_path / "stopped.json"
    truncated.write_text('{"format_version": 1, "settings": {')
    assert "truncated" in error_of(capsys, ["run", "--resume", str(truncated), "--out", str(out)])
    assert "hub" in error_of(capsys, ["run", "--model", "gpt2", "--data", str(ragged),
                                      "--out", str(out)])
    assert not out.exists()


def test_sweep_writes_traces_and_a_summary_then_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--task", "tracr-proportion", "--taus", "1e-4,1e-2,1", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["tau"] for r in summary["runs"]] == [1e-4, 1e-2, 1.0]
    assert [r["kept_edges"] for r in summary["runs"]] == [5, 5, 0]
    assert summary["auc"][0]["edge_auc"] == 1.0 and summary["counts"]["done"] == 3
    assert json.loads((out / "summary.json").read_text())["runs"] == summary["runs"]
    for row in summary["runs"]:
        assert load_trace(out / row["trace"]).is_complete
    assert main(argv) == 0                                   # everything is there: nothing runs
    assert json.loads(capsys.readouterr().out)["counts"] == {"done": 0, "skipped": 3, "failed": 0}
    assert main([*argv, "--taus", "1e-4,1e-3", "--ablation", "zero,resample"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts == {"done": 3, "skipped": 1, "failed": 0}   # zero@1e-4 was there already


def test_sweep_with_a_failing_tau_exits_non_zero_and_keeps_the_rest(tmp_path, capsys, monkeypatch):
    import importlib

    sweep_module = importlib.import_module("acdc_viz.sweep")
    real = sweep_module.run_job

    def run_job(job, *args, **kwargs):
        if job.tau == 1e-2:
            raise RuntimeError("this tau is cursed")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_job", run_job)
    out = tmp_path / "sweep"
    assert main(["sweep", "--task", "tracr-proportion", "--taus", "1e-4,1e-2,1", "--out", str(out),
                 "--quiet"]) == 2
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert [r["status"] for r in summary["runs"]] == ["done", "failed", "done"]
    assert summary["runs"][1]["error"] == "RuntimeError: this tau is cursed"
    assert summary["runs"][1]["attempts"] == 2 and "cursed" in captured.err
    assert len(list(out.glob("*.json"))) == 3                 # two traces and the summary


def test_sweep_usage_errors(tmp_path, capsys):
    out = tmp_path / "s"
    assert "unknown task" in error_of(capsys, ["sweep", "--task", "nope", "--out", str(out)])
    assert "tau range" in error_of(capsys, ["sweep", "--task", "induction", "--taus", "1:0:3",
                                            "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["sweep", "--task", "induction", "--ablation", "blur", "--out", str(out)])
