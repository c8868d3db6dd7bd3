"""Quality and time of the tiny-Shakespeare recipes, as nanoGPT reports them.

Runs `python train.py experiment=<name>` for each name given, reads the run's
TensorBoard events and prints one markdown row each: the final val loss, when
val loss first reached --target (from the launch), total wall time, training
tokens/s, total and active parameters, and for a mixture of experts each
expert's share of tokens at the end over the uniform share, smallest and
largest over all layers (1.0 is uniform).

    python scripts/bench_nanogpt.py shakespeare_char_cpu shakespeare_char_cpu_fast \
        shakespeare_char_moe
    python scripts/bench_nanogpt.py shakespeare_char_cpu trainer.max_steps=500   # shortened

Reference (issue 13): nanoGPT's own train.py, same recipe, torch 2.13 CPU, this
2-core machine: 76.6 s from command to exit, val loss 1.886 at step 2000.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, recipe_run  # noqa: E402


def run_recipe(experiment: str, overrides: list[str], target: float) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with recipe_run(experiment, overrides) as (run_dir, launched, wall):
        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        val = events.Scalars("val/loss")
        reached = next((e for e in val if e.value <= target), None)
        rates = [e.value for e in events.Scalars("train/tokens_per_s")]
        shares = {}
        for tag in events.Tags()["scalars"]:
            if tag.startswith("train/moe/"):
                shares[tag] = events.Scalars(tag)[-1].value
        results = json.loads((run_dir / "results.json").read_text())
        log = (run_dir / "train.log").read_text()
    params = next((line for line in log.splitlines() if "parameters (" in line), "")
    return {
        "experiment": experiment,
        "val_loss": val[-1].value,
        "steps": results["steps"],
        "reached": f"{reached.wall_time - launched:.1f} s (step {reached.step})"
        if reached
        else "not reached",
        "wall": wall,
        # The first interval includes start-up work: the median of the rest.
        "tokens_per_s": sorted(rates[1:] or rates)[len(rates[1:] or rates) // 2],
        "params": _params(params),
        "expert_spread": _spread(shares),
    }


def _params(log_line: str) -> str:
    """'N total, M active' from the run log's 'training ...' line."""
    total = re.search(r"(\d+) parameters", log_line)
    active = re.search(r"(\d+) active per token", log_line)
    if total is None:
        return "?"
    return f"{int(total.group(1)):,}" + (f" ({int(active.group(1)):,} active)" if active else "")


def _spread(shares: dict[str, float]) -> str:
    """Each expert's share of tokens at the end over the uniform share (1/E): the smallest
    and largest over all layers (within 2x of uniform: 0.5 to 2.0)."""
    if not shares:
        return "-"
    layers: dict[str, list[float]] = {}
    for tag, share in shares.items():
        layers.setdefault(tag.rsplit("/", 1)[0], []).append(share)
    ratios = [share * len(row) for row in layers.values() for share in row]
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="experiment names, then overrides (k=v)")
    parser.add_argument("--target", type=float, default=1.88)
    args = parser.parse_args()
    names = [a for a in args.experiments if "=" not in a]
    overrides = [a for a in args.experiments if "=" in a]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"{datetime.date.today()}, commit {commit}, {platform.machine()} "
        f"{platform.processor() or ''}, overrides: {' '.join(overrides) or 'none'}"
    )
    print(
        f"| experiment | steps | val loss | val loss <= {args.target} | wall (s) | tokens/s "
        "| parameters | expert share / uniform (min–max) |"
    )
    print("|---|---:|---:|---|---:|---:|---|---:|")
    for name in names:
        row = run_recipe(name, overrides, args.target)
        print(
            f"| {row['experiment']} | {row['steps']} | {row['val_loss']:.4f} | {row['reached']} "
            f"| {row['wall']:.1f} | {row['tokens_per_s']:.0f} | {row['params']} "
            f"| {row['expert_spread']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
