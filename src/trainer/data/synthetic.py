"""`data=synthetic`: random tensors of a configured shape, made in milliseconds.

For the loop's unit tests and for trying a model without a dataset. The data
is learnable, so a test can tell training from noise: classification labels
come from a fixed random linear teacher, and token sequences follow a fixed
random successor table (each token's next one is determined), which a model
learns to near-zero loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from trainer.data.batches import BatchPlan
from trainer.errors import ConfigError

KINDS = ("classification", "language_modeling")


class TensorBatches:
    """Batches cut by index from tensors already on the device (tuple or dict batches)."""

    def __init__(self, tensors: dict[str, torch.Tensor], plan: BatchPlan, as_dict: bool) -> None:
        self.tensors, self.plan, self.as_dict = tensors, plan, as_dict

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        for idx in self.plan.epoch(epoch, start_batch):
            if not len(idx):
                continue
            parts = {k: v[idx.to(v.device)] for k, v in self.tensors.items()}
            yield parts if self.as_dict else tuple(parts.values())


class SyntheticData:
    has_test = True

    def __init__(
        self,
        kind: str = "classification",
        shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        vocab_size: int = 32,
        block_size: int = 16,
        size: int = 2048,
        val_size: int = 256,
        test_size: int = 256,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"data.kind={kind!r} must be one of {', '.join(KINDS)}")
        for key, value in (("size", size), ("batch_size", batch_size),
                           ("eval_batch_size", eval_batch_size)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"data.{key}={value} must be >= 1")
        self.kind, self.shape, self.num_classes = kind, tuple(shape), num_classes
        self.vocab_size, self.block_size = vocab_size, block_size
        self.sizes = {"train": size, "val": val_size, "test": test_size}
        self.val_size, self.has_test = val_size, test_size > 0
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.splits: dict[str, dict[str, torch.Tensor]] = {}

    def setup(self, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        make = self._classification if self.kind == "classification" else self._tokens
        self.splits = {
            split: {k: v.to(device) for k, v in make(n, generator).items()}
            for split, n in self.sizes.items()
        }

    def _classification(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_teacher"):
            features = int(torch.tensor(self.shape).prod())
            self._teacher = torch.randn(features, self.num_classes, generator=generator)
        x = torch.randn(n, *self.shape, generator=generator)
        return {"x": x, "y": (x.flatten(1) @ self._teacher).argmax(dim=1)}

    def _tokens(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_successor"):
            self._successor = torch.randperm(self.vocab_size, generator=generator)
        tokens = torch.empty(n, self.block_size + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab_size, (n,), generator=generator)
        for t in range(self.block_size):
            tokens[:, t + 1] = self._successor[tokens[:, t]]
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def batches(
        self,
        split: str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
    ) -> TensorBatches:
        if not self.splits:
            raise RuntimeError("call setup() before batches()")
        tensors = self.splits[split]
        train = split == "train"
        plan = BatchPlan(
            len(next(iter(tensors.values()))),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=seed,
            drop_last=train,
            rank=rank,
            world_size=world_size,
            limit_batches=limit_batches,
        )
        return TensorBatches(tensors, plan, as_dict=self.kind == "language_modeling")
