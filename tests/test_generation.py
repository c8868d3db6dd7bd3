"""Sampling: the KV cache changes the speed, never the tokens; generate.py on a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer import cli
from trainer.checkpoint.io import save_checkpoint
from trainer.data.tokenizers import CharTokenizer
from trainer.errors import UserError
from trainer.generation import encode_prompt, generate, sample_next, sample_texts
from trainer.models.gpt import GPT

ALPHABET = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def gpt(moe: dict | None = None, block_size: int = 16, vocab_size: int = 13) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size, block_size, n_layer=2, n_head=2, n_embd=16, moe=moe).eval()


def nanogpt_sampler(model: GPT, ids: torch.Tensor, steps: int, temperature: float, top_k, seed):
    """nanoGPT's generate(): the last block_size tokens, a full forward per token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            out = model(ids[:, -model.block_size :])
            logits = (out.logits if model.moe else out)[:, -1]
            ids = torch.cat([ids, sample_next(logits, temperature, top_k, generator)], dim=1)
    return ids


@pytest.mark.parametrize("moe", [None, {"num_experts": 3, "top_k": 2}])
@pytest.mark.parametrize("keep", [None, 5, 16])
def test_cache_gives_the_same_tokens_as_recomputing_past_the_block(moe, keep) -> None:
    model = gpt(moe)
    prompt = torch.randint(0, 13, (2, 5))
    for temperature, top_k in ((0.0, None), (1.0, 5)):  # greedy, and sampled with a seed
        runs = [
            generate(model, prompt, 40, temperature, top_k, 7, use_cache, keep).ids
            for use_cache in (True, False)
        ]
        assert runs[0].shape == (2, 45)
        assert torch.equal(runs[0][:, :5], prompt)
        assert torch.equal(runs[0], runs[1])
    if keep == 16:  # the whole block: nanoGPT's sampler exactly
        assert torch.equal(runs[0], nanogpt_sampler(model, prompt, 40, 1.0, 5, 7))


def test_seeds_repeat_and_differ_and_top_1_is_greedy() -> None:
    model = gpt()
    prompt = torch.tensor([[1, 2, 3]])
    draw = [generate(model, prompt, 30, 1.0, None, s).ids for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    greedy = generate(model, prompt, 30, 0.0).ids
    assert torch.equal(generate(model, prompt, 30, 1.5, 1, 3).ids, greedy)


def test_sampling_restores_training_mode() -> None:
    model = gpt().train()
    generate(model, torch.tensor([[1]]), 3)
    assert model.training


def test_a_trained_model_continues_its_pattern_past_the_block() -> None:
    """Real learning through the real sampler: a cycle longer than the block is continued
    after the window has slid several times."""
    text = "the quick brown fox. " * 40
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    model = GPT(tokenizer.vocab_size, 12, n_layer=2, n_head=2, n_embd=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 13, (16,))
        windows = torch.stack([data[s : s + 13] for s in starts.tolist()])
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = sample_texts(model, tokenizer, "the qu", max_new_tokens=60, temperature=0.0)
    assert out.texts[0] == text[:66]
    assert out.new_tokens == 60 and out.tokens_per_s > 0


def test_prompt_errors_name_the_problem() -> None:
    tokenizer = CharTokenizer(list("abc "))
    assert encode_prompt(tokenizer, "ab c", 8) == [0, 1, 3, 2]
    with pytest.raises(
        UserError, match=r"2 character\(s\) the model's vocabulary lacks: 'Z', '\?'"
    ):
        encode_prompt(tokenizer, "aZb?Z", 8)
    with pytest.raises(UserError, match="9 tokens, longer than the model's block_size=8"):
        encode_prompt(tokenizer, "abcabcabc", 8)
    with pytest.raises(UserError, match="prompt is empty"):
        encode_prompt(tokenizer, "", 8)
    with pytest.raises(UserError, match="temperature=-1"):
        generate(gpt(), torch.tensor([[1]]), 3, temperature=-1)


# --- generate.py -----------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint in the trainer's format: the run config, the weights, the tokenizer."""
    tokenizer = CharTokenizer(list(ALPHABET))
    model_cfg = {
        "_target_": "trainer.models.gpt.GPT",
        "vocab_size": len(ALPHABET),
        "block_size": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "dropout": 0.0,
        "bias": False,
        "moe": None,
    }
    torch.manual_seed(0)
    model = GPT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    path = tmp_path / "last.pt"
    state = {"config": {"model": model_cfg}, "model": model.state_dict()}
    save_checkpoint({**state, "tokenizer": tokenizer.state_dict()}, path)
    return path


def run_generate(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["generate.py", *args])
    code = 0
    try:
        cli.generate_main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_cli_samples_repeatably_from_a_checkpoint(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint.parent)
    args = [f"ckpt_path={checkpoint}", "prompt=ROMEO:", "max_new_tokens=100", "device=cpu"]
    code, first, err = run_generate(monkeypatch, capsys, *args, "seed=1337")
    assert code == 0, err
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 100 + 1
    assert "100 tokens in" in err and "tokens/s (with KV cache, cpu)" in err
    assert run_generate(monkeypatch, capsys, *args, "seed=1337")[1] == first
    assert run_generate(monkeypatch, capsys, *args, "seed=1337", "use_cache=false")[1] == first
    assert run_generate(monkeypatch, capsys, *args, "seed=7")[1] != first
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]  # wrote nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prompt=ROMEO_1"], "2 character(s) the model's vocabulary lacks: '_', '1'"),
        (["prompt=" + "A" * 33], "the prompt is 33 tokens, longer than the model's block_size=32"),
        (["ckpt_path=missing.pt"], "checkpoint missing.pt does not exist"),
        (["tempurature=0.5"], "did you mean temperature"),
        (["top_k=0"], "top_k=0 must be >= 1"),
    ],
)
def test_generate_cli_errors_are_one_line(checkpoint, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(checkpoint.parent)
    code, out, err = run_generate(monkeypatch, capsys, f"ckpt_path={checkpoint}", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_hugging_face_models_sample_through_their_own_generate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.models.tiny_llama import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "llama", "to be or not to be, that is the question. " * 20)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = torch.tensor([[5, 9, 14]])
    greedy = generate(model, prompt, 12, temperature=0.0, eos_id=-1)
    assert greedy.new_tokens == 12 and torch.equal(greedy.ids[:, :3], prompt)
    with torch.no_grad():  # the definition: each new token is the argmax of a full forward
        logits = model(greedy.ids).logits[0, 2:-1]
    chosen = logits.gather(1, greedy.ids[0, 3:, None]).squeeze(1)
    # A random model's logits nearly tie: the cached forward may break a tie the other way.
    assert torch.all(chosen >= logits.max(dim=1).values - 1e-5)
    draws = [generate(model, prompt, 12, 1.0, 50, seed, eos_id=-1).ids for seed in (3, 3)]
    assert torch.equal(draws[0], draws[1])


def test_wrapped_models_sample_as_the_module_inside() -> None:
    model = gpt()
    prompt = torch.tensor([[3, 4]])
    expected = generate(model, prompt, 10, 0.0).ids
    assert torch.equal(generate(torch.nn.DataParallel(model), prompt, 10, 0.0).ids, expected)
    assert torch.equal(generate(torch.compile(model), prompt, 10, 0.0).ids, expected)
