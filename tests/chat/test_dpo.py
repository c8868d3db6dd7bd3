"""DPO: the loss and metrics against a hand computation, the reference (a frozen copy,
or the peft model with adapters disabled and no second copy), and learning."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.data.chat import PadCollator, chatterbot_dpo, chatterbot_sft
from trainer.errors import DataError
from trainer.tasks.chat_samples import answer_prompts
from trainer.tasks.dpo import DPOTask

BETA = 0.5


@pytest.fixture(scope="module")
def pairs_batch(chatterbot_dir: Path, tokenizer: Any) -> dict[str, torch.Tensor]:
    data = chatterbot_dpo(
        tokenizer, chatterbot_dir, split="val", val_size=0.02, max_length=64, skip_long_prompts=True
    )
    return PadCollator(pad_id=tokenizer.pad_token_id)([data[i] for i in range(6)])


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def logps_by_hand(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list:
    """Per row: sum over answer positions of log softmax(logits)[label], one row at a time."""
    out = []
    with torch.no_grad():
        for row in range(len(ids)):
            n = int(mask[row].sum())
            logits = model(ids[row : row + 1, :n]).logits[0].double()
            total = 0.0
            for t in range(n):
                if labels[row, t] != -100:
                    total += float(torch.log_softmax(logits[t], -1)[labels[row, t]])
            out.append(total)
    return out


def perturb(model: Any, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_loss_and_metrics_equal_a_hand_computation(tiny_llama_dir: Path, pairs_batch: dict) -> None:
    policy = load(tiny_llama_dir).eval()
    task = DPOTask(beta=BETA)
    task.setup(policy, torch.device("cpu"))
    perturb(policy)  # training moved the policy; the reference stays where it started
    reference = load(tiny_llama_dir).eval()
    b = pairs_batch
    hand = {}
    for name, model in (("policy", policy), ("ref", reference)):
        for side in ("chosen", "rejected"):
            hand[name, side] = logps_by_hand(
                model, b[f"{side}_input_ids"], b[f"{side}_attention_mask"], b[f"{side}_labels"]
            )
    losses, won, margins, chosen_r, rejected_r = [], [], [], [], []
    for i in range(len(b["chosen_input_ids"])):
        c = BETA * (hand["policy", "chosen"][i] - hand["ref", "chosen"][i])
        r = BETA * (hand["policy", "rejected"][i] - hand["ref", "rejected"][i])
        losses.append(math.log1p(math.exp(-(c - r))))  # -log sigmoid(c - r)
        won.append(1.0 if c > r else 0.5 if c == r else 0.0)
        margins.append(c - r)
        chosen_r.append(c)
        rejected_r.append(r)
    n = len(losses)
    with torch.no_grad():
        loss = task.training_loss(policy, b)
        metrics = task.eval_metrics(task.eval_sums(policy, b).tolist())
    assert loss.item() == pytest.approx(sum(losses) / n, rel=1e-4)
    assert metrics["loss"] == pytest.approx(sum(losses) / n, rel=1e-4)
    assert metrics["reward_acc"] == sum(won) / n
    assert 0 < metrics["reward_acc"] < 1  # the check would be vacuous otherwise
    for key, values in (
        ("reward_margin", margins),
        ("chosen_reward", chosen_r),
        ("rejected_reward", rejected_r),
    ):
        assert metrics[key] == pytest.approx(sum(values) / n, rel=1e-4, abs=1e-6)
    train = {k: v.item() for k, v in task.train_metrics().items()}
    assert train["reward_acc"] == metrics["reward_acc"]
    assert train["reward_margin"] == pytest.approx(metrics["reward_margin"], rel=1e-6)
    assert task.train_metrics() == {}  # reset after reading

    # KL(policy || reference) of the next-token distributions over the chosen answers.
    kl_sum, tokens = 0.0, 0
    with torch.no_grad():
        for row in range(n):
            labels = b["chosen_labels"][row]
            p = torch.log_softmax(policy(b["chosen_input_ids"][row : row + 1]).logits[0], -1)
            q = torch.log_softmax(reference(b["chosen_input_ids"][row : row + 1]).logits[0], -1)
            for t in torch.nonzero(labels != -100).flatten().tolist():
                kl_sum += float((p[t].exp() * (p[t] - q[t])).sum())
                tokens += 1
    assert metrics["kl"] == pytest.approx(kl_sum / tokens, rel=1e-3) and metrics["kl"] > 0


def test_at_the_start_rewards_are_zero_and_accuracy_is_chance(
    tiny_llama_dir: Path, pairs_batch: dict
) -> None:
    policy = load(tiny_llama_dir).eval()
    task = DPOTask(beta=BETA)
    task.setup(policy, torch.device("cpu"))
    metrics = task.eval_metrics(task.eval_sums(policy, pairs_batch).tolist())
    assert metrics["reward_acc"] == 0.5 and metrics["reward_margin"] == 0.0
    assert metrics["loss"] == pytest.approx(math.log(2)) and metrics["kl"] == 0.0
    policy.model.embed_tokens.weight.data.add_(1.0)
    assert not task.reference.model.embed_tokens.weight.requires_grad
    assert not torch.equal(
        task.reference.model.embed_tokens.weight, policy.model.embed_tokens.weight
    )


def lora(folder: Path, wrapped: bool = True) -> Any:
    """LoRA on q/v: a PeftModel, or injected in place (as finetune=lora does)."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    if wrapped:
        return get_peft_model(load(folder), config)
    return inject_adapter_in_model(config, load(folder))


