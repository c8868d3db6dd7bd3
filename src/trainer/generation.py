"""Sampling text from a trained language model.

`generate(model, prompt_ids, ...)` dispatches on the model's type: this
trainer's GPT samples with its KV cache (`sample_gpt`); Hugging Face causal
LMs use their own `generate` (`sample_hf`, where chat templates belong).
`sample_texts(model, tokenizer, prompt, ...)` wraps it with the tokenizer,
checks the prompt, and reports tokens/s; `generate_text` returns one text.

The KV cache makes each new token cost one position instead of the whole
context. A GPT with learned positions sees at most `block_size` tokens, and
when the text outgrows that window every cached key depends on positions that
have shifted, so the window slides in jumps: the last `window_keep` tokens are
encoded again in one forward and decoding goes on one position per token.
`window_keep=block_size` is nanoGPT's sampler (always the full window, at one
full forward per token); the default, half the block, re-encodes half a block
once every half block. `use_cache=False` computes the same windows from scratch
each token: the same tokens, slower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.errors import UserError
from trainer.models.gpt import GPT


@dataclass
class Generated:
    """Prompt plus sampled ids, and how long sampling took."""

    ids: torch.Tensor  # (B, prompt + new tokens)
    new_tokens: int  # per sequence
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.ids.shape[0] * self.new_tokens / max(self.seconds, 1e-9)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: greedy at temperature 0, else from the top_k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    window_keep: int | None = None,
    eos_id: int | None = None,
) -> Generated:
    """Sample `max_new_tokens` after `prompt_ids` (B, T) with the model's own sampler.

    The model is put in eval mode for the call and restored after, so a task may
    sample mid-training. `seed` makes the draw repeatable (None: torch's global RNG).
    """
    check_sampling(max_new_tokens, temperature, top_k)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if isinstance(model, GPT):
                return sample_gpt(
                    model,
                    prompt_ids,
                    max_new_tokens,
                    temperature,
                    top_k,
                    seed,
                    use_cache,
                    window_keep,
                )
            if callable(getattr(model, "generate", None)) and hasattr(model, "config"):
                return sample_hf(
                    model, prompt_ids, max_new_tokens, temperature, top_k, seed, eos_id
                )
            raise UserError(
                f"cannot sample from a {type(model).__name__}: generation supports "
                "trainer.models.gpt.GPT and Hugging Face causal LMs"
            )
    finally:
        model.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers.

    Sampling runs on one process with shapes that change each token: through DDP
    it would wait for other ranks, through torch.compile it would recompile.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # torch.compile's wrapper: torch has no public accessor for the compiled module.
            model = model._orig_mod
        else:
            return model


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1, or null for the whole vocabulary")


def sample_gpt(
    model: GPT,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    window_keep: int | None = None,
) -> Generated:
    block = model.block_size
    keep = block // 2 if window_keep is None else window_keep
    if not 1 <= keep <= block:
        raise UserError(f"window_keep={keep} must be between 1 and block_size={block}")
    batch, prompt_len = prompt_ids.shape
    if prompt_len < 1:
        raise UserError("the prompt is empty: give at least one token")
    device = model.lm_head.weight.device
    ids = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt_ids
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    cache = model.new_cache(batch) if use_cache else None
    start = 0  # where the window begins; it only moves when it outgrows the block
    sync(device)
    began = time.perf_counter()
    for n in range(prompt_len, prompt_len + max_new_tokens):
        if n - start > block:
            start = n - keep
            if cache is not None:
                cache.reset()
        if cache is None:
            out = model(ids[:, start:n])
            logits = (out if isinstance(out, torch.Tensor) else out.logits)[:, -1]
        else:
            logits = model.decode(ids[:, start + cache.length : n], cache)
        ids[:, n : n + 1] = sample_next(logits, temperature, top_k, generator)
    sync(device)
    return Generated(ids, max_new_tokens, time.perf_counter() - began)


def sample_hf(
    model: Any,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Generated:
    """A Hugging Face causal LM's own `generate`, with its own KV cache.

    Fine-tuning (issue 14) builds chat prompts with the tokenizer's template
    before calling this; here the ids are taken as given.
    """
    device = next(model.parameters()).device
    # HF samples from torch's global generator: seeded inside a fork, so sampling at a
    # validation leaves the training run's RNG (dropout masks) where it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        return _hf_generate(model, prompt_ids, device, max_new_tokens, temperature, top_k, eos_id)


def _hf_generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    device: torch.device,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
) -> Generated:
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0}
    prompt_ids = prompt_ids.to(device)
    sync(device)
    began = time.perf_counter()
    ids = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        use_cache=True,  # training turns it off in the config; sampling wants it
        pad_token_id=eos_id if eos_id is not None else model.config.eos_token_id,
        **sampling,
    )
    sync(device)
    return Generated(ids, ids.shape[1] - prompt_ids.shape[1], time.perf_counter() - began)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so timings measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_prompt(tokenizer: Any, prompt: str, block_size: int | None) -> list[int]:
    """The prompt's ids, or one line naming its characters the vocabulary lacks."""
    if not prompt:
        raise UserError('the prompt is empty; give some text, e.g. prompt="ROMEO:"')
    try:
        ids = tokenizer.encode(prompt)
    except (UserError, KeyError, ValueError) as e:
        unknown = [c for c in dict.fromkeys(prompt) if not _encodes(tokenizer, c)]
        if not unknown:
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot encode the prompt: {e}") from None
        raise UserError(
            f"the prompt has {len(unknown)} character(s) the model's vocabulary lacks: "
            f"{', '.join(repr(c) for c in unknown)}; remove or replace them"
        ) from None
    if block_size is not None and len(ids) > block_size:
        raise UserError(
            f"the prompt is {len(ids)} tokens, longer than the model's block_size={block_size} "
            "(the most it can see at once); shorten it"
        )
    return ids


def _encodes(tokenizer: Any, text: str) -> bool:
    try:
        tokenizer.encode(text)
    except (UserError, KeyError, ValueError):
        return False
    return True


@dataclass
class GeneratedText:
    texts: list[str]  # prompt + continuation, one per sample
    new_tokens: int
    seconds: float
    tokens_per_s: float


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int | None = 0,
) -> str:
    """The prompt and one sampled continuation: what the LM task logs at each validation."""
    return sample_texts(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed).texts[0]


