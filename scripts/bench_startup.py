"""Startup latency: seconds from launching `python train.py` to its first training step.

Two stamps from the run's own log: "training <Model> on <device>", logged just
before the first batch goes forward (the start of step 1), and "first optimizer
step done" (its end). For scale, the floor every PyTorch script pays here:
`import torch` plus one optimizer step, whose first call imports torch._dynamo.

Two data folders are timed: the one TRAINER_DATA_DIR names as it is (the
shared, read-only `.gz` files: every start decompresses them), and a folder
like a user's `./data` after its first run, which holds the decompressed copies
the loader keeps beside the `.gz` files.

    python scripts/bench_startup.py [--runs 3] [--markdown] [extra overrides...]

`--markdown` ends with the row of the README's benchmark table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO, markdown_row

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
    parser.add_argument("--markdown", action="store_true", help="end with the README row")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    source = Path(os.environ.get("TRAINER_DATA_DIR", "./data")).resolve()
    floors: list[float] = []
    starts: dict[str, list[float]] = {"shared .gz folder": [], "user folder": []}
    with tempfile.TemporaryDirectory() as tmp:
        user_dir = Path(tmp) / "data"
        # Only the .gz files, writable, as a fresh download leaves them.
        shutil.copytree(
            source, user_dir, ignore=lambda _, names: [n for n in names if n.endswith("-ubyte")]
        )
        for folder in [user_dir, *user_dir.rglob("*")]:
            folder.chmod(0o755 if folder.is_dir() else 0o644)

        def train(run: str, data_dir: Path) -> dict[str, float]:
            cmd = [
                sys.executable,
                str(REPO / "train.py"),
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=8",
                f"paths.data_dir={data_dir}",
                f"hydra.run.dir={tmp}/{run}",
                *args.overrides,
            ]
            return stamps(cmd, tmp)

        train("first", user_dir)  # the user's first run leaves the decompressed copies
        for i in range(args.runs):
            floors.append(stamps([sys.executable, "-c", FLOOR], tmp)["done"])
            for (label, times), folder in zip(starts.items(), (source, user_dir), strict=True):
                times.append(train(f"{label[0]}{i}", folder)["start"])
            print(
                f"run {i}: floor (import torch + 1 step) {floors[-1]:.2f} s; train.py step 1 "
                + "; ".join(f"{k} {v[-1]:.2f} s" for k, v in starts.items())
            )
    floor = statistics.median(floors)
    print(
        f"median: floor {floor:.2f} s; train.py step 1 starts "
        + "; ".join(
            f"{k} {statistics.median(v):.2f} s (floor + {statistics.median(v) - floor:.2f} s)"
            for k, v in starts.items()
        )
    )
    if args.markdown:
        shared, user = (statistics.median(v) for v in starts.values())
        what = f"`scripts/bench_startup.py`: command → first training step, median of {args.runs}"
        figure = (
            f"step 1 starts at {user:.2f} s with a data folder as its first run leaves it "
            f"(decompressed copies beside the `.gz`), {shared:.2f} s from the read-only shared "
            "`.gz` files; the floor here (python, `import torch`, one optimizer step, which "
            f"imports `torch._dynamo`) is {floor:.2f} s"
        )
        print(markdown_row([what, figure]))


if __name__ == "__main__":
    main()
