"""Accuracy and time to accuracy of a real `python train.py` run.

Launches the command, then reads its TensorBoard events: the wall-clock time
of the first validation at or above --target (measured from the launch), the
final test accuracy, epochs and total wall time.

    python scripts/bench_accuracy.py --target 0.98                       # defaults: MLP, MNIST
    python scripts/bench_accuracy.py --target 0.993 model=cnn trainer.max_epochs=8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.98, help="val/acc to reach")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        launched = time.time()
        subprocess.run(
            [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *args.overrides],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.time() - launched
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        val = events.Scalars("val/acc")
        reached = next((e for e in val if e.value >= args.target), None)
        results = json.loads((run_dir / "results.json").read_text())
    when = f"{reached.wall_time - launched:.1f} s (step {reached.step})" if reached else "never"
    print(f"command: python train.py {' '.join(args.overrides)}")
    print(
        f"val/acc >= {args.target} after {when}; best val/acc {results['metrics']['val/acc']:.4f}; "
        f"test/acc {results['metrics']['test/acc']:.4f}; epochs {results['epochs']}; "
        f"wall {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
