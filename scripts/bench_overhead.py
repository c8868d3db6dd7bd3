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

from trainer.config import register_configs
from trainer.optim import build_optimizer
from trainer.trainer import Trainer


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def build(cfg, data, steps_per_epoch):
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all")
    optimizer = build_optimizer(
        instantiate(cfg.optimizer, _convert_="all"), model, cfg.optimizer.weight_decay
    )
    scheduler = instantiate(cfg.scheduler, _convert_="all")(
        optimizer, total_steps=steps_per_epoch, steps_per_epoch=steps_per_epoch
    )
    return model, optimizer, scheduler, instantiate(cfg.loss)


def hand_loop(cfg, data, train_batches, val_batches) -> float:
    model, optimizer, scheduler, loss_fn = build(cfg, data, len(train_batches))
    started = time.perf_counter()
    model.train()
    for x, y in train_batches.epoch(0):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    with torch.inference_mode():
        for x, y in val_batches.epoch(0):
            correct += (model(x).argmax(1) == y).sum()
    correct.item()
    return time.perf_counter() - started


def trainer_loop(cfg, data, workdir: Path) -> float:
    train_len = len(data.batches("train"))
    model, optimizer, scheduler, loss_fn = build(cfg, data, train_len)
    logger = instantiate(cfg.logger, log_dir=str(workdir))
    trainer = Trainer(
        cfg.trainer,
        model,
        loss_fn,
        optimizer,
        scheduler,
        data,
        torch.device("cpu"),
        max_steps=train_len,
        logger=logger,
        checkpoint_dir=workdir / "checkpoints",
        checkpoint_cfg=cfg.checkpoint,
        seed=cfg.seed,
        run_config={"bench": True},
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
    args = parser.parse_args()
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
    train_batches = data.batches("train", seed=cfg.seed)
    val_batches = data.batches("val")
    samples = len(train_batches) * cfg.data.batch_size
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
            f"round {round_}: hand {hand_rates[-1]:8.0f} samples/s  "
            f"trainer {trainer_rates[-1]:8.0f} samples/s  ratio {ratios[-1]:.3f}"
        )
    print(
        f"median: hand {statistics.median(hand_rates):.0f} samples/s, "
        f"trainer {statistics.median(trainer_rates):.0f} samples/s, "
        f"trainer/hand throughput ratio {statistics.median(ratios):.3f}"
    )
    if args.markdown:
        what = (
            "`scripts/bench_overhead.py`: Trainer (TensorBoard, progress bar, per-epoch "
            "validation and checkpoint) / hand-written loop, same model and batches, "
            f"{args.rounds} alternating 1-epoch rounds (`--rounds {args.rounds}`)"
        )
        figure = (
            f"median throughput ratio {statistics.median(ratios):.3f} (rounds "
            f"{min(ratios):.2f}–{max(ratios):.2f}; {statistics.median(trainer_rates) / 1e3:.1f}k "
            f"vs {statistics.median(hand_rates) / 1e3:.1f}k samples/s)"
        )
        print(markdown_row([what, figure]))
    sys.exit(0)


if __name__ == "__main__":
    main()
