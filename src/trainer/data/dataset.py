"""Any map-style `torch.utils.data.Dataset`, with the guarantees of the built-in data.

`data._target_=trainer.data.DatasetData` wraps the user's own dataset (or a
library's): the order is a pure function of (seed, epoch, batch) through
`BatchPlan`, so resume mid-epoch is exact and DDP shards are disjoint;
DataLoader workers, pinned memory and a `collate_fn` (for dict batches) are
options; the validation set is held out by `split_seed` or given as its own
dataset. Batches of any structure reach the device as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.data.batches import BatchPlan, to_device
from trainer.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class DatasetBatches:
    """One split's batches through a DataLoader driven by a BatchPlan."""

    def __init__(
        self,
        dataset: Dataset,
        plan: BatchPlan,
        device: torch.device,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
    ) -> None:
        self.dataset, self.plan, self.device = dataset, plan, device
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.pin_memory = pin_memory and device.type == "cuda"

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        # A rank's chunk of the last evaluation batch can be empty: nothing to score.
        plan = [idx.tolist() for idx in self.plan.epoch(epoch, start_batch) if len(idx)]
        # Seeded per epoch: worker seeds (for random augmentation) do not depend on
        # where the global RNG stood, which differs in a run resumed mid-epoch.
        generator = torch.Generator().manual_seed((self.plan.seed * 1_000_003 + epoch) % 2**63)
        loader = DataLoader(
            self.dataset,
            batch_sampler=plan,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        for batch in loader:
            yield to_device(batch, self.device)


class DatasetData:
    has_test: bool

    def __init__(
        self,
        dataset: Dataset,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        for name, value in (("dataset", dataset), ("val_dataset", val_dataset),
                            ("test_dataset", test_dataset)):  # fmt: skip
            if value is not None and not (
                hasattr(value, "__getitem__") and hasattr(value, "__len__")
            ):
                raise ConfigError(
                    f"data.{name} is a {type(value).__name__}, not a map-style Dataset "
                    "(one with __getitem__ and __len__)"
                )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(
                f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} "
                "must be >= 1"
            )
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
        self.dataset, self.given_val, self.test_dataset = dataset, val_dataset, test_dataset
        self.split_seed = split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory
        self.drop_last = drop_last
        self.has_test = test_dataset is not None
        self.tokenizer = getattr(dataset, "tokenizer", None)
        self.val_size = len(val_dataset) if val_dataset is not None else self._held_out(val_size)
        self.splits: dict[str, Dataset] = {}

    def _held_out(self, val_size: int | float) -> int:
        total = len(self.dataset)
        count = round(val_size * total) if isinstance(val_size, float) else int(val_size)
        if not 0 <= count < total:
            raise ConfigError(
                f"data.val_size={val_size} must leave training data: the dataset has {total} "
                "items (give a count >= 0 or a fraction in [0, 1))"
            )
        return count

    def setup(self, device: torch.device) -> None:
        self.device = device
        train, val = self.dataset, self.given_val
        if val is None and self.val_size:
            # Depends on split_seed alone: every run of a sweep validates on the same items.
            perm = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(self.split_seed)
            )
            val = Subset(train, perm[: self.val_size].sort().values.tolist())
            train = Subset(train, perm[self.val_size :].sort().values.tolist())
        self.splits = {"train": train}
        if val is not None:
            self.splits["val"] = val
        if self.test_dataset is not None:
            self.splits["test"] = self.test_dataset
        if len(train) == 0:
            raise DataError(f"data.dataset ({type(self.dataset).__name__}) is empty")
        log.info(
            "%s: %s", type(self.dataset).__name__,
            ", ".join(f"{len(d)} {name}" for name, d in self.splits.items()),
        )  # fmt: skip

    def batches(
        self,
        split: str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
    ) -> DatasetBatches:
        if not self.splits:
            raise RuntimeError("call setup() before batches()")
        dataset = self.splits[split]
        train = split == "train"
        plan = BatchPlan(
            len(dataset),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=seed,
            drop_last=train and self.drop_last,
            rank=rank,
            world_size=world_size,
            limit_batches=limit_batches,
        )
        return DatasetBatches(
            dataset, plan, self.device, self.collate_fn, self.num_workers, self.pin_memory
        )
