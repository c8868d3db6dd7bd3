"""Batch order is a pure function of (seed, epoch, batch); shards are disjoint and complete."""

from __future__ import annotations

import torch

from trainer.data.batches import InMemoryBatches, LoaderBatches, epoch_permutation


def make(n: int = 103, **kwargs) -> InMemoryBatches:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    labels = torch.arange(n)
    defaults = dict(batch_size=10, mean=0.0, std=1.0 / 255, shuffle=True, seed=7, drop_last=True)
    return InMemoryBatches(images, labels, **{**defaults, **kwargs})


def test_order_depends_only_on_seed_and_epoch() -> None:
    assert torch.equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 3))
    assert not torch.equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 4))
    assert not torch.equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 2, 3))


def test_resuming_mid_epoch_rebuilds_the_same_batches() -> None:
    batches = make()
    full = [y for _, y in batches.epoch(2)]
    tail = [y for _, y in batches.epoch(2, start_batch=4)]
    assert len(full) == 10 and len(tail) == 6
    assert all(torch.equal(a, b) for a, b in zip(full[4:], tail, strict=True))


def test_images_are_normalized_on_the_fly() -> None:
    batches = make(mean=0.5, std=2.0)
    x, y = next(batches.epoch(0))
    assert x.dtype == torch.float32
    expected = (y.float() / 255 - 0.5) / 2.0
    assert torch.allclose(x.flatten(), expected)


def test_rank_shards_are_disjoint_and_cover_the_global_batches() -> None:
    single = make(batch_size=10)
    shards = [make(batch_size=5, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(single)
    for step, (_, y_all) in enumerate(single.epoch(1)):
        parts = [list(s.epoch(1, start_batch=step))[0][1] for s in shards]
        assert torch.equal(torch.cat(parts), y_all)


def test_eval_batches_keep_every_sample_once() -> None:
    batches = make(shuffle=False, drop_last=False, world_size=3, rank=0)
    seen = torch.cat(
        [
            y
            for r in range(3)
            for _, y in make(shuffle=False, drop_last=False, world_size=3, rank=r).epoch(0)
        ]
    )
    assert sorted(seen.tolist()) == list(range(103)) and len(batches) == 4


def test_dataloader_path_yields_the_same_batches() -> None:
    n = 64
    images = torch.randint(0, 255, (n, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(n)
    kwargs = dict(batch_size=8, mean=0.1, std=0.3, shuffle=True, seed=3, drop_last=True)
    memory = InMemoryBatches(images, labels, **kwargs)
    loader = LoaderBatches(images, labels, device=torch.device("cpu"), num_workers=1, **kwargs)
    for (xa, ya), (xb, yb) in zip(memory.epoch(5, 2), loader.epoch(5, 2), strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
