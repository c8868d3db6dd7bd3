"""The `data` config group: a data module gives each split's batches (see DatasetData).

Built in: verified image sets (datamodule.py), any map-style Dataset
(dataset.py), random tensors for tests (synthetic.py)."""

from trainer.data.dataset import DatasetData

__all__ = ["DatasetData"]
