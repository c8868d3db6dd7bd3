"""Each experiment config is a working recipe: a short run of it learns."""

from __future__ import annotations

import pytest

from trainer.run import train

SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=2",
    "trainer.test_after_fit=false",
    "trainer.progress_bar=false",
    "logger=none",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,model,data",
    [
        ("mnist_mlp", "MLP", "MNIST"),
        ("mnist_cnn", "CNN", "MNIST"),
        ("fashion_cnn", "CNN", "FashionMNIST"),
    ],
)
def test_experiment_recipe_learns_on_a_short_run(make_config, experiment, model, data) -> None:
    cfg = make_config(f"experiment={experiment}", *SHORT)
    assert cfg.model._target_.endswith(model) and cfg.data.name == data
    # 20 steps of the recipe take it from chance (0.1) to well past it.
    assert train(cfg) > 0.5
