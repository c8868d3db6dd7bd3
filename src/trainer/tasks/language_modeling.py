"""Language modeling: next-token cross-entropy over the positions that have a target.

Batches are dicts (see tasks/base.py): `labels[:, t]` is the target of position
t, IGNORE_INDEX masks a position out (a prompt, padding). The loss is the
configured `loss` group's (cross-entropy, whose ignore_index must match), plus
an auxiliary loss a model returns (a mixture of experts' load balancing).
Evaluation sums token losses and correct tokens, so every metric is per token
over the whole split, whatever the batch boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from trainer.errors import ConfigError, DataError
from trainer.tasks.base import IGNORE_INDEX, Task
from trainer.tasks.chat_samples import answer_prompts, format_answers

REQUIRED_KEYS = ("input_ids", "labels")


def model_outputs(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Run a causal LM on the batch's `input_ids` (and `attention_mask`, if any)."""
    mask = batch.get(prefix + "attention_mask")
    ids = batch[prefix + "input_ids"]
    return model(ids) if mask is None else model(ids, attention_mask=mask)


def logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


class LanguageModelingTask(Task):
    unit = "tokens"
    sum_names = ("loss_sum", "correct", "tokens")
    metric_names = ("loss", "ppl", "bits_per_token", "token_acc")

    def __init__(
        self,
        monitor: str = "val/loss",
        monitor_mode: str = "min",
        loss: nn.Module | None = None,
        ignore_index: int = IGNORE_INDEX,
        sample_prompt: str | None = None,
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 200,
        sample_seed: int = 1337,
        sample_prompts: Sequence[str] = (),
    ) -> None:
        super().__init__(monitor, monitor_mode, loss or nn.CrossEntropyLoss())
        loss_ignore = getattr(self.loss, "ignore_index", ignore_index)
        if loss_ignore != ignore_index:
            raise ConfigError(
                f"loss.ignore_index={loss_ignore} but task.ignore_index={ignore_index}; "
                "set them to the same value (masked positions would be trained on)"
            )
        self.ignore_index = ignore_index
        self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens
        self.sample_temperature, self.sample_top_k = sample_temperature, sample_top_k
        self.sample_seed = sample_seed
        self.sample_prompts = list(sample_prompts)
        self.tokenizer: Any = None
        self._aux_sum: torch.Tensor | None = None
        self._expert_sum: torch.Tensor | None = None
        self._aux_count = 0

    def setup(self, model: nn.Module, device: torch.device, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        if self.sample_prompt and tokenizer is not None:
            from trainer.generation import encode_prompt

            # A prompt the vocabulary cannot encode fails now, not at the first validation.
            encode_prompt(tokenizer, self.sample_prompt, getattr(model, "block_size", None))

    def check_batch(self, batch: Any) -> None:
        if not isinstance(batch, dict) or any(k not in batch for k in REQUIRED_KEYS):
            got = type(batch).__name__
            if isinstance(batch, dict):
                got += f" with keys {sorted(batch)}"
            raise DataError(
                "task=language_modeling expects dict batches with input_ids and labels "
                f"(labels[:, t] the target of position t); the data gives a {got}"
            )
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.shape != labels.shape:
            raise DataError(
                f"input_ids {list(ids.shape)} and labels {list(labels.shape)} differ in shape; "
                "each position needs one target (IGNORE_INDEX=-100 where there is none)"
            )

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        output = model_outputs(model, batch)
        logits = logits_of(output)
        loss = self.loss(logits.flatten(0, 1), batch["labels"].flatten())
        aux = getattr(output, "aux_loss", None)
        if aux is not None:
            loss = loss + aux
            self._track_aux(aux.detach(), getattr(output, "expert_fractions", None))
        return loss

    def loss_count(self, batch: Any) -> torch.Tensor:
        return (batch["labels"] != self.ignore_index).sum()

    def _track_aux(self, aux: torch.Tensor, fractions: torch.Tensor | None) -> None:
        self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux
        if fractions is not None:
            fractions = fractions.detach().float()
            self._expert_sum = (
                fractions if self._expert_sum is None else self._expert_sum + fractions
            )
        self._aux_count += 1

    def train_metrics(self) -> dict[str, torch.Tensor]:
        if not self._aux_count:
            return {}
        metrics = {"aux_loss": self._aux_sum / self._aux_count}
        if self._expert_sum is not None:
            shares = self._expert_sum / self._aux_count
            for layer, row in enumerate(shares):
                for expert, share in enumerate(row):
                    metrics[f"moe/layer{layer}/expert{expert}"] = share
        self._aux_sum = self._expert_sum = None
        self._aux_count = 0
        return metrics

    def batch_units(self, batch: Any) -> int:
        return batch["input_ids"].numel()

    def eval_sums(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = logits_of(model_outputs(model, batch)).float()
        labels = batch["labels"]
        flat = logits.flatten(0, 1)
        targets = labels.flatten()
        token_loss = F.cross_entropy(
            flat, targets, ignore_index=self.ignore_index, reduction="sum"
        ).double()
        counted = targets != self.ignore_index
        correct = ((flat.argmax(dim=-1) == targets) & counted).sum().double()
        return torch.stack([token_loss, correct, counted.sum().double()])

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        loss_sum, correct, tokens = sums
        if tokens == 0:
            return dict.fromkeys(self.metric_names, math.nan)
        loss = loss_sum / tokens
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "bits_per_token": loss / math.log(2),
            "token_acc": correct / tokens,
        }

    def samples(self, model: nn.Module) -> dict[str, str]:
        if self.tokenizer is None:
            return {}
        out = {}
        if self.sample_prompt:
            from trainer.generation import generate_text

            out["samples/text"] = generate_text(
                model,
                self.tokenizer,
                self.sample_prompt,
                max_new_tokens=self.sample_tokens,
                temperature=self.sample_temperature,
                top_k=self.sample_top_k,
                seed=self.sample_seed,
            )
        if self.sample_prompts:  # an instruct model's greedy answers, chat-formatted
            answers = answer_prompts(model, self.tokenizer, self.sample_prompts, self.sample_tokens)
            out["answers"] = format_answers(self.sample_prompts, answers)
        return out
