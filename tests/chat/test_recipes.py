"""The SmolLM2 recipes (`experiment=smollm2_*`) run end to end on a tiny random llama:
validation of the starting weights at step 0, then training, with held-out answers in
TensorBoard. The real model's figures come from scripts/bench_finetune_lm.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import compose_config

SHORT = [
    "trainer.max_steps=4",
    "trainer.val_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "trainer.progress_bar=false",
    "data.eval_batch_size=8",
]


def read_events(log_dir: Path) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(t)]
             for t in events.Tags()["tensors"]}  # fmt: skip
    return scalars, texts


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,monitor,extra",
    [
        ("smollm2_sft_chatterbot", "val/loss", ["data.val_size=0.03"]),
        ("smollm2_dpo_chatterbot", "val/reward_acc", ["data.val_size=0.03"]),
        ("smollm2_domain_shakespeare", "val/ppl", ["data.val_windows=8", "data.block_size=64"]),
    ],
)
def test_recipe_validates_at_start_then_trains(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path, experiment, monitor, extra
) -> None:
    from trainer.run import train

    cache = [f"data.dataset.cache_dir={chatterbot_dir}"] if "chatterbot" in experiment else []
    cfg = compose_config(
        [f"experiment={experiment}", f"model.name_or_path={tiny_llama_dir}", *SHORT, *cache,
         *extra],
        tmp_path,
    )  # fmt: skip
    train(cfg)
    scalars, texts = read_events(tmp_path / "tensorboard")
    assert [step for step, _ in scalars[monitor]] == [0, 4]
    if experiment != "smollm2_domain_shakespeare":
        answers = texts["answers/text_summary"]
        assert [step for step, _ in answers] == [0, 4]
        assert all(prompt in answers[0][1] for prompt in cfg.task.sample_prompts)
    if experiment == "smollm2_dpo_chatterbot":
        # Policy == reference at step 0: every reward is 0, so no pair is won yet.
        assert scalars["val/reward_margin"][0][1] == 0 and scalars["val/kl"][0][1] == 0


@pytest.mark.parametrize("experiment", ["smollm2_sft_chatterbot", "smollm2_dpo_chatterbot"])
def test_the_recipes_sample_prompts_are_held_out(chatterbot_dir: Path, experiment: str) -> None:
    from trainer.data import chatterbot

    cfg = compose_config([f"experiment={experiment}"])
    wheel = chatterbot.fetch_chatterbot_wheel(chatterbot_dir)
    pairs = chatterbot.conversation_pairs(chatterbot.read_conversations(wheel))
    split = {
        name: {q for q, _, _ in chatterbot.split_pairs(pairs, name, cfg.data.val_size,
                                                      cfg.data.split_seed)}
        for name in ("train", "val")
    }  # fmt: skip
    assert cfg.task.sample_prompts
    for prompt in cfg.task.sample_prompts:
        assert prompt in split["val"] and prompt not in split["train"]
