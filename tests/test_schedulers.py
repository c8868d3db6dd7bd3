from __future__ import annotations

import pytest
import torch

from trainer.errors import ConfigError
from trainer.schedulers import cosine_with_warmup, one_cycle, step_decay


def lrs(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_cosine_warms_up_linearly_then_decays_to_the_floor() -> None:
    seen = lrs(lambda o: cosine_with_warmup(o, 100, 10, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert seen[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert seen[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(seen[9:], seen[10:], strict=False))
    assert seen[-1] == pytest.approx(0.1, abs=1e-3)


def test_step_decay_counts_epochs_in_optimizer_steps() -> None:
    seen = lrs(lambda o: step_decay(o, 60, 10, step_size_epochs=2, gamma=0.5), 60)
    assert seen[19] == 1.0 and seen[20] == 0.5 and seen[40] == 0.25


def test_one_cycle_peaks_at_max_lr() -> None:
    seen = lrs(lambda o: one_cycle(o, 100, 10, max_lr=2.0, pct_start=0.3), 100)
    assert max(seen) == pytest.approx(2.0) and seen.index(max(seen)) in (29, 30)
    assert seen[0] == pytest.approx(2.0 / 25) and seen[-1] < 1e-3


def test_warmup_longer_than_run_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="warmup"):
        lrs(lambda o: cosine_with_warmup(o, 10, 10, warmup_steps=10), 1)


def test_scheduler_state_survives_a_weights_only_round_trip(tmp_path) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, 50, 10, warmup_ratio=0.1)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh = cosine_with_warmup(optimizer, 50, 10, warmup_ratio=0.1)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.last_epoch == 7
