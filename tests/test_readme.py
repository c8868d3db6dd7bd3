"""Every command in the README runs, as a user would paste it.

Each line of the README's ```bash blocks is one test case, picked up as it is
written: a command added later gets its own case, and one that no rule in RULES
covers fails `test_every_readme_command_has_a_rule`. A case runs the command in
its own temporary folder (the repo's scripts by absolute path, `python` as this
interpreter), shortened only by the arguments its rule appends at the end (Hydra
keeps the last value of a key), never by `--cfg`. Files the command reads that an
earlier README command would have written (`outputs/<date>/<time>/...`,
`outputs/mnist-cnn/...`, `multirun/<date>/<time>`) are copied in from tiny runs
of the README commands that write them (PROVIDERS), made once per session.
`python <script>` runs in a new process forked from one that has imported torch and the
package (tests/cli_runner.py): the same script, arguments, folder and environment, without
paying the interpreter's start-up for each of ~35 commands.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, require_data, run_cli
from tests.readme_commands import COMMANDS
from tests.tensorboard_server import served

# A run cut to one epoch of a few batches, whatever the command or its experiment set.
TINY = [
    "trainer=debug",
    "trainer.max_epochs=1",
    "trainer.max_steps=null",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.progress_bar=false",  # last: bench_readme's rule leaves it out
]
# Image runs: the tiny run's few batches, small (MNIST's are 256 and 1000 for evaluation).
SMALL_BATCHES = ["data.batch_size=32", "data.eval_batch_size=100"]
PLACEHOLDERS = {"<date>/<time>": "2026-01-01/00-00-00"}
LM_TINY = ["scheduler.warmup_steps=1", "data.val_windows=24", "trainer.val_every_n_steps=null"]
# The SmolLM2 recipes on a random llama of SmolLM2's architecture, tokenizer files and chat
# template (tests/models/test_smollm2.py runs the real model): two batches of two, one
# validation batch.
TINY_LLAMA = "{tiny_llama}"  # the `tiny_llama` fixture's folder
SMOLLM2_TINY = [
    f"model.name_or_path={TINY_LLAMA}",
    *TINY[:-1],
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "task.sample_tokens=8",
    TINY[-1],
]


def slurm_partition() -> str | None:
    """The first partition of a SLURM cluster this machine can submit to, if any."""
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = done.stdout.split() if done.returncode == 0 else []
    return names[0].rstrip("*") if names else None


@dataclass(frozen=True)
class Rule:
    """How to run the README commands that `pattern` matches (the first rule wins)."""

    pattern: str
    append: list[str] = field(default_factory=list)
    skip: str | None = None  # why this command is not run by the suite


# Order matters: the first matching rule applies.
RULES = [
    Rule(r"^pip install ", skip="installs packages: .ci/run does this on a fresh machine"),
    Rule(r"python -m pytest", skip="the test suite itself: .ci/run runs it"),
    Rule(r"^ruff ", skip=".ci/run runs it"),
    Rule(
        r"--nnodes=2",
        skip="2 nodes of 8 processes; tests/test_distributed.py runs this launch with two "
        "torchrun launchers on one machine",
    ),
    # Commands that a test of their own runs, through `readme_args`, with more checks.
    Rule(
        r"submitit_slurm .*(trainer=debug|run_id=preempted|run_id=timed_out)",
        skip="tests/test_slurm.py runs this line on the test cluster",
    ),
    Rule(
        r"^python train\.py -m trainer\.devices=2 optimizer\.lr=1e-3,1e-2$",
        skip="tests/test_distributed.py::test_ddp_inside_a_multirun_sweep runs it",
    ),
    Rule(
        r"^torchrun --standalone --nproc_per_node=2 train\.py$",
        skip="tests/test_distributed.py::test_torchrun_val_accuracy_equals_single_process_eval"
        " runs it",
    ),
    Rule(
        r"^python train\.py trainer\.devices=2$",
        skip="tests/test_distributed.py::test_two_ranks_match_one_process_with_double_batch "
        "runs it (in-process, as tests/test_launchers.py runs its own CLI runs of two ranks)",
    ),
    Rule(
        r"^python train\.py trainer\.devices=2 trainer\.strategy=fsdp$",
        skip="tests/test_distributed.py::test_fsdp_matches_one_process_and_its_checkpoint_loads_"
        "anywhere runs it (in-process)",
    ),
    Rule(
        r"^python train\.py -m hydra/launcher=submitit_local optimizer\.lr=1e-3,3e-3$",
        skip="tests/test_sweep.py::test_submitit_local_launcher_runs_two_jobs runs it",
    ),
    # SLURM lines run where a cluster answers (CPU only: no GPUs asked for, one device).
    Rule(
        r"hydra/launcher=submitit_slurm",
        append=[
            "hydra.launcher.partition={slurm_partition}",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.timeout_min=10",
            "trainer.devices=1",
            *TINY,
        ],
    ),
    Rule(r"hparams_search=", append=["hydra.sweeper.n_trials=2", *TINY]),
    # bench_overhead.py measures the Trainer with its progress bar: keep it on.
    Rule(r"scripts/bench_overhead\.py experiment=", append=["--rounds", "1", *TINY[:-1], *LM_TINY]),
    # The language-model recipes warm up for 100 steps: a tiny run warms up for one.
    Rule(r"experiment=shakespeare", append=[*TINY, *LM_TINY]),
    Rule(
        r"scripts/bench_finetune_lm\.py",
        skip="runs the three SmolLM2 recipes, which the three commands above run (shortened)",
    ),
    Rule(r"experiment=smollm2", append=SMOLLM2_TINY),
    Rule(
        r"scripts/bench_lm\.py",
        append=["--rows", "hand_fp32,trainer_fp32", "--steps", "1", "--model", TINY_LLAMA],
    ),
    Rule(r"^python generate\.py", append=["max_new_tokens=20"]),
    Rule(
        r"scripts/bench_generate\.py", append=["--rounds", "1", "--tokens", "20", "--sizes", "cpu"]
    ),
    Rule(r"scripts/bench_nanogpt\.py", append=[*TINY, *LM_TINY]),
    Rule(r"train\.py", append=[*SMALL_BATCHES, *TINY]),
    Rule(r"eval\.py", append=TINY),  # the checkpoint's data config, batch sizes included
    Rule(r"^tensorboard --logdir "),
    Rule(r"scripts/(sweep_report|export)\.py"),
    Rule(r"scripts/bench_accuracy\.py", append=[*SMALL_BATCHES, *TINY]),
    Rule(r"scripts/bench_overhead\.py", append=["--rounds", "1", "data.val_size=50000"]),
    Rule(r"scripts/bench_startup\.py", append=["--runs", "1"]),
    Rule(
        r"scripts/bench_readme\.py",
        # One accuracy row of the three: the others run the same script, bench_accuracy.py,
        # on other configs. bench_overhead.py measures the Trainer with its progress bar:
        # keep it on.
        append=[
            "--only",
            "mlp,overhead,startup",
            *["--rounds", "1", "--runs", "1", *SMALL_BATCHES, *TINY[:-1], "data.val_size=50000"],
        ],
    ),
]

# README paths to earlier runs, and the README command (script + arguments) that makes them.
PROVIDERS = {
    "outputs/<date>/<time>": ["train.py"],
    "outputs/mnist-mlp": ["train.py", "run_id=mnist-mlp"],
    "outputs/mnist-cnn": ["train.py", "model=cnn", "run_id=mnist-cnn"],
    "multirun/<date>/<time>": ["train.py", "-m", "optimizer.lr=1e-3,3e-3"],
    "outputs/shakespeare": [
        "train.py",
        "experiment=shakespeare_char_cpu",
        "run_id=shakespeare",
        *LM_TINY[:2],
    ],
}
RUN_PATH = re.compile(r"(?:^|[\s=])((?:outputs|multirun)/(?:<date>/<time>|[\w.-]+))")


def rule_for(command: str) -> Rule | None:
    return next((r for r in RULES if re.search(r.pattern, command)), None)


def test_readme_has_the_two_fresh_machine_commands() -> None:
    assert any("pip install torch==2.13.0" in c and "python train.py" in c for c in COMMANDS)
    assert "TRAINER_DATA_DIR=../shared/data python -m pytest -q -n auto" in COMMANDS
    ci = (REPO / ".ci" / "run").read_text()
    assert "\npython -m pytest -q -n auto\n" in ci and "torch==2.13.0" in ci


def test_every_readme_command_has_a_rule() -> None:
    assert len(COMMANDS) >= 20
    assert [c for c in COMMANDS if rule_for(c) is None] == [], "add a rule to RULES"
    for command in COMMANDS:
        for path in RUN_PATH.findall(command):
            assert path in PROVIDERS, f"add the README command that writes {path} to PROVIDERS"


def resolved(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


def argv(command: str) -> list[str]:
    """The command's words, run from any folder: python is this interpreter, the repo's
    scripts are named by absolute path, torchrun is torch's launcher module."""
    command = resolved(command)
    assert "<" not in command, f"a placeholder without a value in PLACEHOLDERS: {command}"
    words = shlex.split(command)
    launcher = {
        "python": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    }
    out = launcher.get(words[0], [words[0]])
    for word in words[1:]:
        out.append(str(REPO / word) if word.endswith(".py") and (REPO / word).is_file() else word)
    return out


