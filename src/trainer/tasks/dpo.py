"""Direct Preference Optimization (Rafailov et al., 2023) as a task.

The loss is -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) -
(log pi(rejected) - log ref(rejected)))), with log-probabilities summed over the
answer's tokens (labels != -100). `beta * (log pi - log ref)` is a pair's
implicit reward; reward accuracy is how often the chosen answer's reward beats
the rejected one's (a tie counts half, so the start, where the policy equals
the reference, reads 0.5: chance).

The reference is frozen:
- a model with peft adapters (LoRA injected in place, as finetune=lora does, or
  a PeftModel) is its own reference with the adapters switched off, as
  `PeftModel.disable_adapter()` does: the base weights never train, so no
  second copy of the model is held in memory;
- any other model is deep-copied in `setup`, which must therefore run on the
  weights the run starts from (before a checkpoint is loaded to resume).

Validation also reports `kl`: the exact KL(policy || reference) of the
next-token distributions, averaged over the chosen answers' tokens.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError, DataError
from trainer.tasks.base import IGNORE_INDEX, Task
from trainer.tasks.chat_samples import answer_prompts, format_answers

PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
EVAL_NAMES = ("loss", "reward_acc", "reward_margin", "chosen_reward", "rejected_reward")


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The model's peft adapter layers that are switched on (LoRA and other tuners),
    whether peft injected them in place or a PeftModel wraps the model."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]


@contextmanager
def adapters_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """The base model: adapters off, then on again with every requires_grad flag as it
    was (peft's switch sets them, and a run may have frozen some adapters)."""
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in flags:
            param.requires_grad_(flag)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = model(input_ids) if mask is None else model(input_ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(label) over positions whose label is not ignored."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    token = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -token.view_as(labels).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards (detached)."""
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen, rejected


def _count(losses: torch.Tensor) -> torch.Tensor:
    """The batch's pair count as a float64 device scalar (a fill, not a host copy)."""
    return torch.full((), float(len(losses)), dtype=torch.float64, device=losses.device)


def _won(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return (chosen > rejected).double() + 0.5 * (chosen == rejected).double()


class DPOTask(Task):
    unit = "pairs"
    metric_names = (*EVAL_NAMES, "kl")
    sum_names = (
        "pairs", "loss_sum", "won", "margin_sum", "chosen_sum", "rejected_sum",
        "kl_sum", "kl_tokens",
    )  # fmt: skip

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        monitor: str = "val/reward_acc",
        monitor_mode: str = "max",
        loss: nn.Module | None = None,
        sample_prompts: Sequence[str] = (),
        sample_tokens: int = 48,
    ) -> None:
        """`loss` (the config's loss group) is accepted and unused: DPO's loss is its own."""
        super().__init__(monitor, monitor_mode, None)
        if beta <= 0:
            raise ConfigError(f"task.beta={beta} must be > 0")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"task.label_smoothing={label_smoothing} must be in [0, 0.5)")
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.sample_prompts, self.sample_tokens = list(sample_prompts), sample_tokens
        self.reference: nn.Module | None = None
        # With adapters: the model itself and its adapter layers (no copy).
        self.adapters: nn.Module | None = None
        self.adapter_layers: list[nn.Module] = []
        self.tokenizer: Any = None
        self._train_sums: torch.Tensor | None = None

    def setup(self, model: nn.Module, device: torch.device, tokenizer: Any = None) -> None:
        model = _unwrap(model)
        self.tokenizer = tokenizer
        self.adapter_layers = adapter_layers(model)
        if self.adapter_layers:
            self.adapters, self.reference = model, None
        else:
            self.adapters = None
            self.reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)

    # --- forward passes -----------------------------------------------------------

    def check_batch(self, batch: Any) -> None:
        if not isinstance(batch, dict) or any(k not in batch for k in PAIR_KEYS):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataError(
                f"task=dpo needs preference batches with {', '.join(PAIR_KEYS)}; the data "
                f"gives {got}: use data=chatterbot_dpo or data=jsonl_dpo (rows with "
                "prompt/chosen/rejected), or task=language_modeling for instruction data"
            )

    @staticmethod
    def _both(
        model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the chosen and the rejected rows, in one forward when the shapes agree."""
        c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
        c_mask, r_mask = batch.get("chosen_attention_mask"), batch.get("rejected_attention_mask")
        if c_ids.shape == r_ids.shape and (c_mask is None) == (r_mask is None):
            mask = None if c_mask is None else torch.cat([c_mask, r_mask])
            logits = _logits(model, torch.cat([c_ids, r_ids]), mask)
            return logits[: len(c_ids)], logits[len(c_ids) :]
        return _logits(model, c_ids, c_mask), _logits(model, r_ids, r_mask)

    def _reference_logits(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.adapters is not None:
                with adapters_disabled(self.adapter_layers):
                    return self._both(self.adapters, batch)
            if self.reference is None:
                raise RuntimeError("DPOTask.setup(model, device) must run before training")
            return self._both(self.reference, batch)

    def _pairs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self.check_batch(batch)
        pol_c, pol_r = self._both(model, batch)
        ref_c, ref_r = self._reference_logits(model, batch)
        c_labels, r_labels = batch["chosen_labels"], batch["rejected_labels"]
        losses, chosen, rejected = dpo_loss(
            sequence_logps(pol_c, c_labels),
            sequence_logps(pol_r, r_labels),
            sequence_logps(ref_c, c_labels),
            sequence_logps(ref_r, r_labels),
            self.beta,
            self.label_smoothing,
        )
        return losses, chosen, rejected, pol_c, ref_c

    # --- the Task interface ---------------------------------------------------------

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        losses, chosen, rejected, _, _ = self._pairs(model, batch)
        sums = torch.stack(
            [
                _count(losses),
                _won(chosen, rejected).sum(),
                (chosen - rejected).double().sum(),
                chosen.double().sum(),
                rejected.double().sum(),
            ]
        )
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        return losses.mean()

    def train_metrics(self) -> dict[str, torch.Tensor]:
        if self._train_sums is None:
            return {}
        n, won, margin, chosen, rejected = self._train_sums / self._train_sums[0]
        self._train_sums = None
        del n
        return {
            "reward_acc": won,
            "reward_margin": margin,
            "chosen_reward": chosen,
            "rejected_reward": rejected,
        }

    def batch_units(self, batch: Any) -> int:
        self.check_batch(batch)
        return int(batch["chosen_input_ids"].shape[0])

    def eval_sums(self, model: nn.Module, batch: Any) -> torch.Tensor:
        losses, chosen, rejected, pol_c, ref_c = self._pairs(model, batch)
        answer = batch["chosen_labels"] != IGNORE_INDEX
        # Only the answer positions' distributions: far less memory than (B, T, V).
        kl = F.kl_div(
            F.log_softmax(ref_c[answer].float(), -1),
            F.log_softmax(pol_c[answer].float(), -1),
            log_target=True,
            reduction="sum",
        )
        return torch.stack(
            [
                _count(losses),
                losses.double().sum(),
                _won(chosen, rejected).sum(),
                (chosen - rejected).double().sum(),
                chosen.double().sum(),
                rejected.double().sum(),
                kl.double(),
                answer.sum().double(),
            ]
        )

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        n, *totals, kl, tokens = sums
        if n == 0:
            return dict.fromkeys(self.metric_names, math.nan)
        metrics = {name: total / n for name, total in zip(EVAL_NAMES, totals, strict=True)}
        metrics["kl"] = kl / tokens if tokens else math.nan
        return metrics

    def samples(self, model: nn.Module) -> dict[str, str]:
        if not self.sample_prompts or self.tokenizer is None:
            return {}
        answers = answer_prompts(model, self.tokenizer, self.sample_prompts, self.sample_tokens)
        return {"answers": format_answers(self.sample_prompts, answers)}
