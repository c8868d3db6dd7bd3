"""A tiny random llama (real tokenizer, ChatML template) and the ChatterBot wheel,
built or fetched once per session: importing transformers alone takes seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA_DIR

SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
# Words the corpus' pairs use, so the tiny BPE splits them into a few tokens each.
EXTRA_TEXT = "What is AI? Artificial intelligence. Hello! How are you? I am fine, thank you.\n"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models.tiny_llama import build_tiny_llama

    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text()[:20000]
    else:
        text = EXTRA_TEXT * 200
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), EXTRA_TEXT * 20 + text)


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def tiny_llama(tiny_llama_dir: Path) -> Any:
    """A fresh model per test (tests train it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def chatterbot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the verified chatterbot-corpus wheel (fetched by pip)."""
    from trainer.data.chatterbot import fetch_chatterbot_wheel

    folder = tmp_path_factory.mktemp("chatterbot")
    fetch_chatterbot_wheel(folder)
    return folder
