"""Batch iterators whose data order is a pure function of (seed, epoch, batch).

That property is what makes resume exact: a run restarted at batch k of epoch e
rebuilds the same permutation and continues from batch k, with nothing to skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of `epoch`, from a generator seeded by (seed, epoch) alone."""
    generator = torch.Generator()
    # A large odd multiplier keeps (seed, epoch) pairs from colliding for any realistic range.
    generator.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_samples, generator=generator)


class _Normalize:
    """uint8 images -> float, scaled to [0, 1] then standardized, in one fused pass."""

    def __init__(self, mean: float, std: float) -> None:
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self.scale).sub_(self.shift)


class InMemoryBatches:
    """Batches cut by index from uint8 tensors already on the training device.

    With `world_size > 1` every step takes one global batch of
    `batch_size * world_size` samples from the shared order and gives each rank a
    disjoint chunk, so the union over ranks is what one process would see.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: float,
        std: float,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.normalize = _Normalize(mean, std)
        global_batch = batch_size * world_size
        n = len(labels)
        num = n // global_batch if drop_last else -(-n // global_batch)
        self.num_batches = min(num, limit_batches) if limit_batches else num
        self.global_batch = global_batch

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = None
        if self.shuffle:
            order = epoch_permutation(len(self.labels), self.seed, epoch).to(self.images.device)
        for b in range(start_batch, self.num_batches):
            lo = b * self.global_batch
            hi = min(lo + self.global_batch, len(self.labels))
            if self.world_size > 1:
                bounds = torch.arange(lo, hi).tensor_split(self.world_size)[self.rank]
                lo, hi = int(bounds[0]), int(bounds[-1]) + 1
            if order is None:  # evaluation: contiguous slices are views, no gather needed
                x, y = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.images[idx], self.labels[idx]
            yield self.normalize(x), y


class _IndexedImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return self.images[i], self.labels[i]


class LoaderBatches:
    """The same order and sharding through a DataLoader, for data that lives off-device.

    Workers assemble uint8 batches on the CPU; normalization still runs on the
    training device after the copy.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: float,
        std: float,
        shuffle: bool,
        device: torch.device,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
        num_workers: int = 0,
    ) -> None:
        # The same order function as InMemoryBatches, over indices.
        self._plan = BatchPlan(
            len(labels), batch_size, shuffle, seed, drop_last, rank, world_size, limit_batches
        )
        self.dataset = _IndexedImages(images, labels)
        self.device, self.num_workers = device, num_workers
        self.normalize = _Normalize(mean, std)

    def __len__(self) -> int:
        return len(self._plan)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        plan = [idx.tolist() for idx in self._plan.epoch(epoch, start_batch) if len(idx)]
        # Without its own generator a DataLoader draws its worker seed from the global
        # torch RNG each epoch, and a run resumed mid-epoch would draw it at another point.
        generator = torch.Generator().manual_seed((self._plan.seed * 1_000_003 + epoch) % 2**63)
        loader = DataLoader(
            self.dataset,
            batch_sampler=plan,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=generator,
        )
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield self.normalize(x), y


class BatchPlan:
    """Which samples each batch of an epoch holds, on this rank: the order function alone.

    The same rule as InMemoryBatches (one global batch per step, split into
    disjoint rank chunks), over indices, for data that is not a pair of tensors.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
    ) -> None:
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        num = (
            num_samples // self.global_batch if drop_last else -(-num_samples // self.global_batch)
        )
        self.num_batches = min(num, limit_batches) if limit_batches else num

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """This rank's sample indices for each batch from `start_batch` on."""
        order = epoch_permutation(self.num_samples, self.seed, epoch) if self.shuffle else None
        for b in range(start_batch, self.num_batches):
            lo = b * self.global_batch
            hi = min(lo + self.global_batch, self.num_samples)
            chunk = torch.arange(lo, hi).tensor_split(self.world_size)[self.rank]
            yield chunk if order is None else order[chunk]


def to_device(batch: object, device: torch.device) -> object:
    """A batch of any structure (tensor, tuple, list, dict) moved to `device` as a whole."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


@dataclass(frozen=True)
class SplitBatches:
    """The batch iterators of one run, as this rank sees them."""

    train: Any
    val: Any | None
    test: Any | None
    global_batch: int  # samples per optimizer micro-step over all ranks
    seed: int  # the training order is a function of (seed, epoch, batch)
