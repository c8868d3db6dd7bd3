from __future__ import annotations

import pytest
import torch

from trainer.errors import ConfigError
from trainer.models.cnn import CNN
from trainer.models.mlp import MLP


@pytest.mark.parametrize("model_cls", [MLP, CNN])
def test_output_shape_and_gradients(model_cls) -> None:
    model = model_cls(in_shape=(1, 28, 28), num_classes=7)
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_layers_follow_config() -> None:
    model = MLP(in_shape=(1, 28, 28), num_classes=10, hidden_sizes=[16, 8], dropout=0.5)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 16), (16, 8), (8, 10)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2


def test_unknown_activation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="activation"):
        MLP(in_shape=(1, 28, 28), num_classes=10, activation="relu6")
