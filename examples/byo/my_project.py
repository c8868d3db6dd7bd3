"""Bring your own model and data: one file, no framework classes to subclass.

A character-level GRU language model on any text file, trained by the
framework's loop with everything it gives: TensorBoard, checkpoints, exact
resume, `trainer.devices=2`, `-m` sweeps. See README.md beside this file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


class CharWindows(Dataset):
    """Non-overlapping windows of a text file as {input_ids, labels} dicts.

    `labels[t]` is the character after `input_ids[t]`: what the language-modeling
    task predicts. The vocabulary is the file's sorted characters."""

    def __init__(self, path: str, block_size: int = 64) -> None:
        text = Path(path).expanduser().read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.ids[i * self.block_size : (i + 1) * self.block_size + 1]
        return {"input_ids": window[:-1], "labels": window[1:]}


class CharGRU(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int = 128, num_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(self.embed(input_ids))
        return self.head(hidden)  # (batch, time, vocab) logits
