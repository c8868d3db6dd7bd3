from __future__ import annotations

import functools

import torch

from trainer.models.cnn import CNN
from trainer.optim import build_optimizer


def test_no_weight_decay_on_biases_and_norm_weights() -> None:
    model = CNN(in_shape=(1, 28, 28), num_classes=10)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3), model, 0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    norm_and_bias = {
        id(p) for n, p in model.named_parameters() if n.endswith("bias") or p.ndim == 1
    }
    assert {id(p) for p in no_decay["params"]} == norm_and_bias
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
