"""Character and Hugging Face tokenizers, and their state in checkpoints."""

import io

import numpy as np
import pytest
import torch

from tests.conftest import DATA_DIR
from trainer.data import tokenizers
from trainer.data.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    tokenizer_from_state,
    vocabulary_difference,
)
from trainer.error_messages import describe_user_error
from trainer.errors import CheckpointError, ConfigError, DataError

TINY = DATA_DIR / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def tiny_text() -> str:
    if not TINY.is_file():
        pytest.skip(f"tiny Shakespeare not found at {TINY}; set TRAINER_DATA_DIR")
    return TINY.read_text(encoding="utf-8")


def _through_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save({"tokenizer": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["tokenizer"]


def test_char_vocabulary_is_nanogpts(tiny_text):
    tok = CharTokenizer.from_text(tiny_text)
    # nanoGPT's prepare.py: chars = sorted(list(set(data))); stoi = {ch: i ...}
    chars = sorted(set(tiny_text))
    assert tok.vocab_size == len(chars) == 65 and tok.eos_id is None
    assert tok.encode("ROMEO:\n") == [chars.index(c) for c in "ROMEO:\n"]
    ids = tok.encode_array(tiny_text)
    assert ids.dtype == np.int64 and len(ids) == 1_115_394
    assert tok.decode(ids[:2000]) == tiny_text[:2000]

    again = tokenizer_from_state(_through_checkpoint(tok.state_dict()))
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert again.fingerprint == tok.fingerprint
    assert CharTokenizer.from_text(tiny_text + "é").fingerprint != tok.fingerprint


def test_unknown_characters_are_named(tiny_text):
    tok = CharTokenizer.from_text(tiny_text)
    with pytest.raises(DataError) as e:
        tok.encode("JULIET: ¿qué? ~")
    line = describe_user_error(e.value)
    assert "'¿'" in line and "'é'" in line and "'~'" in line and "'J'" not in line
    assert "65-character vocabulary" in line and "\n" not in line


def test_bad_state_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="unknown tokenizer state"):
        tokenizer_from_state({"kind": "bpe?"})


def test_vocabulary_difference_names_what_would_be_remapped():
    shakespeare = CharTokenizer(list("abc\n")).state_dict()
    assert vocabulary_difference(shakespeare, CharTokenizer(list("abc\n")).state_dict()) is None
    same_size = vocabulary_difference(shakespeare, CharTokenizer(list("abd\n")).state_dict())
    assert same_size == (
        "4 characters in the checkpoint, 4 in the data; only in the checkpoint: 'c'; "
        "only in the data: 'd'"
    )
    reordered = CharTokenizer(list("abc\n")).state_dict()
    reordered["chars"] = list("bac\n")
    assert "the same 4 characters in another order" in vocabulary_difference(shakespeare, reordered)
    # HF tokenizers compare by vocabulary, wherever the files were loaded from.
    hf = {"kind": "hf", "name_or_path": "a", "vocab_size": 9, "vocab_sha256": "1"}
    assert vocabulary_difference(hf, {**hf, "name_or_path": "/elsewhere/a"}) is None
    assert "'a' of 9 tokens in the checkpoint, 'b' of 9 here" in vocabulary_difference(
        hf, {**hf, "name_or_path": "b", "vocab_sha256": "2"}
    )
    assert "a char tokenizer in the checkpoint, a hf one" in vocabulary_difference(shakespeare, hf)


@pytest.mark.slow
def test_hf_tokenizer(tiny_llama_dir, tmp_path, tiny_text, monkeypatch):
    tok = HFTokenizer(str(tiny_llama_dir))
    # Bulk encoding in pieces (about 30 here) gives the ids of encoding the whole text at once.
    monkeypatch.setattr(tokenizers, "HF_PIECE_CHARS", 1000)
    passage = tiny_text[:30000]
    whole = tok.tokenizer.encode(passage, add_special_tokens=False)
    assert tok.encode_array(passage).tolist() == whole
    text = "ROMEO:\nBut soft, what light"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id == tok.tokenizer.eos_token_id is not None
    assert np.array_equal(tok.encode_array(text), ids)
    # A chat prompt carries the template's markers; plain encode carries none.
    assert tok.has_chat_template
    prompt = tok.decode(tok.chat_prompt("Hi"))
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.tokenizer.bos_token_id not in ids

    state = _through_checkpoint(tok.state_dict())
    again = tokenizer_from_state(state)
    assert again.encode(text) == ids and again.fingerprint == tok.fingerprint
    state["vocab_sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="not the one this checkpoint was trained with"):
        tokenizer_from_state(state)
    with pytest.raises(ConfigError, match=r"nothing_here: no such folder") as e:
        HFTokenizer(str(tmp_path / "nothing_here"))
    assert "\n" not in str(e.value)
