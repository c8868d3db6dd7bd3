"""Tasks: losses, metrics and batch checks against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainer.errors import ConfigError, DataError
from trainer.loop.evaluation import evaluate_model
from trainer.tasks.classification import ClassificationTask
from trainer.tasks.language_modeling import LanguageModelingTask


class FixedLogits(nn.Module):
    """A 'model' returning given logits, so metrics can be computed by hand."""

    def __init__(self, logits: torch.Tensor, aux: torch.Tensor | None = None) -> None:
        super().__init__()
        self.logits, self.aux = logits, aux
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask=None):
        if self.aux is None:
            return self.logits
        fractions = torch.tensor([[0.75, 0.25]])
        return SimpleNamespace(logits=self.logits, aux_loss=self.aux, expert_fractions=fractions)


class Batches:
    def __init__(self, *batches) -> None:
        self.batches = batches

    def epoch(self, epoch: int, start: int = 0):
        yield from self.batches[start:]


def lm_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(11, (2, 5))
    labels[0, :2] = -100  # a masked prompt
    labels[1, 0] = logits[1, 0].argmax()  # one sure hit
    return logits, {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels}


def test_language_modeling_metrics_are_per_token_over_unmasked_positions() -> None:
    logits, batch = lm_batch()
    task = LanguageModelingTask()
    metrics = evaluate_model(FixedLogits(logits), Batches(batch, batch), task, "val")
    keep = batch["labels"] != -100
    expected = F.cross_entropy(logits[keep], batch["labels"][keep]).item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert metrics["val/bits_per_token"] == pytest.approx(expected / math.log(2), rel=1e-6)
    hits = (logits.argmax(-1) == batch["labels"])[keep].float().mean().item()
    assert metrics["val/token_acc"] == pytest.approx(hits) and hits > 0
    training = task.training_loss(FixedLogits(logits), batch)
    assert training.item() == pytest.approx(expected, rel=1e-6)
    assert task.batch_units(batch) == 10 and task.unit == "tokens"


def test_an_auxiliary_loss_is_added_and_logged_with_expert_shares() -> None:
    logits, batch = lm_batch()
    task = LanguageModelingTask()
    plain = task.training_loss(FixedLogits(logits), batch)
    with_aux = task.training_loss(FixedLogits(logits, aux=torch.tensor(0.5)), batch)
    assert with_aux.item() == pytest.approx(plain.item() + 0.5)
    logged = task.train_metrics()
    assert logged["aux_loss"].item() == pytest.approx(0.5)
    assert logged["moe/layer0/expert0"].item() == pytest.approx(0.75)
    assert task.train_metrics() == {}  # reset after each logging interval


def test_batches_a_task_cannot_use_are_named_in_one_line() -> None:
    with pytest.raises(DataError, match=r"expects dict batches .* gives a tuple"):
        LanguageModelingTask().check_batch((torch.zeros(2), torch.zeros(2)))
    with pytest.raises(DataError, match=r"gives a dict with keys \['input_ids', 'text'\]"):
        ClassificationTask().check_batch({"input_ids": 1, "text": 2})
    with pytest.raises(ConfigError, match="ignore_index"):
        LanguageModelingTask(loss=nn.CrossEntropyLoss(ignore_index=0))


def test_classification_uses_the_configured_loss() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(3, (6,))
    model = nn.Linear(4, 3)
    smoothed = ClassificationTask(loss=nn.CrossEntropyLoss(label_smoothing=0.3))
    expected = F.cross_entropy(model(x), y, label_smoothing=0.3)
    assert smoothed.training_loss(model, (x, y)).item() == pytest.approx(expected.item())
    metrics = evaluate_model(model, Batches((x, y)), ClassificationTask(), "test")
    assert metrics["test/acc"] == pytest.approx((model(x).argmax(1) == y).float().mean().item())
