"""DatasetData: any map-style Dataset gets the order, sharding and resume guarantees."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from trainer.data.dataset import DatasetData
from trainer.errors import ConfigError

CPU = torch.device("cpu")


class Numbered(Dataset):
    """Item i is a dict holding i, so batches show exactly which items they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i), "features": torch.full((3,), float(i))}


def indices(batches, epoch: int, start: int = 0) -> list[list[int]]:
    return [b["index"].tolist() for b in batches.epoch(epoch, start)]


def make(n: int = 100, **kwargs) -> DatasetData:
    data = DatasetData(Numbered(n), **{"val_size": 0.2, "batch_size": 8, **kwargs})
    data.setup(CPU)
    return data


def test_order_is_a_function_of_seed_and_epoch_and_resume_continues_exactly() -> None:
    train = make().batches("train", seed=3)
    again = make().batches("train", seed=3)
    assert indices(train, 0) == indices(again, 0)
    assert indices(train, 0) != indices(train, 1)  # reshuffled per epoch
    assert indices(train, 0) != indices(make().batches("train", seed=4), 0)
    assert indices(train, 1, start=4) == indices(train, 1)[4:]  # resume mid-epoch
    assert len(train) == 80 // 8 and all(len(b) == 8 for b in indices(train, 0))


def test_rank_shards_are_disjoint_and_together_are_one_process_global_batch() -> None:
    data = make(batch_size=4)
    ranks = [data.batches("train", seed=1, rank=r, world_size=2) for r in (0, 1)]
    single = DatasetData(Numbered(100), val_size=0.2, batch_size=8)
    single.setup(CPU)
    whole = indices(single.batches("train", seed=1), 0)
    for step, (a, b) in enumerate(zip(indices(ranks[0], 0), indices(ranks[1], 0), strict=True)):
        assert not set(a) & set(b)
        assert a + b == whole[step]


def test_validation_is_held_out_by_split_seed_or_given() -> None:
    data = make()
    val = {i for b in indices(data.batches("val"), 0) for i in b}
    train = {i for b in indices(data.batches("train"), 0) for i in b}
    assert len(val) == 20 and not val & train
    assert val == {i for b in indices(make().batches("val"), 0) for i in b}
    assert val != {i for b in indices(make(split_seed=1).batches("val"), 0) for i in b}
    given = make(val_dataset=Numbered(7), val_size=0.5)
    assert given.val_size == 7 and len(given.splits["train"]) == 100
    assert not make(val_size=0).val_size and not make().has_test


def test_collate_fn_and_workers_give_the_same_batches() -> None:
    def keep_features(items: list[dict]) -> dict[str, torch.Tensor]:
        return {"index": torch.stack([item["index"] for item in items])}

    plain = indices(make().batches("train", seed=2), 0)
    assert indices(make(collate_fn=keep_features).batches("train", seed=2), 0) == plain
    assert indices(make(num_workers=1).batches("train", seed=2), 0) == plain


def test_things_that_are_not_datasets_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="data.dataset is a int, not a map-style Dataset"):
        DatasetData(3)
    with pytest.raises(ConfigError, match="must leave training data"):
        DatasetData(Numbered(10), val_size=10)
