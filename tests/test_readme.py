"""Every command in the README still parses and composes.

Training runs themselves are covered by the other tests; here each `python
train.py` / `python eval.py` / `torchrun` line of the README is composed with
`--cfg job` (no training), so a renamed key, group or option fails here first.
Script lines are checked with `--help`.
"""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from tests.conftest import REPO, run_cli


def first_sweep_value(override: str) -> str:
    """`key=a,b` -> `key=a`, leaving commas inside [...] alone."""
    key, sep, value = override.partition("=")
    depth = 0
    for i, char in enumerate(value):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            return key + sep + value[:i]
    return override


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("python ", "torchrun ", "pip ", "TRAINER_DATA_DIR=")):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_two_fresh_machine_commands() -> None:
    assert any("pip install torch==2.13.0" in c and "python train.py" in c for c in COMMANDS)
    assert "TRAINER_DATA_DIR=../shared/data python -m pytest -q" in COMMANDS
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "torch==2.13.0" in ci


@pytest.mark.parametrize("command", [c for c in COMMANDS if "train.py" in c or "eval.py" in c])
def test_readme_training_command_composes(command: str, tmp_path) -> None:
    command = command.split("&&")[-1].strip()
    command = command.replace("<date>/<time>", "2026-01-01/00-00-00")
    args = shlex.split(command)
    script = next(a for a in args if a.endswith(("train.py", "eval.py")))
    overrides = args[args.index(script) + 1 :]
    if "-m" in overrides:
        # --cfg cannot be combined with -m: compose the sweep's first job instead.
        overrides = [first_sweep_value(o) for o in overrides if o != "-m"]
    done = run_cli([str(REPO / script), *overrides, "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert "error:" not in done.stderr


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python scripts/")])
def test_readme_script_runs(command: str, tmp_path) -> None:
    script = shlex.split(command)[1]
    done = run_cli([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
