"""Every option of every config group composes, instantiates and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import DATA_DIR, REPO, compose_config

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in (REPO / "configs").iterdir()
    if group.is_dir() and group.name not in ("hydra", "__pycache__")
}


# Options that only make sense together with others (a task needs fitting data and model).
LM_SYNTHETIC = ["data=synthetic", "data.kind=language_modeling", "task=language_modeling"]
COMPANIONS: dict[str, list[str]] = {
    "task=language_modeling": LM_SYNTHETIC[:2] + ["model=gpt"],
    "model=gpt": LM_SYNTHETIC,
    "model=gpt_moe": LM_SYNTHETIC,
    "data=shakespeare_char": ["task=language_modeling", "model=gpt"],
    "data=shakespeare_complete": ["task=language_modeling", "model=gpt"],
    # The nanoGPT-sized model on one batch of two windows (its 64 cost CPU time, not coverage).
    "experiment=shakespeare_char": ["data.batch_size=2"],
}


def test_every_group_has_options() -> None:
    assert {"cnn", "hf_causal_lm", "mlp", "smollm2_135m_instruct"} <= set(GROUPS["model"])
    assert {"fashion_mnist", "mnist", "synthetic"} <= set(GROUPS["data"])
    assert {"classification", "language_modeling"} <= set(GROUPS["task"])
    assert GROUPS["optimizer"] == ["adam", "adamw", "sgd"]
    assert GROUPS["scheduler"] == ["cosine", "none", "onecycle", "step"]
    assert set(GROUPS["trainer"]) == {"default", "debug"}
    assert set(GROUPS["logger"]) == {"none", "tensorboard"}
    assert {"frozen_backbone", "full", "lora", "lora_lm", "none"} <= set(GROUPS["finetune"])


# Options that need a pre-trained model or a user's dataset, each composed and run where
# that exists: the value says where.
COVERED_ELSEWHERE = {
    "model=hf_causal_lm": "tests/models/test_hf.py",
    "model=smollm2_135m_instruct": "tests/models/test_smollm2.py",
    "data=chatterbot_sft": "tests/chat/test_chat_configs.py",
    "data=chatterbot_dpo": "tests/chat/test_chat_configs.py",
    "data=jsonl_sft": "tests/chat/test_chat_configs.py",
    "data=jsonl_dpo": "tests/chat/test_chat_configs.py",
    "task=dpo": "tests/chat/test_chat_configs.py",
    "data=dataset": "tests/test_loop.py, tests/test_examples.py",
    "data=shakespeare_complete_hf": "test_domain_adaptation_data_uses_the_model_tokenizer below",
    # Run end to end on a tiny llama (and as README commands, shortened, by the README test).
    "experiment=smollm2_sft_chatterbot": "tests/chat/test_recipes.py",
    "experiment=smollm2_domain_shakespeare": "tests/chat/test_recipes.py",
    "experiment=smollm2_dpo_chatterbot": "tests/chat/test_recipes.py",
}


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g, options in GROUPS.items()
        for o in options
        if f"{g}={o}" not in COVERED_ELSEWHERE
    ],
)
def test_each_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"{group}={option}", *COMPANIONS.get(f"{group}={option}", [])], tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    task = instantiate(cfg.task, loss=instantiate(cfg.loss))
    default_kind = "classification" if "shape" in cfg.data else "language_modeling"
    if cfg.data.get("kind", default_kind) == "language_modeling":  # one real batch, task and model
        data = instantiate(cfg.data, _convert_="all")
        data.setup(torch.device("cpu"))
        batch = next(iter(data.batches("train").epoch(0)))
        task.check_batch(batch)
        assert task.training_loss(instantiate(cfg.model, _convert_="all"), batch).ndim == 0
        return
    model = instantiate(cfg.model, _convert_="all")
    logits = model(torch.zeros(2, *cfg.data.shape))
    assert logits.shape == (2, cfg.data.num_classes)
    optimizer = instantiate(cfg.optimizer, _convert_="all")([torch.nn.Parameter(torch.zeros(3))])
    if cfg.scheduler.get("_target_"):
        scheduler = instantiate(cfg.scheduler, _convert_="all")(
            optimizer, total_steps=100, steps_per_epoch=10
        )
        for _ in range(100):
            optimizer.step()
            scheduler.step()
    assert isinstance(instantiate(cfg.loss), torch.nn.Module)


def test_defaults_are_mlp_on_mnist(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.model._target_.endswith("MLP") and cfg.data.name == "MNIST"
    # Model shape comes from the data config by interpolation.
    cfg = compose_config(["data=fashion_mnist", "data.num_classes=7"], tmp_path)
    assert cfg.model.num_classes == 7 and cfg.data.name == "FashionMNIST"


@pytest.mark.parametrize(
    "override",
    ["trainer.max_epoch=3", "data.batchsize=3", "checkpoint.every_epoch=1", "paths.dataa=x"],
)
def test_misspelled_key_fails_at_composition(override: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config([override], tmp_path)


def test_misspelled_key_in_a_yaml_file_fails(tmp_path: Path) -> None:
    """A user's own trainer preset with a typo is caught by the schema too."""
    from hydra import compose, initialize_config_dir

    configs = tmp_path / "configs"
    (configs / "trainer").mkdir(parents=True)
    (configs / "trainer" / "mine.yaml").write_text(
        "defaults:\n  - /schema/trainer@_here_\n  - _self_\nmax_epoch: 3\n"
    )
    with initialize_config_dir(str(configs), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="max_epoch"):
            compose("trainer/mine")


def test_data_dir_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    monkeypatch.setenv("TRAINER_DATA_DIR", "/somewhere/else")
    with initialize_config_module("trainer.configs", version_base="1.3"):
        assert compose("train").paths.data_dir == "/somewhere/else"
    monkeypatch.delenv("TRAINER_DATA_DIR")
    with initialize_config_module("trainer.configs", version_base="1.3"):
        assert compose("train").paths.data_dir == "./data"


def test_packaged_configs_list_matches_source_tree() -> None:
    """pyproject lists packages by hand; a new subpackage must be added there."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        "trainer"
        + ("." + ".".join(p.parent.relative_to(REPO / "src" / "trainer").parts)).rstrip(".")
        for p in (REPO / "src" / "trainer").rglob("__init__.py")
    }
    plugins = {
        "hydra_plugins." + p.parent.name
        for p in (REPO / "src" / "hydra_plugins").glob("*/__init__.py")
    }
    assert on_disk | plugins | {"trainer.configs"} == listed


def test_domain_adaptation_data_uses_the_model_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    """data=shakespeare_complete_hf tokenizes with the pre-trained model's own tokenizer."""
    text = tmp_path / "corpus.txt"
    text.write_text((DATA_DIR / "tinyshakespeare" / "input.txt").read_text()[:50000])
    cfg = compose_config(
        [
            "model=hf_causal_lm",
            f"model.name_or_path={tiny_llama}",
            "data=shakespeare_complete_hf",
            f"data.corpus={text}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.block_size=32",
            "task=language_modeling",
        ],
        tmp_path,
    )
    data = instantiate(cfg.data, _convert_="all")
    data.setup(torch.device("cpu"))
    assert data.tokenizer.name_or_path == str(tiny_llama)
    batch = next(iter(data.batches("train").epoch(0)))
    task = instantiate(cfg.task, loss=instantiate(cfg.loss))
    task.check_batch(batch)
    assert task.training_loss(instantiate(cfg.model, _convert_="all"), batch).ndim == 0