@pytest.fixture(scope="session")
def provided(tmp_path_factory: pytest.TempPathFactory):
    """Makes each PROVIDERS run once (tiny), on first request; returns its folder."""
    made: dict[str, Path] = {}

    def get(path: str) -> Path:
        if path not in made:
            folder = tmp_path_factory.mktemp("readme-provided") / "run"
            script, *args = PROVIDERS[path]
            dir_key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
            small = [] if any("experiment=shakespeare" in a for a in args) else SMALL_BATCHES
            done = run_cli(
                [str(REPO / script), *args, *small, *TINY, f"{dir_key}={folder}"],
                cwd=folder.parent,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            made[path] = folder
        return made[path]

    return get


def results_files(folder: Path) -> set[Path]:
    return set(folder.glob("outputs/**/results.json")) | set(
        folder.glob("multirun/**/results.json")
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(
    command: str, tmp_path: Path, provided, request: pytest.FixtureRequest
) -> None:
    require_data()
    rule = rule_for(command)
    assert rule is not None, f"no rule in RULES for the README command: {command}"
    if rule.skip:
        pytest.skip(rule.skip)
    append = list(rule.append)
    if any("{slurm_partition}" in a for a in append):
        partition = slurm_partition()
        if partition is None:
            pytest.skip("needs a SLURM cluster (sinfo finds none here)")
        append = [a.replace("{slurm_partition}", partition) for a in append]
    if any(TINY_LLAMA in a for a in append):
        folder = str(request.getfixturevalue("tiny_llama"))
        append = [a.replace(TINY_LLAMA, folder) for a in append]
    cwd = tmp_path
    moved = re.match(r"cd (\S+) && (.*)", command)
    if moved:  # run from a folder of the repo (examples/...); the run folder stays here
        cwd, command = REPO / moved.group(1), moved.group(2)
        append.append(f"hydra.run.dir={tmp_path / 'outputs' / 'run'}")
    words = argv(command)
    needed = RUN_PATH.findall(command)
    if words[0] == "tensorboard" and not (tmp_path / words[words.index("--logdir") + 1]).exists():
        needed.append("outputs/<date>/<time>")  # `--logdir outputs`: a user's earlier run
    for path in needed:
        shutil.copytree(provided(path), tmp_path / resolved(path))
    before = results_files(tmp_path)
    if words[0] == "tensorboard":
        with served(words[1:], cwd=tmp_path) as tb:
            assert tb.wait_for(lambda: tb.runs()), "TensorBoard shows no run"
        return
    # `python <script>`: run_cli forks it from the preloaded server; the rest run as they are.
    python_script = words[0] == sys.executable and words[1].endswith(".py")
    done = run_cli([*(words[1:] if python_script else words), *append], cwd, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr and "\nerror:" not in "\n" + done.stderr
    if "bench_readme.py" in command:
        # The tables it prints are the README's: same headers, and a line saying where from.
        readme = (REPO / "README.md").read_text()
        printed = done.stdout.splitlines()
        assert printed[0].startswith("Measured ") and "commit `" in printed[0]
        headers = [line for line in printed if line.startswith(("| command |", "| benchmark |"))]
        assert len(headers) == 2 and all(h in readme for h in headers)
        assert len([line for line in printed if line.startswith("| `")]) == 3
    elif "eval.py" in command:
        (record,) = tmp_path.glob("outputs/*/*/eval_results.json")
        assert json.loads(record.read_text())["metrics"]["test/acc"] > 0.1
    elif "train.py" in command:
        made = results_files(tmp_path) - before
        assert made, "the command wrote no results.json"
        for path in made:
            assert json.loads(path.read_text())["status"] == "completed", path


def test_what_readme_commands_write_is_git_ignored() -> None:
    """Run folders, sweeps, downloaded data and the export example stay out of `git status`."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["outputs/a/results.json", "multirun/a/b/results.json", "data/MNIST/raw/x.gz"]
    paths += ["exported/model.yaml", "exported/model.safetensors"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == paths
