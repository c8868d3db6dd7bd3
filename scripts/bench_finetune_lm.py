"""Before and after: the pre-trained language-model recipes, run as a user runs them.

Runs `python train.py experiment=<name>` for each name given (the SmolLM2 recipes validate
their starting weights at step 0, `trainer.val_at_start=true`), reads the run's TensorBoard
events and prints one markdown row each: steps, wall time from the launch, and each
validation metric at step 0 and at the end; then the held-out prompts' answers at step 0
and at the end (TensorBoard's Text tab, `answers`).

    python scripts/bench_finetune_lm.py smollm2_sft_chatterbot smollm2_domain_shakespeare \
        smollm2_dpo_chatterbot
    python scripts/bench_finetune_lm.py smollm2_sft_chatterbot trainer.max_steps=20   # shorter
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import provenance, recipe_run  # noqa: E402

# What each task's row shows, in this order, when logged.
METRICS = ["val/loss", "val/ppl", "val/token_acc", "val/reward_acc", "val/reward_margin", "val/kl"]


def run_experiment(experiment: str, overrides: list[str]) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with recipe_run(experiment, overrides) as (run_dir, _, wall):
        events = EventAccumulator(
            str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
        )
        events.Reload()
    tags = events.Tags()
    metrics = {
        name: (events.Scalars(name)[0], events.Scalars(name)[-1])
        for name in METRICS
        if name in tags["scalars"]
    }
    answers = []
    if "answers/text_summary" in tags["tensors"]:
        texts = events.Tensors("answers/text_summary")
        answers = [
            (e.step, e.tensor_proto.string_val[0].decode().strip("`\n"))
            for e in (texts[0], texts[-1])
        ]
    steps = max(last.step for _, last in metrics.values())
    return {"experiment": experiment, "wall": wall, "steps": steps, "metrics": metrics,
            "answers": answers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="experiment names, then overrides (k=v)")
    args = parser.parse_args()
    names = [a for a in args.experiments if "=" not in a]
    overrides = [a for a in args.experiments if "=" in a]
    print(provenance(), f"Overrides: {' '.join(overrides) or 'none'}.")
    print("\n| experiment | steps | wall (s) | metric: step 0 → end |")
    print("|---|---:|---:|---|")
    rows = []
    for name in names:
        row = run_experiment(name, overrides)
        rows.append(row)
        cells = ", ".join(
            f"{tag.removeprefix('val/')} {first.value:.4g} → {last.value:.4g}"
            for tag, (first, last) in row["metrics"].items()
        )
        print(f"| `{name}` | {row['steps']} | {row['wall']:.0f} | {cells} |", flush=True)
    for row in rows:
        for step, text in row["answers"]:
            print(f"\n`{row['experiment']}`, answers at step {step}:\n\n{text}")


if __name__ == "__main__":
    main()
