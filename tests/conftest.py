"""Shared fixtures: the real datasets and configs composed through Hydra's compose API."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "PYTEST_XDIST_WORKER" in os.environ:
    # One torch thread per test worker (-n auto starts one per core): a full thread pool in
    # each would oversubscribe the cores, and spinning OpenMP threads then slow every run.
    # Set before torch is first imported, when OpenMP reads it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tests.cli_runner import run_python  # noqa: E402
from trainer.config.schema import register_configs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TRAINER_DATA_DIR") or REPO.parent / "shared" / "data").resolve()

register_configs()

# Under pytest-xdist (`--dist loadgroup`), a file with module fixtures runs on one worker,
# so they are made once; the other tests are handed out one by one, the slow ones first, so
# that the workers end together instead of one finishing a long test while the other idles.
MODULE_FIXTURE = 'scope="module"'


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    has_module_fixtures: dict[Path, bool] = {}
    for item in items:
        path = Path(item.fspath)
        if path not in has_module_fixtures:
            has_module_fixtures[path] = MODULE_FIXTURE in path.read_text()
        if has_module_fixtures[path]:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def require_data() -> Path:
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {DATA_DIR}; set TRAINER_DATA_DIR")
    return DATA_DIR


def compose_config(
    overrides: list[str], output_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose a real config; paths point at the shared data and a temp output dir."""
    base = [f"paths.data_dir={DATA_DIR}"]
    if output_dir is not None:
        base.append(f"paths.output_dir={output_dir}")
    with initialize_config_module("trainer.configs", version_base="1.3"):
        return compose(config_name, overrides=base + list(overrides))


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    require_data()

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config(list(overrides), output_dir or tmp_path / "run")

    return _make


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    env: dict | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run a command as a user would, with the data dir taken from the environment.

    A Python script runs in a process forked from one with torch and the package
    imported (tests/cli_runner.py); `fresh=True` starts a new interpreter instead."""
    # The test's own HYDRA_FULL_ERROR counts; the one the suite may run under does not.
    inherited = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env = {**inherited, "TRAINER_DATA_DIR": str(DATA_DIR), **(env or {})}
    if args[0].endswith(".py") and not fresh:
        return run_python(args[0], args[1:], cwd, full_env, timeout)
    return subprocess.run(
        [sys.executable, *args] if args[0].endswith(".py") else args,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class _FullDiskFile:
    """A file on a disk that fills up after 4 KiB: writes fail like a real one's (ENOSPC)."""

    def __init__(self, file: Any) -> None:
        self.file, self.written = file, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it, and every checkpoint write from then on runs out of space mid-file."""
    from trainer.checkpoint import io as checkpoint

    recording_init = checkpoint._RecordingWriter.__init__

    def fill() -> None:
        monkeypatch.setattr(
            checkpoint._RecordingWriter,
            "__init__",
            lambda self, file: recording_init(self, _FullDiskFile(file)),
        )

    return fill


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LlamaForCausalLM folder with a BPE tokenizer and chat template."""
    pytest.importorskip("transformers")
    from trainer.models.tiny_llama import build_tiny_llama

    text = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text()[:20000]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), text)
