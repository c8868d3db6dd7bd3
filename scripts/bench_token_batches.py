"""Per-batch cost of token-stream batches against nanoGPT's get_batch, same windows.

    python scripts/bench_token_batches.py   # needs tiny Shakespeare in TRAINER_DATA_DIR

nanoGPT's get_batch (train.py) reopens the memmap and copies one window at a time
in Python; TokenBatches gathers all windows with one index_select on the device.
Both run single-threaded on the CPU; the figure is the best of 3 rounds of 300.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from trainer.data.text import TokenStreamData


def per_call_us(fn: Callable[[], object], n: int = 300) -> float:
    fn()
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return min(rounds)


def get_batch(path: str, dtype: np.dtype, batch_size: int, block_size: int) -> tuple:
    """nanoGPT's train.py get_batch for device_type == "cpu"."""
    data = np.memmap(path, dtype=dtype, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack(
        [torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix]
    )
    return x, y


def main() -> None:
    torch.set_num_threads(1)
    data_dir = os.environ.get("TRAINER_DATA_DIR", "./data")
    for batch_size, block_size in ((12, 64), (64, 256)):  # nanoGPT's CPU and GPU recipes
        rows = {}
        for in_memory in (True, False):
            data = TokenStreamData(
                data_dir=data_dir, vocab_size=65, block_size=block_size,
                batch_size=batch_size, epoch_batches=10**6, in_memory=in_memory,
            )  # fmt: skip
            data.setup(torch.device("cpu"))
            batches = data.batches("train").epoch(0)
            rows["in memory" if in_memory else "memmap"] = per_call_us(lambda b=batches: next(b))
        tokens = np.asarray(data.splits["train"])
        path = f"/tmp/bench_token_batches_{os.getpid()}.bin"
        tokens.tofile(path)

        args = (path, tokens.dtype, batch_size, block_size)
        rows["nanoGPT get_batch"] = per_call_us(functools.partial(get_batch, *args))
        os.unlink(path)
        figures = ", ".join(f"{k} {v:.0f} us" for k, v in rows.items())
        print(f"batch {batch_size} x block {block_size}: {figures}")


if __name__ == "__main__":
    main()
