"""ChatterBot fetched and parsed, split by question, built preferences; padding
with attention masks that leave the real positions' logits unchanged; packing."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.data import chatterbot
from trainer.data.chat import PadCollator, chatterbot_dpo, chatterbot_sft, pack
from trainer.errors import DataError


@pytest.fixture(scope="module")
def pairs(chatterbot_dir: Path) -> list[chatterbot.Pair]:
    wheel = chatterbot.fetch_chatterbot_wheel(chatterbot_dir)
    return chatterbot.conversation_pairs(chatterbot.read_conversations(wheel))


def test_chatterbot_wheel_is_verified_and_parsed(chatterbot_dir: Path, pairs: list) -> None:
    wheel = chatterbot_dir / chatterbot.CHATTERBOT_WHEEL
    with zipfile.ZipFile(wheel) as zf:
        files = [n for n in zf.namelist() if n.startswith(chatterbot.CHATTERBOT_MEMBERS)]
    assert len([f for f in files if f.endswith(".yml")]) == 21
    conversations = chatterbot.read_conversations(wheel)
    assert len(conversations) == 2025 and len(pairs) == 2306  # one malformed entry skipped
    assert pairs[0][:2] == (
        "What is AI?",
        "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
    )
    assert all(q and a for q, a, _ in pairs)


def test_a_corrupt_cached_wheel_is_fetched_again(tmp_path: Path, chatterbot_dir: Path) -> None:
    good = (chatterbot_dir / chatterbot.CHATTERBOT_WHEEL).read_bytes()
    (tmp_path / chatterbot.CHATTERBOT_WHEEL).write_bytes(good[:-10])
    wheel = chatterbot.fetch_chatterbot_wheel(tmp_path)
    assert wheel.read_bytes() == good


def test_split_holds_out_whole_questions(pairs: list) -> None:
    train = chatterbot.split_pairs(pairs, "train", 0.1, split_seed=0)
    val = chatterbot.split_pairs(pairs, "val", 0.1, split_seed=0)
    assert len(train) + len(val) == len(pairs)
    questions = {chatterbot.normalize(q) for q, _, _ in val}
    assert not questions & {chatterbot.normalize(q) for q, _, _ in train}
    n_questions = len({chatterbot.normalize(q) for q, _, _ in pairs})
    assert len(questions) == round(0.1 * n_questions)
    assert chatterbot.split_pairs(pairs, "val", 0.1, split_seed=0) == val
    assert chatterbot.split_pairs(pairs, "val", 0.1, split_seed=1) != val
    with pytest.raises(DataError, match="val_size=0 holds out 0"):
        chatterbot.split_pairs(pairs, "val", 0, 0)


def test_preferences_are_deterministic_and_never_answer_their_own_question(pairs: list) -> None:
    triples = chatterbot.preference_triples(pairs, pair_seed=0)
    assert triples == chatterbot.preference_triples(pairs, pair_seed=0)
    assert triples != chatterbot.preference_triples(pairs, pair_seed=1)
    answers: dict[str, set[str]] = {}
    for q, a, _ in pairs:
        answers.setdefault(chatterbot.normalize(q), set()).add(chatterbot.normalize(a))
    for (q, a, _), (tq, chosen, rejected) in zip(pairs, triples, strict=True):
        assert (tq, chosen) == (q, a)
        assert chatterbot.normalize(rejected) not in answers[chatterbot.normalize(q)]
    # Drawn across the corpus, not a few answers reused everywhere.
    assert len({r for _, _, r in triples}) > len({a for _, a, _ in pairs}) / 2


def test_preference_dataset_keeps_pairs_within_the_split(
    chatterbot_dir: Path, tokenizer: Any, pairs: list
) -> None:
    val = chatterbot_dpo(tokenizer, chatterbot_dir, split="val", val_size=0.05)
    val_answers = {a for _, a, _ in chatterbot.split_pairs(pairs, "val", 0.05, split_seed=0)}
    val_questions = {q for q, _, _ in chatterbot.split_pairs(pairs, "val", 0.05, split_seed=0)}
    assert len(val.prompts) == len(val) and set(val.prompts) == val_questions
    for item in val.items:
        labels = item["rejected_labels"]
        text = tokenizer.decode(labels[labels != -100]).removesuffix("<|im_end|>\n")
        assert any(a.startswith(text) for a in val_answers)  # long answers are truncated


def test_padding_masks_and_leaves_real_logits_unchanged(
    chatterbot_dir: Path, tokenizer: Any, tiny_llama: Any
) -> None:
    data = chatterbot_sft(tokenizer, chatterbot_dir, split="val", val_size=0.02)
    items = [data[0], data[1], data[2]]
    batch = PadCollator(pad_id=tokenizer.pad_token_id, pad_to_multiple_of=8)(items)
    lengths = [len(item["input_ids"]) for item in items]
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    tiny_llama.eval()
    with torch.no_grad():
        padded = tiny_llama(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, item in enumerate(items):
            alone = tiny_llama(item["input_ids"][None]).logits[0]
            torch.testing.assert_close(padded[row, : len(alone)], alone, atol=1e-5, rtol=1e-5)


def test_preference_batches_share_one_length() -> None:
    items = [
        {
            "chosen_input_ids": torch.arange(n),
            "chosen_labels": torch.arange(n),
            "rejected_input_ids": torch.arange(m),
            "rejected_labels": torch.arange(m),
        }
        for n, m in ((3, 7), (5, 2))
    ]
    batch = PadCollator()(items)
    assert {tuple(v.shape) for v in batch.values()} == {(2, 7)}
    assert batch["chosen_attention_mask"].sum(1).tolist() == [3, 5]
    assert batch["rejected_attention_mask"].sum(1).tolist() == [7, 2]
    separate = PadCollator(same_length=False)(items)
    assert separate["chosen_input_ids"].shape == (2, 5)


def test_packing_fills_rows_in_order_without_splitting_examples() -> None:
    examples = [
        {"input_ids": torch.full((n,), i), "labels": torch.full((n,), 100 + i)}
        for i, n in enumerate([5, 4, 3, 8, 2, 6])
    ]
    rows = pack(examples, max_length=10, pad=0)
    # Greedy: [5+4], [3], wait 3+8 > 10 -> [3], [8+2], [6].
    assert [r["attention_mask"].sum().item() for r in rows] == [9, 3, 10, 6]
    real = torch.cat([r["input_ids"][r["attention_mask"].bool()] for r in rows])
    assert torch.equal(real, torch.cat([e["input_ids"] for e in examples]))
    for r in rows:
        assert (
            r["input_ids"].shape == (10,)
            and (r["labels"][~r["attention_mask"].bool()] == -100).all()
        )


def test_packed_chatterbot_keeps_every_trained_token(chatterbot_dir: Path, tokenizer: Any) -> None:
    plain = chatterbot_sft(tokenizer, chatterbot_dir, split="val", val_size=0.05)
    packed = chatterbot_sft(tokenizer, chatterbot_dir, split="val", val_size=0.05, packing=True)
    assert packed.n_examples == len(plain) and len(packed) < len(plain) / 3

    def trained(items: list) -> torch.Tensor:
        return torch.cat([i["labels"][i["labels"] != -100] for i in items])

    assert torch.equal(trained(packed.items), trained(plain.items))
