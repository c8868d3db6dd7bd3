"""Each experiment config is a working recipe: a short run of it learns."""

from __future__ import annotations

import pytest

from trainer.run import train

# Batches of 64 (the recipes' are 256), to keep each case at ~10 s on one core.
SHORT = [
    "data.batch_size=64",
    "data.eval_batch_size=500",
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


@pytest.mark.parametrize(
    "experiment,same_as",
    [
        ("mnist_mlp", []),
        ("mnist_cnn", ["model=cnn"]),
        ("fashion_cnn", ["data=fashion_mnist", "model=cnn"]),
    ],
)
def test_experiment_is_the_recipe_measured_in_the_readme(
    experiment: str, same_as: list[str], tmp_path
) -> None:
    """The README's results table measures the plain commands; each experiment pins them."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    pinned = compose_config([f"experiment={experiment}"], tmp_path)
    plain = compose_config(same_as, tmp_path)
    assert pinned.seed == plain.seed
    for section in ("model", "data", "loss", "optimizer", "scheduler", "trainer"):
        assert OmegaConf.to_container(pinned[section]) == OmegaConf.to_container(plain[section])
