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
from trainer.checkpoint import load_checkpoint, load_model_state
from trainer.errors import ConfigError
from trainer.evaluate import evaluate
from trainer.finetune.export import build_model, export_checkpoint
from trainer.finetune.lora import LoRAConv2d, LoRALinear, apply_lora
from trainer.finetune.pretrained import load_pretrained
from trainer.run import train

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "base,x",
    [
        (nn.Linear(20, 6), torch.randn(8, 20)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 9, 9)),
        (nn.Conv2d(3, 5, 3, padding=2, dilation=2, bias=False), torch.randn(2, 3, 7, 7)),
    ],
)
def test_both_forward_paths_and_the_merged_layer_agree(base: nn.Module, x) -> None:
    torch.manual_seed(0)
    layer = (LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d)(base, 2, 4.0, 0.0)
    assert torch.equal(layer(x), base(x))  # B starts at zero: the pre-trained function
    with torch.no_grad():
        layer.lora_B.normal_()
    two_path = layer._base_op(x, layer.weight, layer.bias) + layer._adapter(x)
    assert torch.allclose(layer(x), two_path, atol=1e-5)
    assert torch.allclose(layer.merged()(x), two_path, atol=1e-5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_lora_dropout_only_touches_the_adapter_input() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 4), rank=4, alpha=4.0, dropout=0.5)
    x = torch.randn(32, 16)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # dropout is active in training
    layer.eval()
    assert torch.allclose(layer(x), layer.merged()(x), atol=1e-5)


def test_targets_must_match_a_linear_or_conv() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="'1' matches no Linear or Conv2d layer.*: 0"):
        apply_lora(model, ["1"], 2, 2.0, 0.0)
    with pytest.raises(ConfigError, match="rank=0"):
        apply_lora(model, ["0"], 0, 2.0, 0.0)


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
    for key, value in before.items():  # every pre-trained tensor but the new head's
        if key.startswith("head.5."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
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
        # The adapter path, not the merged shortcut, is the reference.
        for module in adapted.modules():
            if isinstance(module, LoRALinear | LoRAConv2d):
                module.forward = lambda x, m=module: m._base_op(x, m.weight, m.bias) + m._adapter(x)
        two_path = adapted(x)
        exported = plain(x)
    assert torch.allclose(reference, two_path, atol=1e-5)
    assert (exported - two_path).abs().max() < 1e-5

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
