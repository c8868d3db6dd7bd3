"""Startup latency: seconds from launching `python train.py` to its first training step.

Two stamps from the run's own log: "training <Model> on <device>", logged just
before the first batch goes forward (the start of step 1), and "first optimizer
step done" (its end). For scale, the floor every PyTorch script pays here:
`import torch` plus one optimizer step, whose first call imports torch._dynamo.

    python scripts/bench_startup.py [--runs 3] [extra overrides...]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = (
    "import torch; m = torch.nn.Linear(784, 10); o = torch.optim.AdamW(m.parameters()); "
    "m(torch.zeros(1, 784)).sum().backward(); o.step(); print('floor done')"
)
STEP_START = re.compile(r"\] - training \w+ on ")
STEP_DONE = re.compile(r"first optimizer step done|floor done")


def stamps(cmd: list[str], cwd: str) -> dict[str, float]:
    """Seconds from launch to each marker line of the command's output."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: dict[str, float] = {}
    for line in proc.stdout:
        now = time.perf_counter() - started
        if STEP_START.search(line):
            seen.setdefault("start", now)
        if STEP_DONE.search(line):
            seen.setdefault("done", now)
    proc.wait()
    if proc.returncode != 0 or "done" not in seen:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}) or printed no marker")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    floors, starts, dones = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            floors.append(stamps([sys.executable, "-c", FLOOR], tmp)["done"])
            cmd = [
                sys.executable,
                str(REPO / "train.py"),
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=8",
                f"hydra.run.dir={tmp}/run{i}",
                *args.overrides,
            ]
            run = stamps(cmd, tmp)
            starts.append(run["start"])
            dones.append(run["done"])
            print(
                f"run {i}: floor (import torch + 1 step) {floors[-1]:.2f} s; train.py: "
                f"step 1 starts {starts[-1]:.2f} s, ends {dones[-1]:.2f} s"
            )
    print(
        f"median: floor {statistics.median(floors):.2f} s; train.py step 1 starts "
        f"{statistics.median(starts):.2f} s, ends {statistics.median(dones):.2f} s "
        f"(data dir {os.environ.get('TRAINER_DATA_DIR', './data')})"
    )


if __name__ == "__main__":
    main()
