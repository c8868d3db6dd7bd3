"""The GPT: shapes, causality, tied weights, init, configs and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from trainer.checkpoint.io import load_checkpoint, load_model_state, save_checkpoint
from trainer.errors import ConfigError
from trainer.models.gpt import GPT
from trainer.optim import param_groups


def tiny(**kwargs) -> GPT:
    torch.manual_seed(0)
    sizes = {"vocab_size": 11, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    return GPT(**{**sizes, **kwargs})


def test_logits_shape_and_every_parameter_gets_a_gradient() -> None:
    model = tiny(bias=True, dropout=0.1)
    logits = model(torch.randint(0, 11, (3, 16)))
    assert logits.shape == (3, 16, 11)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_future_tokens_do_not_change_past_logits() -> None:
    model = tiny().eval()
    ids = torch.randint(0, 11, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 11
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert (before[:, 9:] - after[:, 9:]).abs().amax() > 1e-3


def test_sequences_longer_than_the_block_are_refused() -> None:
    with pytest.raises(ConfigError, match="block_size=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_input_and_output_embeddings_are_one_tensor_also_after_a_checkpoint(tmp_path) -> None:
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    save_checkpoint({"model": model.state_dict()}, tmp_path / "c.pt")
    fresh = tiny()
    torch.nn.init.zeros_(fresh.lm_head.weight)
    load_model_state(fresh, load_checkpoint(tmp_path / "c.pt")["model"], "c.pt")
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    torch.testing.assert_close(fresh.lm_head.weight, model.transformer.wte.weight)


def test_gpt2_init_scales_the_residual_projections() -> None:
    n_layer = 8
    model = tiny(n_layer=n_layer, n_embd=128, n_head=4, vocab_size=512, bias=True)
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert param.std().item() == pytest.approx(proj_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert torch.all(param == 0), name
        elif name.startswith(("transformer.ln", "transformer.h")) and "ln_" in name:
            assert torch.all(param == 1), name


def test_padding_keys_are_ignored_and_a_full_mask_changes_nothing() -> None:
    model = tiny().eval()
    ids = torch.randint(0, 11, (2, 10))
    ones = torch.ones_like(ids)
    torch.testing.assert_close(model(ids, attention_mask=ones), model(ids), rtol=0, atol=1e-5)
    mask = ones.clone()
    mask[:, :3] = 0  # left padding
    other_pads = ids.clone()
    other_pads[:, :3] = (ids[:, :3] + 5) % 11
    a, b = model(ids, attention_mask=mask), model(other_pads, attention_mask=mask)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, 3:], b[:, 3:], rtol=0, atol=1e-5)


def test_weight_decay_on_matrices_only_not_on_embeddings_norms_or_biases() -> None:
    model = tiny(bias=True, moe={"num_experts": 2, "every": 2})
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1)}
    assert groups["default/decay"] == {
        n
        for n in names.values()
        if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "w_fc", "w_proj"))
        or n.endswith("router.weight")
    }
    assert "transformer.wte.weight" in groups["default/no_decay"]  # also the tied lm_head
    assert "transformer.wpe.weight" in groups["default/no_decay"]
    assert len(names) == sum(len(g) for g in groups.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, r"model.n_embd=30 must be divisible by model.n_head=4"),
        ({"block_size": 0}, r"model.block_size=0 must be a positive integer"),
        ({"dropout": 1.0}, r"model.dropout=1.0 must be in \[0, 1\)"),
        ({"moe": {"num_experts": 2, "top_k": 3}}, r"model.moe.top_k=3 must be between 1 and"),
        ({"moe": {"num_experts": 0}}, r"model.moe.num_experts=0 must be >= 1"),
        ({"moe": {"every": 3}}, r"model.moe.every=3 must be between 1 and model.n_layer=2"),
        (
            {"moe": {"top_kk": 2}},
            r"unknown config key model.moe.top_kk; did you mean model.moe.top_k",
        ),
        ({"moe": {"capacity_factor": 0}}, r"model.moe.capacity_factor=0 must be > 0"),
    ],
)
def test_bad_sizes_are_one_line_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        tiny(**overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["gpt", "gpt_moe"])
def test_model_configs_build_from_the_data_sizes(tmp_path, name: str) -> None:
    cfg = compose_config([f"model={name}", "+data.vocab_size=65", "+data.block_size=64"], tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    assert (model.vocab_size, model.block_size) == (65, 64)
    dense = 804_096  # nanoGPT's CPU recipe: 0.80M parameters
    if name == "gpt":
        assert model.num_params() == dense
    else:
        # Same parameters per token as the dense model, plus the routers; twice as many in all.
        router = 4 * 128 * 4
        assert model.num_params(active=True) == dense + router
        assert model.num_params() == dense + router + 4 * 2 * 128 * 512
