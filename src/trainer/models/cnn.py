"""A small convnet: conv blocks with batch norm, then a classifier head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.models.mlp import make_activation


class CNN(nn.Module):
    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
        dropout: float = 0.25,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        in_channels, height, width = self.in_shape
        blocks: list[nn.Module] = []
        for out_channels in channels:
            # Two 3x3 convs per block then a 2x2 pool: the classic VGG-style pattern.
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                make_activation(activation),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                make_activation(activation),
                nn.MaxPool2d(2),
            ]
            in_channels, height, width = out_channels, height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels * height * width, hidden_size),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
