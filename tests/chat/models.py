"""Model builders the CLI tests name by `_target_` (HF model loading proper is
trainer.models.hf, issue 14's model part): a causal LM from a folder, with or
without peft LoRA adapters."""

from __future__ import annotations

from typing import Any


def causal_lm(name_or_path: str, lora_r: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path)
    model.config.use_cache = False
    if lora_r:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        )
        model = get_peft_model(model, config)
    return model
