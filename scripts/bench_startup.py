"""Startup latency: seconds from launching `python train.py` to its first optimizer step.

The trainer logs "first optimizer step done" once; this script launches the
command, watches its output and stamps that line. For scale it also times the
floor every PyTorch script pays: `import torch` plus one optimizer step
(whose first call imports torch._dynamo).

    python scripts/bench_startup.py [--runs 3] [extra overrides...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = (
    "import torch; m = torch.nn.Linear(784, 10); o = torch.optim.AdamW(m.parameters()); "
    "m(torch.zeros(1, 784)).sum().backward(); o.step()"
)


def time_to_line(cmd: list[str], marker: str, cwd: str) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    elapsed = None
    for line in proc.stdout:
        if elapsed is None and marker in line:
            elapsed = time.perf_counter() - started
    proc.wait()
    if proc.returncode != 0 or elapsed is None:
        raise SystemExit(
            f"{' '.join(cmd)} failed (exit {proc.returncode}) or never printed {marker!r}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    floors, starts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            floors.append(
                time_to_line(
                    [sys.executable, "-c", FLOOR + "; print('floor done')"], "floor done", tmp
                )
            )
            cmd = [
                sys.executable,
                str(REPO / "train.py"),
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                f"hydra.run.dir={tmp}/run{i}",
                *args.overrides,
            ]
            starts.append(time_to_line(cmd, "first optimizer step done", tmp))
            print(f"run {i}: import torch + 1 step {floors[-1]:.2f} s, ", end="")
            print(f"train.py first step {starts[-1]:.2f} s")
    floor, start = statistics.median(floors), statistics.median(starts)
    print(
        f"median: floor {floor:.2f} s, train.py to first step {start:.2f} s, "
        f"framework share {start - floor:.2f} s "
        f"(data dir {os.environ.get('TRAINER_DATA_DIR', './data')})"
    )


if __name__ == "__main__":
    main()
