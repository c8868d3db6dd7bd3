"""LoRA adapters: equivalence of the forward paths, what trains, merge and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open
from torch import nn

from tests.conftest import compose_config, run_cli
from tests.finetune.conftest import TINY_CNN
from trainer.checkpoint.io import load_checkpoint, load_model_state
from trainer.errors import ConfigError
from trainer.evaluate import evaluate
from trainer.finetune.export import build_model, export_checkpoint
from trainer.finetune.lora import apply_lora, lora_parameters, merge_lora
from trainer.finetune.pretrained import load_pretrained
from trainer.run import train

REPO = Path(__file__).resolve().parents[2]


def _adapted(base: nn.Module, rank: int = 2, alpha: float = 4.0, dropout: float = 0.0):
    model = nn.Sequential(base)
    apply_lora(model, ["0"], rank, alpha, dropout)
    return model


@pytest.mark.parametrize(
    "base,x",
    [
        (nn.Linear(20, 6), torch.randn(8, 20)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)),
        (nn.Conv2d(3, 5, 5, padding=2, bias=False), torch.randn(2, 3, 7, 7)),
    ],
)
def test_adapter_starts_at_the_base_and_merges_to_the_same_function(base: nn.Module, x) -> None:
    torch.manual_seed(0)
    reference = base(x).detach()
    model = _adapted(base)
    assert torch.equal(model(x), reference)  # B starts at zero: the pre-trained function
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A.default.weight",
        "0.lora_B.default.weight",
    }
    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_()
        adapted = model(x)
        assert (adapted - reference).abs().max() > 0.1
        merged = merge_lora(model)
        assert type(merged[0]) is type(base)
        assert torch.allclose(merged(x), adapted, rtol=1e-5, atol=1e-5)


def test_lora_dropout_only_touches_the_adapter_input() -> None:
    torch.manual_seed(0)
    model = _adapted(nn.Linear(16, 4), rank=4, alpha=4.0, dropout=0.5)
    x = torch.randn(32, 16)
    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_()
    model.train()
    assert not torch.allclose(model(x), model(x))  # dropout is active in training
    model.eval()
    adapted = model(x)
    assert torch.allclose(adapted, merge_lora(model)(x), atol=1e-5)


def test_targets_must_match_a_linear_or_conv() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="'1' matches no Linear or Conv2d layer.*: 0"):
        apply_lora(model, ["1"], 2, 2.0, 0.0)
    with pytest.raises(ConfigError, match="rank=0"):
        apply_lora(model, ["0"], 0, 2.0, 0.0)
    # peft's conv adapter ignores dilation: refused rather than computing another function.
    dilated = nn.Sequential(nn.Conv2d(3, 5, 3, padding=2, dilation=2))
    with pytest.raises(ConfigError, match="0 is a grouped, dilated or non-zero-padded Conv2d"):
        apply_lora(dilated, ["0"], 2, 2.0, 0.0)


def test_lora_trains_only_adapters_and_head_and_export_merges(
    pretrained_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    cfg = compose_config(
        [
            *TINY_CNN,
            "data=fashion_mnist",
            "finetune=lora",
            f"finetune.init_from={pretrained_ckpt}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=15",
        ],
        out,
    )
    train(cfg)
    before = load_checkpoint(pretrained_ckpt)["model"]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    after = state["model"]

    adapters = sorted(k for k in after if "lora_" in k)
    assert len(adapters) == 10  # A and B of 4 convs and head.2
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters)
    adapted_layers = {k.rsplit(".lora_", 1)[0] for k in adapters}
    for key, value in before.items():  # every pre-trained tensor but the new head's
        layer, _, leaf = key.rpartition(".")
        # peft keeps an adapted layer's own weights under <layer>.base_layer.
        saved = after[f"{layer}.base_layer.{leaf}" if layer in adapted_layers else key]
        if key.startswith("head.5."):
            assert not torch.equal(saved, value), key
        else:
            assert torch.equal(saved, value), key
    trained = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert trained == len(adapters) + 2  # adapters, head.5.weight and head.5.bias
    results = json.loads((out / "results.json").read_text())
    adapter_values = sum(after[k].numel() for k in adapters)
    assert results["trainable_params"] == adapter_values + 10 * 32 + 10

    weights = export_checkpoint(out / "checkpoints" / "last.pt", tmp_path / "export")
    with safe_open(weights, "pt") as f:
        assert not any("lora_" in k for k in f.keys())
        assert json.loads(f.metadata()["model_config"])["channels"] == [8, 16]
    assert "_target_: trainer.models.cnn.CNN" in (tmp_path / "export" / "model.yaml").read_text()

    adapted = build_model(state["config"])
    load_model_state(adapted, after, "last.pt")
    plain = instantiate(cfg.model, _convert_="all")
    load_pretrained(plain, weights)  # strict: the export has exactly the plain model's keys
    assert not any("lora" in name for name, _ in plain.named_modules())
    data = instantiate(cfg.data, _convert_="all")
    data.setup(torch.device("cpu"))
    x, _ = next(iter(data.batches("test").epoch(0)))
    adapted.eval(), plain.eval()
    with torch.no_grad():
        reference = adapted(x)
        exported = plain(x)
    assert not torch.allclose(reference, instantiate(cfg.model, _convert_="all").eval()(x))
    assert (exported - reference).abs().max() < 1e-5

    # eval.py rebuilds the adapters from the checkpoint's config.
    eval_cfg = compose_config(
        [f"ckpt_path={out / 'checkpoints' / 'last.pt'}", "split=val"],
        tmp_path / "eval",
        config_name="eval",
    )
    metrics = evaluate(eval_cfg)
    assert 0.1 < metrics["val/acc"] <= 1.0


def test_export_script_and_init_from_give_the_original_outputs(
    pretrained_ckpt: Path, tmp_path: Path
) -> None:
    done = run_cli(
        [str(REPO / "scripts" / "export.py"), str(pretrained_ckpt), "--out", str(tmp_path)],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "model.safetensors")

    cfg = compose_config([*TINY_CNN], tmp_path)
    original = instantiate(cfg.model, _convert_="all")
    load_model_state(original, load_checkpoint(pretrained_ckpt)["model"], "best.pt")
    torch.manual_seed(1)
    restored = instantiate(cfg.model, _convert_="all")
    load_pretrained(restored, tmp_path / "model.safetensors")
    x = torch.randn(16, 1, 28, 28)
    original.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(original(x), restored(x))

    bad = run_cli([str(REPO / "scripts" / "export.py"), str(tmp_path / "nope.pt")], cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.pt'} does not exist; pass the path of a checkpoint file"
    ]
