"""Framework overhead: Trainer throughput / hand-written loop throughput, in one process.

Both loops train the same model on the same in-memory MNIST batches with the
same optimizer and schedule for one epoch, then validate. The Trainer runs with
everything on: TensorBoard logging, a progress bar (drawn into a sink that
claims to be a terminal), per-epoch validation and checkpoints. Rounds
alternate which loop goes first, so drift on a shared machine hits both.

    python scripts/bench_overhead.py [--rounds 5] [--markdown] [extra overrides...]

`--markdown` ends with the row of the README's benchmark table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import markdown_row
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch.nn import functional as F

from trainer.checkpoint.resume import CheckpointFiles
from trainer.config.schema import register_configs
from trainer.distributed.context import SINGLE
from trainer.loop.trainer import Trainer
from trainer.optim import build_optimizer
from trainer.run import split_batches


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def build(cfg, data, steps_per_epoch):
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all")
    optimizer = build_optimizer(
        instantiate(cfg.optimizer, _convert_="all"), model, cfg.optimizer.weight_decay
    )
    scheduler = None
    if cfg.scheduler and cfg.scheduler.get("_target_"):
        scheduler = instantiate(cfg.scheduler, _convert_="all")(
            optimizer, total_steps=steps_per_epoch, steps_per_epoch=steps_per_epoch
        )
    return model, optimizer, scheduler


def hand_loss(model, batch) -> torch.Tensor:
    """What a user writes by hand: cross-entropy on (x, y) or on token windows."""
    if isinstance(batch, dict):
        logits = model(batch["input_ids"])
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    x, y = batch
    return F.cross_entropy(model(x), y)


def hand_loop(cfg, data, train_batches, val_batches) -> float:
    model, optimizer, scheduler = build(cfg, data, len(train_batches))
    clip = cfg.trainer.gradient_clip_val
    started = time.perf_counter()
    model.train()
    for batch in train_batches.epoch(0):
        loss = hand_loss(model, batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    model.eval()
    total = torch.zeros(())
    with torch.inference_mode():
        for batch in val_batches.epoch(0):
            total += hand_loss(model, batch)
    total.item()
    return time.perf_counter() - started


def trainer_loop(cfg, data, workdir: Path) -> float:
    train_len = len(data.batches("train", limit_batches=cfg.trainer.limit_train_batches))
    model, optimizer, scheduler = build(cfg, data, train_len)
    logger = instantiate(cfg.logger, log_dir=str(workdir))
    task = instantiate(cfg.task, loss=instantiate(cfg.loss), _convert_="all")
    task.setup(model, torch.device("cpu"), getattr(data, "tokenizer", None))
    trainer = Trainer(
        cfg.trainer,
        model,
        task,
        optimizer,
        scheduler,
        split_batches(data, cfg.trainer, cfg.seed, SINGLE),
        torch.device("cpu"),
        max_steps=train_len,
        files=CheckpointFiles.from_config(workdir / "checkpoints", cfg.checkpoint),
        checkpoint_cfg=cfg.checkpoint,
        logger=logger,
        extra_state={"config": {"bench": True}},
    )
    sink = _FakeTerminal()
    with contextlib.redirect_stderr(sink):
        started = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - started
    logger.close()
    assert "epoch 0" in sink.getvalue(), "the progress bar did not draw"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="end with the README row")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=cnn")
    args = parser.parse_intermixed_args()  # overrides may come before and after --rounds
    data_dir = os.environ.get("TRAINER_DATA_DIR", str(Path(__file__).parents[2] / "shared/data"))
    register_configs()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.data_dir={data_dir}",
                "paths.output_dir=unused",
                "trainer.max_epochs=1",
                "trainer.test_after_fit=false",
                *args.overrides,
            ],
        )
    data = instantiate(cfg.data, _convert_="all")
    data.setup(torch.device("cpu"))
    train_batches = data.batches(
        "train", seed=cfg.seed, limit_batches=cfg.trainer.limit_train_batches
    )
    val_batches = data.batches("val", limit_batches=cfg.trainer.limit_val_batches)
    # Samples, or tokens for a language model: what the task counts.
    first = next(iter(train_batches.epoch(0)))
    unit = "tokens" if isinstance(first, dict) else "samples"
    per_batch = first["input_ids"].numel() if isinstance(first, dict) else len(first[1])
    samples = len(train_batches) * per_batch
    print(
        f"model={cfg.model._target_.rsplit('.', 1)[-1]} batch={cfg.data.batch_size} "
        f"steps/epoch={len(train_batches)} threads={torch.get_num_threads()}"
    )
    # Warm-up of both: allocator, thread pool, and one-time imports (TensorBoard).
    hand_loop(cfg, data, train_batches, val_batches)
    with tempfile.TemporaryDirectory() as tmp:
        trainer_loop(cfg, data, Path(tmp))
    ratios, hand_rates, trainer_rates = [], [], []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            order = ("hand", "trainer") if round_ % 2 == 0 else ("trainer", "hand")
            times = {}
            for name in order:
                if name == "hand":
                    times[name] = hand_loop(cfg, data, train_batches, val_batches)
                else:
                    times[name] = trainer_loop(cfg, data, Path(tmp))
        hand_rates.append(samples / times["hand"])
        trainer_rates.append(samples / times["trainer"])
        ratios.append(times["hand"] / times["trainer"])
        print(
            f"round {round_}: hand {hand_rates[-1]:8.0f} {unit}/s  "
            f"trainer {trainer_rates[-1]:8.0f} {unit}/s  ratio {ratios[-1]:.3f}"
        )
    print(
        f"median: hand {statistics.median(hand_rates):.0f} {unit}/s, "
        f"trainer {statistics.median(trainer_rates):.0f} {unit}/s, "
        f"trainer/hand throughput ratio {statistics.median(ratios):.3f}"
    )
    if args.markdown:
        what = (
            "`scripts/bench_overhead.py`: Trainer (TensorBoard, progress bar, per-epoch "
            "validation and checkpoint) / hand-written loop, same model and batches, "
            f"{args.rounds} alternating 1-epoch rounds (`--rounds {args.rounds}`"
            + "".join(f" {o}" for o in args.overrides)
            + ")"
        )
        figure = (
            f"median throughput ratio {statistics.median(ratios):.3f} (rounds "
            f"{min(ratios):.2f}–{max(ratios):.2f}; {statistics.median(trainer_rates) / 1e3:.1f}k "
            f"vs {statistics.median(hand_rates) / 1e3:.1f}k {unit}/s)"
        )
        print(markdown_row([what, figure]))
    sys.exit(0)


if __name__ == "__main__":
    main()
