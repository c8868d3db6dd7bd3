"""The one loop on data=synthetic: any task, in seconds, with provenance recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config.checks import validate_train_config
from trainer.errors import ConfigError, DataError
from trainer.run import train

SYNTHETIC = ["data=synthetic", "trainer.max_epochs=3", "trainer.log_every_n_steps=8"]
LM = [
    *SYNTHETIC,
    "data.kind=language_modeling",
    "task=language_modeling",
    "~model",
    "+model._target_=examples.byo.my_project.CharGRU",
    "+model.vocab_size=32",
    "+model.hidden_size=32",
    "optimizer.lr=0.01",
]


def results(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())


def test_classification_on_synthetic_data_learns(make_config) -> None:
    cfg = make_config(*SYNTHETIC, "model.hidden_sizes=[64]", "data.shape=[1,4,4]")
    train(cfg)
    assert results(cfg)["metrics"]["test/acc"] > 0.6  # chance is 0.1


def test_a_language_model_trains_through_the_same_loop(make_config) -> None:
    from tests.test_trainer import read_scalars

    cfg = make_config(*LM)
    train(cfg)
    out = results(cfg)
    assert out["monitor"] == "val/loss"
    metrics = out["metrics"]
    # The successor table is learnable: loss falls far below chance (ln 32 = 3.47).
    assert metrics["val/loss"] < 1.5 and metrics["val/token_acc"] > 0.5
    assert metrics["val/ppl"] == pytest.approx(2.718281828 ** metrics["val/loss"], rel=1e-6)
    scalars = read_scalars(Path(cfg.paths.output_dir) / "tensorboard")
    assert "train/tokens_per_s" in scalars and "train/samples_per_s" not in scalars
    assert "val/bits_per_token" in scalars and "test/token_acc" in scalars


def test_results_record_what_reproduces_the_run(make_config) -> None:
    cfg = make_config(*SYNTHETIC, "trainer.max_epochs=1", "seed=7")
    train(cfg)
    record = results(cfg)["provenance"]
    assert record["seed"] == 7 and record["world_size"] == 1
    assert record["config"]["data"]["kind"] == "classification"
    assert set(record["versions"]) == {"python", "torch", "hydra-core", "trainer"}
    assert record["versions"]["torch"] and record["device"].startswith("cpu")
    assert record["git"] is None or set(record["git"]) == {"commit", "dirty"}
    assert record["command"]


def test_setup_errors_name_the_problem(make_config) -> None:
    cfg = make_config(*SYNTHETIC, "+data.nope=1")
    with pytest.raises(ConfigError, match=r"data.nope is not an argument of .*SyntheticData"):
        validate_train_config(cfg)
    no_data = [o for o in LM if not o.startswith("data")]
    cfg = make_config(*no_data, "data=dataset", "data.dataset={_target_:no_such_module.Data}")
    with pytest.raises(ConfigError, match=r"data.dataset._target_=no_such_module.Data cannot be"):
        validate_train_config(cfg)
    # Classification on token windows: the task names what it got and what it expects.
    cfg = make_config(*SYNTHETIC, "data.kind=language_modeling")
    with pytest.raises(DataError, match=r"classification expects .* gives a dict"):
        train(cfg)
    # A model that does not fit the data fails in the dry forward, before training.
    cfg = make_config(*LM, "model.vocab_size=8")
    with pytest.raises(ConfigError, match="CharGRU does not fit LanguageModelingTask"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_val_at_start_logs_the_starting_weights_once_and_never_as_the_best(make_config) -> None:
    from tests.test_trainer import read_scalars

    common = [*LM, "trainer.val_at_start=true", "scheduler=none"]
    cfg = make_config(*common, "trainer.max_epochs=1")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    val = dict(read_scalars(out / "tensorboard")["val/loss"])
    steps = results(cfg)["steps"]
    assert sorted(val) == [0, steps]
    assert val[0] > val[steps] + 0.5  # the untrained model at step 0, the trained one after
    assert results(cfg)["best_step"] == steps

    # Continued from a checkpoint, it does not validate the (no longer starting) weights first.
    ckpt = out / "checkpoints" / "last.pt"
    more = make_config(
        *common, "trainer.max_epochs=2", f"ckpt_path={ckpt}", output_dir=out / "more"
    )
    train(more)
    assert [s for s, _ in read_scalars(out / "more" / "tensorboard")["val/loss"]] == [2 * steps]
