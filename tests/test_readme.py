"""Every command in README.md runs, verbatim (issue 6, part 5).

The README's ``bash`` and ``python`` code blocks run in order, in one temporary folder, as a reader
would type them: a later command may use a file an earlier one wrote. Left out:

- a ``bash`` line marked ``# long-running`` (the set-up commands, servers);
- a block right after an HTML comment ``<!-- readme-test: skip (why) -->`` (placeholders).

``acdc-viz`` and ``python`` resolve to this interpreter and this checkout, whatever is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LONG_RUNNING = "# long-running"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b.*?-->\s*$", re.DOTALL)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int          # where the block starts in README.md
    skipped: bool


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        found.append(Block(match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1,
                           bool(SKIP.search(before[-300:]))))
    return found


def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def runnable(text: str) -> list[tuple[str, str, int]]:
    """(language, code, README line) of everything the test runs."""
    todo = []
    for block in blocks(text):
        if block.skipped or block.language not in ("bash", "python"):
            continue
        if block.language == "python":
            todo.append(("python", block.code, block.line))
        else:
            todo.extend(("bash", c, block.line) for c in commands(block.code)
                        if LONG_RUNNING not in c)
    return todo


def test_the_parser_finds_the_marks():
    text = ("```bash\nacdc-viz tasks   # list\nmake demo   # long-running: set up\n"
            "acdc-viz run \\\n  --out t.json\n```\n\n<!-- readme-test: skip (placeholders) -->\n"
            "```bash\nacdc-viz run --model DIR\n```\n\n```text\nnot a command\n```\n"
            "```python\nprint(1)\n```\n")
    assert [(lang, code) for lang, code, _ in runnable(text)] == [
        ("bash", "acdc-viz tasks   # list"), ("bash", "acdc-viz run --out t.json"),
        ("python", "print(1)\n")]


@pytest.fixture
def shell(tmp_path):
    """A PATH where ``acdc-viz`` and ``python`` are this interpreter and this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("acdc-viz", f'"{sys.executable}" -m acdc_viz'),
                         ("python", f'"{sys.executable}"')):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        script.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return work, env


@pytest.mark.slow
def test_every_readme_command_runs(shell):
    work, env = shell
    todo = runnable(README.read_text())
    ran = [code for _lang, code, _line in todo]
    # the main job, headless, and each CLI command the issue names are among them
    for needed in ("acdc-viz demo --headless", "acdc-viz run ", "acdc-viz render ", "acdc-viz roc ",
                   "acdc-viz tasks"):
        assert any(code.startswith(needed) for code in ran), f"README runs no `{needed}`"
    for language, code, line in todo:
        argv = (["bash", "-euo", "pipefail", "-c", code] if language == "bash"
                else [sys.executable, "-c", code])
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, (f"README.md line {line}: `{code.strip()}` exited with "
                                        f"{result.returncode}\nstdout:\n{result.stdout[-2000:]}\n"
                                        f"stderr:\n{result.stderr[-3000:]}")
    assert (work / "trace.json").exists() and (work / "circuit.html").exists()  # headless demo
    assert (work / "run.json").exists()                                         # Python example


def test_every_long_running_command_is_a_known_kind():
    """Marks are for set-up and servers only, so that nothing quick escapes the test by accident."""
    marked = [c for b in blocks(README.read_text()) if b.language == "bash" and not b.skipped
              for c in commands(b.code) if LONG_RUNNING in c]
    assert marked, "README.md marks no long-running command"
    for code in marked:
        assert code.startswith(("make ", "acdc-viz app", "voila ", "jupyter ")), code
