"""Fixtures shared by the data tests."""

from pathlib import Path

import pytest

from tests.conftest import DATA_DIR

TINY_SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random llama whose BPE tokenizer learned from tiny Shakespeare (built once:
    importing transformers costs seconds)."""
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"tiny Shakespeare not found at {TINY_SHAKESPEARE}; set TRAINER_DATA_DIR")
    from trainer.models.tiny_llama import build_tiny_llama

    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), text)
