"""Sampling speed: tokens/s with and without the KV cache, 500 new tokens.

Two sizes: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64) and
its GPU recipe (6 layers, 6 heads, 384 wide, block 256), with random weights
(speed does not depend on them) and a 65-character vocabulary. Each setting
runs `--rounds` times, alternating cache and no cache so drift on a shared
machine hits both; the median is reported. Prints markdown rows.

    python scripts/bench_generate.py [--rounds 3] [--tokens 500] [--device cpu] [--sizes cpu,gpu]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from trainer.generation import generate
from trainer.models.gpt import GPT

SIZES = {
    "cpu": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    "gpu": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="cpu,gpu")
    parser.add_argument("--window-keep", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads")
    print(
        "| model | block | new tokens | window_keep | no cache tok/s | KV cache tok/s | speedup |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.sizes.split(","):
        sizes = SIZES[name]
        torch.manual_seed(0)
        model = GPT(vocab_size=65, **sizes).to(device).eval()
        prompt = torch.zeros(1, 1, dtype=torch.long, device=device)  # nanoGPT's "\n"
        speed: dict[bool, list[float]] = {True: [], False: []}
        generate(model, prompt, 20, 0.8, 200, 0, True, args.window_keep)  # warm-up
        for round_ in range(args.rounds):
            for use_cache in (True, False) if round_ % 2 == 0 else (False, True):
                out = generate(
                    model, prompt, args.tokens, 0.8, 200, 1337, use_cache, args.window_keep
                )
                speed[use_cache].append(out.tokens_per_s)
        cached, plain = statistics.median(speed[True]), statistics.median(speed[False])
        keep = args.window_keep or sizes["block_size"] // 2
        print(
            f"| {name} recipe ({sizes['n_layer']}x{sizes['n_embd']}) | {sizes['block_size']} | "
            f"{args.tokens} | {keep} | {plain:.0f} | {cached:.0f} | {cached / plain:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