def sample_texts(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int | None = 0,
    num_samples: int = 1,
    use_cache: bool = True,
    window_keep: int | None = None,
) -> GeneratedText:
    """`num_samples` texts continuing `prompt`, with the time taken: what generate.py prints."""
    block = model.block_size if isinstance(model, GPT) else None
    ids = encode_prompt(tokenizer, prompt, block)
    if isinstance(model, GPT) and getattr(tokenizer, "vocab_size", None) is not None:
        if tokenizer.vocab_size > model.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{model.vocab_size}: they come from different runs"
            )
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(
        model,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        seed,
        use_cache,
        window_keep,
        getattr(tokenizer, "eos_id", None),
    )
    texts = [tokenizer.decode(row) for row in out.ids.tolist()]
    return GeneratedText(texts, out.new_tokens, out.seconds, out.tokens_per_s)


def run_generate(cfg: Any) -> GeneratedText:
    """`python generate.py ckpt_path=... prompt=...`: sample from a checkpoint of this trainer.

    The model is rebuilt from the run config the checkpoint holds and the
    tokenizer from its plain-data state, so nothing else needs to be given.
    """
    import sys
    from pathlib import Path

    from trainer.checkpoint.io import load_checkpoint, load_model_state
    from trainer.errors import CheckpointError, ConfigError
    from trainer.finetune.export import build_model

    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python generate.py ckpt_path=<a .pt file>")
    device = pick_device(str(cfg.device))
    prompt = cfg.prompt
    if cfg.get("prompt_file"):
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file={path} does not exist")
        prompt = path.read_text(encoding="utf-8")
    state = load_checkpoint(cfg.ckpt_path, "cpu")
    run_config = state.get("config")
    if not run_config or "model" not in run_config:
        raise CheckpointError(
            f"{cfg.ckpt_path} does not record the model config it was trained with"
        )
    if not state.get("tokenizer"):
        raise CheckpointError(
            f"{cfg.ckpt_path} holds no tokenizer: it was not trained on text, so it cannot "
            "turn a prompt into tokens"
        )
    from trainer.data.tokenizers import tokenizer_from_state

    tokenizer = tokenizer_from_state(state["tokenizer"])
    model = build_model(run_config)
    load_model_state(model, state["model"], str(cfg.ckpt_path))
    model.to(device)
    result = sample_texts(
        model,
        tokenizer,
        prompt,
        max_new_tokens=int(cfg.max_new_tokens),
        temperature=float(cfg.temperature),
        top_k=None if cfg.top_k is None else int(cfg.top_k),
        seed=None if cfg.seed is None else int(cfg.seed),
        num_samples=int(cfg.num_samples),
        use_cache=bool(cfg.use_cache),
        window_keep=None if cfg.window_keep is None else int(cfg.window_keep),
    )
    for i, text in enumerate(result.texts):
        if i:
            print("-" * 40)
        print(text, flush=True)
    cache = "with" if cfg.use_cache else "without"
    print(
        f"{result.new_tokens * len(result.texts)} tokens in {result.seconds:.2f} s: "
        f"{result.tokens_per_s:.1f} tokens/s ({cache} KV cache, {device.type})",
        file=sys.stderr,
        flush=True,
    )
    return result


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"device={name!r} must be auto, cpu or cuda[:N]")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    return torch.device(name)
