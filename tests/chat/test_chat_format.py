"""Chat formatting: the loss mask covers exactly the assistant's tokens; JSONL rows
in TRL/torchtune formats; one-line errors for bad rows, long prompts, no template."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from trainer.data.chat import jsonl_dpo, jsonl_sft
from trainer.data.chat_format import encode_conversation, to_example
from trainer.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is AI?"},
    {"role": "assistant", "content": "Artificial intelligence."},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tokenizer: Any, example: dict) -> str:
    return tokenizer.decode([t for t in example["labels"].tolist() if t != -100])


def test_mask_covers_exactly_the_assistant_turns(tokenizer: Any) -> None:
    ids, trained = encode_conversation(tokenizer, CONVERSATION)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Turn-by-turn encoding gives the same ids as encoding the whole rendered text.
    assert ids == tokenizer.encode(full, add_special_tokens=False)
    runs, current = [], []
    for token, train in zip(ids, trained, strict=True):
        if train:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs += [tokenizer.decode(current)] if current else []
    assert runs == ["Artificial intelligence.<|im_end|>\n", "I am fine, thank you.<|im_end|>\n"]

    example = to_example(ids, trained, max_length=512, where="test")
    labels, inputs = example["labels"].tolist(), example["input_ids"].tolist()
    assert inputs == ids[:-1] and len(labels) == len(inputs)
    for t, label in enumerate(labels):  # shifted: position t predicts token t + 1
        assert label == (ids[t + 1] if trained[t + 1] else -100)

    # Only assistant turns from train_from on: the first answer becomes context.
    _, later = encode_conversation(tokenizer, CONVERSATION, train_from=3)
    assert sum(later) == len(tokenizer.encode("I am fine, thank you.<|im_end|>\n"))


def test_truncation_keeps_the_prompt_and_refuses_when_no_answer_is_left(tokenizer: Any) -> None:
    ids, trained = encode_conversation(tokenizer, CONVERSATION[1:3])
    n_prompt = trained.index(True)
    cut = to_example(ids, trained, max_length=n_prompt + 2, where="x")
    assert cut["input_ids"].tolist() == ids[: n_prompt + 2]
    assert (cut["labels"] != -100).sum() == 3  # targets of the last 3 input positions
    # The shortest that trains: one answer token, predicted from the whole prompt.
    assert (to_example(ids, trained, n_prompt, "x")["labels"] != -100).sum() == 1
    with pytest.raises(DataError) as e:
        to_example(ids, trained, max_length=n_prompt - 1, where="data.jsonl line 4")
    message = str(e.value)
    assert "\n" not in message and message.startswith("data.jsonl line 4: the prompt takes")
    assert f"{n_prompt} tokens and max_length is {n_prompt - 1}" in message


def test_long_prompts_are_an_error_or_skipped_on_request(tmp_path: Path, tokenizer: Any) -> None:
    long = {"prompt": "What is AI? " * 40, "completion": "Artificial intelligence."}
    short = {"prompt": "What is AI?", "completion": "Artificial intelligence."}
    path = write_jsonl(tmp_path / "long.jsonl", [short, long])
    with pytest.raises(DataError, match=f"^{path} line 2: the prompt takes .*long_prompts=true"):
        jsonl_sft(path, tokenizer, max_length=32)
    kept = jsonl_sft(path, tokenizer, max_length=32, skip_long_prompts=True)
    assert len(kept) == 1 and trained_text(tokenizer, kept[0]).startswith("Artificial")


def test_jsonl_sft_formats_agree(tmp_path: Path, tokenizer: Any) -> None:
    user = [{"role": "user", "content": "What is AI?"}]
    answer = [{"role": "assistant", "content": "Artificial intelligence."}]
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "What is AI?", "completion": "Artificial intelligence."},
            "",  # blank lines are skipped
            {"messages": user + answer},
            {"prompt": user, "completion": answer},  # TRL's conversational prompt-completion
        ],
    )
    data = jsonl_sft(path, tokenizer)
    assert len(data) == 3
    first = data[0]
    for item in (data[1], data[2]):
        assert item["input_ids"].tolist() == first["input_ids"].tolist()
        assert item["labels"].tolist() == first["labels"].tolist()
    assert trained_text(tokenizer, first) == "Artificial intelligence.<|im_end|>\n"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "hi"}, "line 2: missing field 'completion'"),
        ({"text": "hi"}, "line 2: missing field 'messages'"),
        ({"messages": [{"role": "user"}]}, "line 2: missing field 'content' in messages[0]"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "line 2: messages[0] has role 'bot'"),
        ('{"prompt": "hi", ', "line 2: not valid JSON"),
        ({"messages": [{"role": "user", "content": "x"}]}, "line 2: no assistant message"),
    ],
)
def test_a_bad_sft_row_is_one_line_naming_file_line_and_field(
    tmp_path: Path, tokenizer: Any, row: Any, expected: str
) -> None:
    good = {"prompt": "What is AI?", "completion": "Artificial intelligence."}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        jsonl_sft(path, tokenizer)
    assert str(e.value).startswith(f"{path} {expected}") and "\n" not in str(e.value)


def test_jsonl_preferences_explicit_and_implicit_prompt(tmp_path: Path, tokenizer: Any) -> None:
    user = {"role": "user", "content": "What is AI?"}
    good = {"role": "assistant", "content": "Artificial intelligence."}
    bad = {"role": "assistant", "content": "I am fine."}
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "What is AI?", "chosen": good["content"], "rejected": bad["content"]},
            {"chosen": [user, good], "rejected": [user, bad]},  # TRL's implicit prompt
        ],
    )
    data = jsonl_dpo(path, tokenizer)
    assert len(data) == 2
    for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        assert data[0][key].tolist() == data[1][key].tolist()
    chosen = {k[7:]: v for k, v in data[0].items() if k.startswith("chosen_")}
    rejected = {k[9:]: v for k, v in data[0].items() if k.startswith("rejected_")}
    assert trained_text(tokenizer, chosen) == "Artificial intelligence.<|im_end|>\n"
    assert trained_text(tokenizer, rejected) == "I am fine.<|im_end|>\n"


def test_sft_rows_given_to_preference_data_name_the_missing_field(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as e:
        jsonl_dpo(path, tokenizer)
    assert str(e.value).startswith(f"{path} line 1: missing field 'chosen'")
    assert "instruction (SFT) data" in str(e.value)


def test_a_tokenizer_without_chat_template_is_one_line(tmp_path: Path, tokenizer: Any) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What?", "completion": "This."}])
    with pytest.raises(DataError) as e:
        jsonl_sft(path, plain)
    assert "has no chat template" in str(e.value) and "chat_template=chatml" in str(e.value)
    # The fix the message names works, and gives ChatML like the tokenizer's own template.
    assert jsonl_sft(path, plain, chat_template="chatml")[0]["labels"].tolist() == (
        jsonl_sft(path, tokenizer)[0]["labels"].tolist()
    )
