"""Rerun every figure of the README's "Results and speed" and print that section's tables.

    python scripts/bench_readme.py                      # all rows: about 15 min on 2 CPU cores
    python scripts/bench_readme.py --only mlp,cnn       # some rows
    python scripts/bench_readme.py --rounds 1 --runs 1 trainer=debug   # a quick smoke run

Each row comes from the bench script that measures it (bench_accuracy.py,
bench_overhead.py, bench_startup.py, each with --markdown); the tables are headed
by the date, the machine and the git commit they were measured on. Paste the
output over the README's tables. Extra arguments are Hydra overrides given to
every run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench_accuracy import HEADER
from bench_common import REPO, provenance

# README row -> the bench command that measures it (after `python scripts/`).
ACCURACY = {
    "mlp": ["bench_accuracy.py", "--target", "0.98"],
    "cnn": ["bench_accuracy.py", "model=cnn"],
    "fashion": ["bench_accuracy.py", "data=fashion_mnist", "model=cnn"],
}
BENCHMARKS = {"overhead": ["bench_overhead.py"], "startup": ["bench_startup.py"]}


def row(command: list[str], extra: list[str]) -> str:
    script, *args = command
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--markdown", *args, *extra],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join([*ACCURACY, *BENCHMARKS]))
    parser.add_argument("--rounds", type=int, default=20, help="bench_overhead.py --rounds")
    parser.add_argument("--runs", type=int, default=7, help="bench_startup.py --runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    only = args.only.split(",")
    unknown = set(only) - set(ACCURACY) - set(BENCHMARKS)
    if unknown:
        parser.error(f"--only: unknown rows {sorted(unknown)}; rows: {[*ACCURACY, *BENCHMARKS]}")
    print(provenance())
    rows = [row(cmd, args.overrides) for name, cmd in ACCURACY.items() if name in only]
    if rows:
        print("", *HEADER, *rows, sep="\n", flush=True)
    counts = {"overhead": ["--rounds", str(args.rounds)], "startup": ["--runs", str(args.runs)]}
    rows = [
        row([*cmd, *counts[name]], args.overrides)
        for name, cmd in BENCHMARKS.items()
        if name in only
    ]
    if rows:
        print("", "| benchmark | figure |", "|---|---|", *rows, sep="\n")


if __name__ == "__main__":
    main()
