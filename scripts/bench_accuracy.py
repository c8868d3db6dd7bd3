"""Accuracy and time to accuracy of a real `python train.py` run.

Launches the command, then reads its TensorBoard events: the wall-clock time
of the first validation at or above --target (measured from the launch), the
final test accuracy, epochs and total wall time. `--markdown` prints the row of
the README's results table instead (scripts/bench_readme.py prints the table).

    python scripts/bench_accuracy.py --target 0.98                       # defaults: MLP, MNIST
    python scripts/bench_accuracy.py --target 0.993 model=cnn trainer.max_epochs=8
    python scripts/bench_accuracy.py --markdown model=cnn
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO, markdown_row, provenance

HEADER = [
    "| command | epochs | test acc | best val acc | wall time |",
    "|---|---:|---:|---:|---:|",
]


def measure(overrides: list[str], target: float | None) -> dict:
    """Run `python train.py <overrides>`; what its results and TensorBoard events say."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        launched = time.time()
        subprocess.run(
            [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.time() - launched
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        val = events.Scalars("val/acc")
        reached = next((e for e in val if target and e.value >= target), None)
        results = json.loads((run_dir / "results.json").read_text())
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return {
        "model": config["model"]["_target_"].rsplit(".", 1)[-1],
        "data": config["data"]["name"],
        "reached_s": reached.wall_time - launched if reached else None,
        "reached_step": reached.step if reached else None,
        "val": results["metrics"]["val/acc"],
        "test": results["metrics"]["test/acc"],
        "epochs": results["epochs"],
        "wall": wall,
    }


def row(overrides: list[str], target: float | None, got: dict) -> str:
    command = " ".join(["python train.py", *overrides])
    best_val = f"{100 * got['val']:.2f} %"
    if target is not None:
        when = f"after {got['reached_s']:.1f} s" if got["reached_s"] is not None else "never"
        best_val += f", ≥ {100 * target:g} % {when}"
    return markdown_row(
        [
            f"`{command}` ({got['model']}, {got['data']})",
            str(got["epochs"]),
            f"{100 * got['test']:.2f} %",
            best_val,
            f"{got['wall']:.1f} s",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=None, help="val/acc to reach")
    parser.add_argument("--markdown", action="store_true", help="print the README table row")
    parser.add_argument("--header", action="store_true", help="with --markdown: the header too")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    target = args.target if args.markdown else (args.target or 0.98)
    got = measure(args.overrides, target)
    if args.markdown:
        if args.header:
            print(provenance(), *HEADER, sep="\n")
        print(row(args.overrides, args.target, got))
        return
    when = (
        f"{got['reached_s']:.1f} s (step {got['reached_step']})"
        if got["reached_s"] is not None
        else "never"
    )
    print(f"command: python train.py {' '.join(args.overrides)}")
    print(
        f"val/acc >= {target} after {when}; best val/acc {got['val']:.4f}; "
        f"test/acc {got['test']:.4f}; epochs {got['epochs']}; wall {got['wall']:.1f} s"
    )


if __name__ == "__main__":
    main()