@pytest.mark.parametrize("wrapped", [True, False], ids=["PeftModel", "injected"])
def test_lora_reference_is_the_base_model_without_a_second_copy(
    tiny_llama_dir: Path, pairs_batch: dict, wrapped: bool
) -> None:
    model = lora(tiny_llama_dir, wrapped)
    task = DPOTask(beta=BETA)
    task.setup(model, torch.device("cpu"))
    assert task.reference is None and task.adapters is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the adapters move away from zero
        optimizer.zero_grad()
        task.training_loss(model, pairs_batch).backward()
        optimizer.step()
    base = load(tiny_llama_dir).eval()
    model.eval()
    ids, mask = pairs_batch["chosen_input_ids"], pairs_batch["chosen_attention_mask"]
    with torch.no_grad():
        ref_chosen, _ = task._reference_logits(model, pairs_batch)
        expected = base(ids, attention_mask=mask).logits
        policy = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ref_chosen, expected, rtol=0, atol=1e-6)
    assert (policy - expected).abs().max() > 1e-3  # the adapters do change the policy
    # The switch left every requires_grad flag as it was.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # Every tensor the task holds is one of the model's: no second copy of the weights.
    held = [v for v in vars(task).values() if isinstance(v, torch.nn.Module)]
    held += [m for v in vars(task).values() if isinstance(v, list) for m in v]
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for m in held for p in m.parameters()} == model_ptrs


@pytest.mark.slow
def test_dpo_learns_on_built_chatterbot_preferences(
    tiny_llama_dir: Path, chatterbot_dir: Path, tokenizer: Any
) -> None:
    data = chatterbot_dpo(
        tokenizer, chatterbot_dir, split="val", val_size=0.02, max_length=64, skip_long_prompts=True
    )
    collate = PadCollator(pad_id=tokenizer.pad_token_id)
    batches = [collate([data[i] for i in range(s, s + 8)]) for s in (0, 8)]
    torch.manual_seed(0)
    model = lora(tiny_llama_dir)
    task = DPOTask(beta=BETA)
    task.setup(model, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            sums = sum(task.eval_sums(model, b) for b in batches)
        return task.eval_metrics(sums.tolist())

    before = evaluate()
    for _ in range(3):
        for b in batches:
            optimizer.zero_grad()
            task.training_loss(model, b).backward()
            optimizer.step()
    after = evaluate()
    assert before["reward_acc"] == 0.5
    assert after["loss"] < before["loss"] - 0.2
    assert after["reward_acc"] >= 0.9 and after["reward_margin"] > 0 and after["kl"] > 0


def test_dpo_on_instruction_data_is_one_line(
    tiny_llama_dir: Path, chatterbot_dir: Path, tokenizer: Any
) -> None:
    data = chatterbot_sft(tokenizer, chatterbot_dir, split="val", val_size=0.02)
    batch = PadCollator()([data[0], data[1]])
    task = DPOTask()
    with pytest.raises(DataError) as e:
        task.training_loss(torch.nn.Identity(), batch)
    message = str(e.value)
    assert "\n" not in message and message.startswith("task=dpo needs preference batches")
    assert "'input_ids'" in message and "data=chatterbot_dpo" in message


class LogitsOnly(torch.nn.Module):
    """The same model without `generate`: answers come from the plain greedy loop."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def test_answer_prompts_is_greedy_and_restores_the_mode(tiny_llama: Any, tokenizer: Any) -> None:
    prompts = ["What is AI?", "How are you?"]
    tiny_llama.train()
    answers = answer_prompts(tiny_llama, tokenizer, prompts, max_new_tokens=12)
    assert tiny_llama.training
    assert answers == answer_prompts(LogitsOnly(tiny_llama), tokenizer, prompts, 12)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
