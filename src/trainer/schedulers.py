"""Learning-rate schedules for the `scheduler` config group.

Each factory takes the optimizer plus the run's length in optimizer steps, which
is only known once the data is set up, and returns a scheduler that the Trainer
steps once per optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from trainer.errors import ConfigError


class _WarmupCosine:
    """lr multiplier: linear warmup to 1, then cosine decay to min_lr_ratio.

    A class rather than a closure so LambdaLR can save and restore it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


class _StepDecay:
    def __init__(self, step_size: int, gamma: float) -> None:
        self.step_size = step_size
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    warmup = warmup_steps or int(round(warmup_ratio * total_steps))
    if warmup >= total_steps:
        raise ConfigError(
            f"scheduler warmup ({warmup} steps) must be shorter than the run ({total_steps} steps)"
        )
    return LambdaLR(optimizer, _WarmupCosine(warmup, total_steps, min_lr_ratio))


def step_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    step_size_epochs: int = 3,
    gamma: float = 0.1,
) -> LRScheduler:
    if step_size_epochs < 1:
        raise ConfigError(f"scheduler.step_size_epochs={step_size_epochs} must be >= 1")
    return LambdaLR(optimizer, _StepDecay(step_size_epochs * steps_per_epoch, gamma))


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    max_lr: float,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
) -> LRScheduler:
    # OneCycleLR divides by the length of each phase; a phase under one step crashes it.
    warmup_end = pct_start * total_steps - 1
    if not 0 < warmup_end < total_steps - 1:
        raise ConfigError(
            f"scheduler=onecycle needs each phase to last at least a step, but "
            f"scheduler.pct_start={pct_start} of {total_steps} steps does not allow it; "
            "train for more steps, change pct_start, or use scheduler=cosine"
        )
    # A float max_lr would give every group the same peak; keep their lr multipliers.
    return OneCycleLR(
        optimizer,
        max_lr=[max_lr * group.get("lr_mult", 1.0) for group in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
        # Momentum cycling fights Adam's betas and surprises SGD users; keep it off.
        cycle_momentum=False,
    )
