"""Image-classification data: verified IDX files -> uint8 tensors -> batches.

The decoded training set of MNIST is 47 MB of uint8, so by default it lives on
the training device and batches are index slices (no workers, no per-sample
Python). `in_memory: false` switches to a DataLoader with the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from trainer.data.batches import InMemoryBatches, LoaderBatches
from trainer.data.idx import parse_idx
from trainer.data.sources import FASHION_MNIST, MNIST, DatasetSpec, load_dataset_bytes
from trainer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


class ImageClassificationData:
    has_test = True
    tokenizer = None

    def __init__(
        self,
        name: str,
        data_dir: str,
        shape: Sequence[int],
        num_classes: int,
        batch_size: int,
        eval_batch_size: int,
        val_size: int = 5000,
        split_seed: int = 0,
        mean: float = 0.0,
        std: float = 1.0,
        in_memory: bool = True,
        num_workers: int = 0,
        download: bool = True,
        mirrors: Sequence[str] = (),
        download_timeout: float = 10.0,
        download_retries: int = 2,
    ) -> None:
        if name not in SPECS:
            raise ConfigError(f"data.name={name!r} is unknown; choose one of {sorted(SPECS)}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(
                f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} "
                "must be >= 1"
            )
        if std <= 0:
            raise ConfigError(f"data.std={std} must be > 0")
        self.spec = SPECS[name]
        self.data_dir = data_dir
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.val_size, self.split_seed = val_size, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.mean, self.std = mean, std
        self.in_memory, self.num_workers = in_memory, num_workers
        self.download, self.mirrors = download, list(mirrors)
        self.download_timeout, self.download_retries = download_timeout, download_retries
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, device: torch.device) -> None:
        """Fetch, verify and decode the files; split train/val; move to `device`."""
        raw = load_dataset_bytes(
            self.spec,
            self.data_dir,
            mirrors=self.mirrors,
            download=self.download,
            timeout=self.download_timeout,
            retries=self.download_retries,
        )
        train_x, train_y = self._decode(raw, "train")
        test_x, test_y = self._decode(raw, "test")
        if not 0 <= self.val_size < len(train_y):
            raise ConfigError(
                f"data.val_size={self.val_size} must be >= 0 and smaller than the "
                f"{len(train_y)} training images"
            )
        # The split depends on split_seed only, never on the run seed, so every run
        # of a sweep validates on the same images.
        perm = torch.randperm(
            len(train_y), generator=torch.Generator().manual_seed(self.split_seed)
        )
        val_idx, train_idx = (
            perm[: self.val_size].sort().values,
            perm[self.val_size :].sort().values,
        )
        target = device if self.in_memory else torch.device("cpu")
        self.splits = {
            "train": (train_x[train_idx].to(target), train_y[train_idx].to(target)),
            "val": (train_x[val_idx].to(target), train_y[val_idx].to(target)),
            "test": (test_x.to(target), test_y.to(target)),
        }
        self.device = device
        log.info(
            "%s: %d train, %d val, %d test images on %s",
            self.spec.name,
            len(train_idx),
            len(val_idx),
            len(test_y),
            target,
        )

    def _decode(self, raw: dict[str, bytes], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = parse_idx(raw[f"{split}_images"], f"{split}_images")
        labels = parse_idx(raw[f"{split}_labels"], f"{split}_labels").long()
        if len(images) != len(labels):
            raise DataError(
                f"{self.spec.name} {split} set has {len(images)} images but {len(labels)} "
                "labels; re-download the files (delete them and run again)"
            )
        if tuple(images.shape[1:]) != self.shape[1:] or images.ndim != 3:
            raise ConfigError(
                f"data.shape={list(self.shape)} does not match the {self.spec.name} images "
                f"of shape {list(images.shape[1:])}"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but the {self.spec.name} {split} labels "
                f"range from {int(labels.min())} to {int(labels.max())}; set "
                f"data.num_classes={int(labels.max()) + 1}"
            )
        return images.view(len(images), *self.shape), labels

    def batches(
        self,
        split: str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
    ) -> InMemoryBatches | LoaderBatches:
        """Training batches are shuffled per epoch and drop the last partial batch."""
        if not self.splits:
            raise RuntimeError("call setup() before batches()")
        images, labels = self.splits[split]
        train = split == "train"
        kwargs = dict(
            batch_size=self.batch_size if train else self.eval_batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=train,
            seed=seed,
            drop_last=train,
            rank=rank,
            world_size=world_size,
            limit_batches=limit_batches,
        )
        if self.in_memory:
            return InMemoryBatches(images, labels, **kwargs)
        return LoaderBatches(
            images, labels, device=self.device, num_workers=self.num_workers, **kwargs
        )
