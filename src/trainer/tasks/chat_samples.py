"""Answers to fixed prompts, for TensorBoard's Text tab at each validation.

`answer_prompts` formats each prompt with the tokenizer's chat template (as a
user turn, with the generation prompt) and decodes greedily, so the same
prompts give the same answers for the same weights: a change between two
validations is the training's doing. Used by the SFT (language modeling) and
DPO tasks' `samples`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The chat-formatted prompt's ids; plain encoding for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(text, add_special_tokens=False)
    if hasattr(tokenizer, "chat_prompt"):  # trainer.data.tokenizers.HFTokenizer
        return list(tokenizer.chat_prompt(prompt))
    return list(tokenizer.encode(prompt))


def _eos(tokenizer: Any) -> int | None:
    for name in ("eos_token_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a tokenizer whose decode takes only the ids
        return tokenizer.decode(ids)


@torch.no_grad()
def greedy(model: nn.Module, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy continuation of `ids` (new tokens only, eos excluded)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    if hasattr(model, "generate"):  # Hugging Face models (and peft's): KV cache
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
        new = out[0, len(ids) :].tolist()
    else:
        new = []
        for _ in range(max_new_tokens):
            out = model(x)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            x = torch.cat([x, x.new_tensor([[token]])], dim=1)
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return new


def answer_prompts(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48
) -> list[str]:
    """The model's greedy answer to each prompt (a user turn of a chat)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not hasattr(tokenizer, "apply_chat_template"):
        # trainer.data.tokenizers.HFTokenizer holds the Hugging Face one as `.tokenizer`.
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    was_training = model.training
    model.eval()
    try:
        eos = _eos(tokenizer)
        return [
            _decode(tokenizer, greedy(model, prompt_ids(tokenizer, p), max_new_tokens, eos)).strip()
            for p in prompts
        ]
    finally:
        model.train(was_training)


def format_answers(prompts: Sequence[str], answers: Sequence[str]) -> str:
    """Markdown for TensorBoard's Text tab: each prompt and its answer."""
    return "\n\n".join(f"**{p}**  \n{a}" for p, a in zip(prompts, answers, strict=True))
