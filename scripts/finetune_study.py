"""MNIST -> Fashion-MNIST transfer study: `python scripts/finetune_study.py`.

Pretrains the CNN of `experiment=mnist_to_fashion_finetune` on MNIST, then
trains on Fashion-MNIST with the same budget four ways: frozen backbone, LoRA,
full fine-tuning, and from scratch. Each stage is an ordinary `train.py` run
(its command is printed); the table compares test accuracy, trainable
parameters and training time. Extra arguments are passed to every run as
Hydra overrides, e.g. `trainer.accelerator=cpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiment=mnist_to_fashion_finetune"
METHODS = {
    "frozen backbone": ["finetune=frozen_backbone"],
    "LoRA": ["finetune=lora"],
    "full fine-tune": ["finetune=full"],
    "from scratch": ["finetune=none"],
}


def run_stage(name: str, overrides: list[str], out_dir: Path) -> dict:
    run_dir = out_dir / name.replace(" ", "_")
    command = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    print("$ " + " ".join(["python train.py", *overrides]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"stage {name!r} failed (exit {done.returncode}); see above")
    results = json.loads((run_dir / "results.json").read_text())
    results["run_dir"] = str(run_dir)
    results["process_time_s"] = time.perf_counter() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/finetune_study", help="folder for all runs")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--pretrain-batches", type=int, default=100, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs")
    parser.add_argument("--batches", type=int, default=40, help="fine-tuning batches per epoch")
    parser.add_argument("--val-batches", type=int, default=2, help="validation batches per epoch")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    out_dir = Path(args.out).resolve()
    common = [
        EXPERIMENT,
        "logger=none",
        "trainer.progress_bar=false",
        f"trainer.limit_val_batches={args.val_batches}",
        *args.overrides,
    ]

    pretrain = run_stage(
        "pretrain mnist",
        [
            *common,
            "data=mnist",
            "finetune=none",
            f"trainer.max_epochs={args.pretrain_epochs}",
            f"trainer.limit_train_batches={args.pretrain_batches}",
        ],
        out_dir,
    )
    ckpt = Path(pretrain["run_dir"]) / "checkpoints" / "best.pt"
    budget = [f"trainer.max_epochs={args.epochs}", f"trainer.limit_train_batches={args.batches}"]
    rows = []
    for name, method in METHODS.items():
        init = [] if name == "from scratch" else [f"finetune.init_from={ckpt}"]
        results = run_stage(name, [*common, *budget, *method, *init], out_dir)
        rows.append((name, results))

    print(
        f"\nPretrained on MNIST: test acc {pretrain['metrics']['test/acc']:.4f} "
        f"in {pretrain['fit_time_s']:.1f} s ({pretrain['steps']} steps).\n"
        f"Fashion-MNIST, {rows[0][1]['steps']} steps each "
        f"({args.epochs} x {args.batches} batches), {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d', time.gmtime())}:\n"
    )
    print("| method | test acc | trainable params | train time (s) |")
    print("|---|---:|---:|---:|")
    for name, results in rows:
        print(
            f"| {name} | {results['metrics']['test/acc']:.4f} | "
            f"{results['trainable_params']:,} | {results['fit_time_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
