"""The CLI's surface (issue 6, part 5): complete help, --version, exit codes, stdout against
stderr."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acdc_viz import cli
from acdc_viz.cli import EXIT_CODES, EXIT_ERROR, EXIT_INTERRUPTED, main
from acdc_viz.cli_parser import build_parser
from acdc_viz.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]


def acdc_viz(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as a user runs it, in its own process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HOME=str(cwd / "home"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "acdc_viz", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def test_every_command_and_option_is_explained():
    parser = build_parser()
    top = parser.format_help()
    commands = subcommands()
    assert {"run", "render", "roc", "tasks", "app", "demo"} <= set(commands)
    for name, sub in commands.items():
        assert name in top, f"`acdc-viz --help` does not list {name}"
        assert sub.description, f"`acdc-viz {name} --help` has no description"
        assert "examples:" in (sub.epilog or "") and f"acdc-viz {name}" in sub.epilog, \
            f"`acdc-viz {name} --help` shows no example"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = action.option_strings or [action.dest]
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 8, \
                f"acdc-viz {name} {what[0]} has no help text"
    for code, meaning in EXIT_CODES.items():
        assert f"  {code:<4} {meaning}" in top


def exit_status(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_help_and_version(tmp_path, capsys):
    result = acdc_viz("--help", cwd=tmp_path)
    assert result.returncode == 0 and "exit status:" in result.stdout and result.stderr == ""
    for name in subcommands():
        code, out, _err = exit_status(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: acdc-viz {name}")
    version = acdc_viz("--version", cwd=tmp_path)
    from acdc_viz import __version__

    assert version.returncode == 0
    assert version.stdout.startswith(f"acdc-viz {__version__} (torch ")
    assert "transformer-lens" in version.stdout


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["run", "--tau"],
                                  ["run", "--ablation", "sideways"], ["app", "--port", "eighty"]])
def test_usage_errors_exit_2_on_stderr(args, capsys):
    code, out, err = exit_status(capsys, *args)
    assert code == EXIT_ERROR and out == "" and "usage: acdc-viz" in err


@pytest.mark.slow
def test_results_on_stdout_progress_on_stderr(tmp_path):
    run = acdc_viz("run", "--task", "induction", "--out", "t.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and run.stdout.startswith("edges tested 81,"), run.stdout
    assert "81/81" in run.stderr                                  # the progress bar
    render = acdc_viz("render", "t.json", "--out", "c.html", cwd=tmp_path)
    assert render.returncode == 0 and render.stdout == "wrote c.html\n"
    roc = acdc_viz("roc", "--task", "tracr-proportion", "--taus", "1e-4,1e-2,1", cwd=tmp_path)
    assert roc.returncode == 0, roc.stderr
    assert json.loads(roc.stdout)["edge_auc"] == 1.0               # stdout is only the JSON
    assert "3/3" in roc.stderr
    bad = acdc_viz("render", "missing.json", "--out", "c.html", cwd=tmp_path, timeout=60)
    assert bad.returncode == EXIT_ERROR and bad.stdout == "" and "missing.json" in bad.stderr


def test_ctrl_c_saves_a_resumable_trace_and_exits_130(tmp_path, monkeypatch, capsys):
    from acdc_viz.acdc import Acdc

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    steps = Acdc.steps

    def interrupted(self):
        for i, step in enumerate(steps(self)):
            yield step
            if i == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr(Acdc, "steps", interrupted)
    out = tmp_path / "t.json"
    assert main(["run", "--out", str(out), "--quiet"]) == EXIT_INTERRUPTED
    assert load_trace(out).resume_from == 5
    assert "resume with --resume" in capsys.readouterr().out

    def ctrl_c(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_tasks", ctrl_c)
    assert main(["tasks"]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("code", sorted(EXIT_CODES))
def test_exit_codes_are_documented_in_the_readme(code):
    readme = (ROOT / "README.md").read_text()
    assert f"| {code} | {EXIT_CODES[code]} |" in readme, \
        f"README.md's exit-status table lacks: | {code} | {EXIT_CODES[code]} |"
