"""Instruction (SFT) and preference data for adapting pre-trained language models.

Map-style Datasets plus a padding collator, used through `trainer.data.DatasetData`
(configs/data/{chatterbot,jsonl}_{sft,dpo}.yaml). Everything is tokenized in the
constructor, so a bad row or an over-long prompt is reported before training.

Items (dicts of 1-D long tensors; `labels` already shifted, -100 = no loss):
- SFT: `input_ids`, `labels` (loss on the assistant's tokens only), and with
  packing also `attention_mask`.
- Preferences: the same keys prefixed `chosen_` and `rejected_`; the labels
  cover the answer only, so the task sums log-probabilities of the answer.

Packing (`packing: true`) concatenates examples in order into rows of exactly
`max_length` tokens without splitting an example across rows; the tail of a
row is padding. As in TRL's original packing, the examples in one row attend
to the ones before them (the loss still covers only assistant tokens); keep
packing off for validation so held-out loss is per example.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from trainer.data import chatterbot
from trainer.data.chat_format import (
    Message,
    PromptTooLong,
    checkpointable,
    encode_conversation,
    load_tokenizer,
    preference_row,
    read_jsonl,
    require_chat_template,
    sft_row,
    to_example,
)
from trainer.errors import ConfigError, DataError
from trainer.tasks.base import IGNORE_INDEX

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512


class ChatDataset(Dataset):
    """Tokenized conversations for supervised fine-tuning."""

    def __init__(
        self,
        conversations: Sequence[tuple[str, list[Message], int]],
        tokenizer: Any,
        max_length: int = DEFAULT_MAX_LENGTH,
        packing: bool = False,
        chat_template: str | None = None,
        skip_long_prompts: bool = False,
    ) -> None:
        """`conversations`: (where, messages, train_from) per example; `where`
        names it in errors ("file.jsonl line 3"). A prompt that leaves nothing of
        its answer within `max_length` is an error, or skipped (and counted in
        the log) with `skip_long_prompts`."""
        if max_length < 2:
            raise ConfigError(f"data.dataset.max_length={max_length} must be >= 2")
        self.hf_tokenizer = load_tokenizer(tokenizer, chat_template)
        require_chat_template(self.hf_tokenizer)
        self.tokenizer = checkpointable(self.hf_tokenizer)
        self.max_length = max_length
        examples = []
        # The last user message of each example, e.g. for answers shown at validation.
        self.prompts: list[str] = []
        skipped = 0
        for where, messages, train_from in conversations:
            ids, trained = encode_conversation(self.hf_tokenizer, messages, train_from, where)
            try:
                examples.append(to_example(ids, trained, max_length, where))
            except PromptTooLong:
                if not skip_long_prompts:
                    raise
                skipped += 1
                continue
            self.prompts.append(_last_user(messages[:train_from] or messages))
        _log_skipped(skipped, max_length)
        if not examples:
            raise DataError("the instruction data has no examples")
        self.n_examples = len(examples)
        self.items = pack(examples, max_length, pad_id(self.hf_tokenizer)) if packing else examples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class PreferenceDataset(Dataset):
    """Tokenized (prompt, chosen, rejected) triples for preference training (DPO)."""

    def __init__(
        self,
        triples: Sequence[tuple[str, list[Message], list[Message], list[Message]]],
        tokenizer: Any,
        max_length: int = DEFAULT_MAX_LENGTH,
        chat_template: str | None = None,
        skip_long_prompts: bool = False,
    ) -> None:
        """`triples`: (where, prompt, chosen, rejected) messages per pair; long
        prompts as in ChatDataset."""
        if max_length < 2:
            raise ConfigError(f"data.dataset.max_length={max_length} must be >= 2")
        self.hf_tokenizer = load_tokenizer(tokenizer, chat_template)
        require_chat_template(self.hf_tokenizer)
        self.tokenizer = checkpointable(self.hf_tokenizer)
        self.max_length = max_length
        self.items = []
        self.prompts: list[str] = []  # as in ChatDataset
        skipped = 0
        for where, prompt, chosen, rejected in triples:
            item = {}
            try:
                for name, answer in (("chosen", chosen), ("rejected", rejected)):
                    at = f"{where} ({name})"
                    ids, trained = encode_conversation(
                        self.hf_tokenizer, prompt + answer, len(prompt), at
                    )
                    for key, value in to_example(ids, trained, max_length, at).items():
                        item[f"{name}_{key}"] = value
            except PromptTooLong:
                if not skip_long_prompts:
                    raise
                skipped += 1
                continue
            self.items.append(item)
            self.prompts.append(_last_user(prompt))
        _log_skipped(skipped, max_length)
        if not self.items:
            raise DataError("the preference data has no pairs")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def _last_user(messages: list[Message]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def _log_skipped(skipped: int, max_length: int) -> None:
    if skipped:
        log.warning(
            "skipped %d examples whose prompt leaves no answer in %d tokens", skipped, max_length
        )


def pad_id(tokenizer: Any) -> int:
    """The pad token, else end-of-sequence, else 0 (padding is masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def pack(
    examples: list[dict[str, torch.Tensor]], max_length: int, pad: int
) -> list[dict[str, torch.Tensor]]:
    """Greedy in-order packing into rows of `max_length`; examples are never split."""
    rows: list[list[dict[str, torch.Tensor]]] = [[]]
    used = 0
    for example in examples:
        n = len(example["input_ids"])
        if used + n > max_length and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += n
    packed = []
    for row in rows:
        ids = torch.cat([e["input_ids"] for e in row])
        labels = torch.cat([e["labels"] for e in row])
        n = len(ids)
        packed.append(
            {
                "input_ids": torch.nn.functional.pad(ids, (0, max_length - n), value=pad),
                "labels": torch.nn.functional.pad(labels, (0, max_length - n), value=IGNORE_INDEX),
                "attention_mask": (torch.arange(max_length) < n).long(),
            }
        )
    return packed


class PadCollator:
    """Right-pads items (dicts of 1-D tensors) into a batch with attention masks.

    For every `<prefix>input_ids` key: input ids pad with `pad_id`, `<prefix>labels`
    with `ignore_index`, and `<prefix>attention_mask` (made when absent) with 0.
    With `same_length` (the default) all prefixes share one length, so a DPO task
    can run chosen and rejected through the model as one batch. Lengths round up
    to `pad_to_multiple_of`.
    """

    def __init__(
        self,
        pad_id: int = 0,
        ignore_index: int = IGNORE_INDEX,
        pad_to_multiple_of: int = 1,
        same_length: bool = True,
    ) -> None:
        self.pad_id, self.ignore_index = pad_id, ignore_index
        self.multiple, self.same_length = max(1, pad_to_multiple_of), same_length

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = list(items[0])
        for item in items[1:]:
            if list(item) != keys:
                raise DataError(
                    f"batch items have different keys: {sorted(keys)} and {sorted(item)}"
                )
        prefixes = [k[: -len("input_ids")] for k in keys if k.endswith("input_ids")]
        if not prefixes:
            raise DataError(f"PadCollator needs items with 'input_ids'; got keys {keys}")
        lengths = {p: max(len(item[f"{p}input_ids"]) for item in items) for p in prefixes}
        if self.same_length:
            lengths = dict.fromkeys(prefixes, max(lengths.values()))
        batch: dict[str, torch.Tensor] = {}
        for p in prefixes:
            width = -(-lengths[p] // self.multiple) * self.multiple
            ids = [item[f"{p}input_ids"] for item in items]
            batch[f"{p}input_ids"] = _pad(ids, width, self.pad_id)
            if f"{p}labels" in keys:
                batch[f"{p}labels"] = _pad(
                    [i[f"{p}labels"] for i in items], width, self.ignore_index
                )
            if f"{p}attention_mask" in keys:
                masks = [item[f"{p}attention_mask"] for item in items]
            else:
                masks = [torch.ones_like(i) for i in ids]
            batch[f"{p}attention_mask"] = _pad(masks, width, 0)
        for key in keys:
            if key not in batch:
                batch[key] = torch.stack([item[key] for item in items])
        return batch


def _pad(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# --- Constructors named by the configs' `_target_` ---------------------------------


def _chatterbot_split(
    cache_dir: str | Path, split: str, val_size: float, split_seed: int
) -> list[chatterbot.Pair]:
    wheel = chatterbot.fetch_chatterbot_wheel(cache_dir)
    pairs = chatterbot.conversation_pairs(chatterbot.read_conversations(wheel))
    return chatterbot.split_pairs(pairs, split, val_size, split_seed)


def _prompt(question: str, system_prompt: str | None) -> list[Message]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": question}]


def chatterbot_sft(
    tokenizer: Any,
    cache_dir: str | Path,
    split: str = "all",
    val_size: float = 0.1,
    split_seed: int = 0,
    max_length: int = DEFAULT_MAX_LENGTH,
    packing: bool = False,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    skip_long_prompts: bool = False,
) -> ChatDataset:
    """ChatterBot question -> answer pairs; `split` train/val holds out by question."""
    pairs = _chatterbot_split(cache_dir, split, val_size, split_seed)
    conversations = [
        (f"chatterbot {source}", _prompt(q, system_prompt) + [_assistant(a)], 1)
        for q, a, source in pairs
    ]
    return ChatDataset(
        conversations, tokenizer, max_length, packing, chat_template, skip_long_prompts
    )


def chatterbot_dpo(
    tokenizer: Any,
    cache_dir: str | Path,
    split: str = "all",
    val_size: float = 0.1,
    split_seed: int = 0,
    pair_seed: int = 0,
    max_length: int = DEFAULT_MAX_LENGTH,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    skip_long_prompts: bool = False,
) -> PreferenceDataset:
    """Built preferences: chosen = the corpus' answer, rejected = an answer to another
    question of the same split drawn by `pair_seed` (see trainer.data.chatterbot)."""
    pairs = _chatterbot_split(cache_dir, split, val_size, split_seed)
    triples = [
        (f"chatterbot pair {i}", _prompt(q, system_prompt), [_assistant(c)], [_assistant(r)])
        for i, (q, c, r) in enumerate(chatterbot.preference_triples(pairs, pair_seed))
    ]
    return PreferenceDataset(triples, tokenizer, max_length, chat_template, skip_long_prompts)


def jsonl_sft(
    path: str | Path,
    tokenizer: Any,
    max_length: int = DEFAULT_MAX_LENGTH,
    packing: bool = False,
    chat_template: str | None = None,
    skip_long_prompts: bool = False,
) -> ChatDataset:
    """Rows `{"prompt", "completion"}` (strings or message lists) or `{"messages": [...]}`."""
    conversations = [(where, *sft_row(row, where)) for where, row in read_jsonl(path)]
    return ChatDataset(
        conversations, tokenizer, max_length, packing, chat_template, skip_long_prompts
    )


def jsonl_dpo(
    path: str | Path,
    tokenizer: Any,
    max_length: int = DEFAULT_MAX_LENGTH,
    chat_template: str | None = None,
    skip_long_prompts: bool = False,
) -> PreferenceDataset:
    """Rows `{"prompt", "chosen", "rejected"}` (strings or message lists), or chosen and
    rejected as whole conversations sharing their first messages."""
    triples = [(where, *preference_row(row, where)) for where, row in read_jsonl(path)]
    return PreferenceDataset(triples, tokenizer, max_length, chat_template, skip_long_prompts)


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}
