"""The learning-rate schedule (rba_core/train/schedule.py) against a float64 formula written
here: linear warm-up on the line through 0 at step -1 (so the first update already moves the
weights), reaching 1 at step warmup_steps - 1; cosine from 1 at warmup_steps to min_lr_ratio at
total_steps, held there after; the boundary steps; and the LambdaLR built on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rba_core.errors import ConfigError
from rba_core.train import lr_multiplier
from rba_core.train.config import ScheduleConfig
from rba_core.train.schedule import build_scheduler


def reference(steps: np.ndarray, total: int, kind: str, warmup: int, floor: float) -> np.ndarray:
    steps = steps.astype(np.float64)
    warm = (steps + 1.0) / max(warmup, 1)
    if kind == "constant":
        after = np.ones_like(steps)
    else:
        progress = np.clip((steps - warmup) / max(total - warmup, 1), 0.0, 1.0)
        after = floor + (1.0 - floor) * (1.0 + np.cos(np.pi * progress)) / 2.0
    return np.where(steps < warmup, warm, after)


CASES = [("cosine", 4, 0.1, 20), ("cosine", 0, 0.0, 10), ("cosine", 1, 0.5, 7),
         ("cosine", 10, 0.0, 10), ("cosine", 3, 1.0, 9), ("cosine", 7, 0.2, 5),
         ("constant", 2, 0.0, 10), ("constant", 0, 0.3, 4)]


@pytest.mark.parametrize("kind, warmup, floor, total", CASES)
def test_multiplier_equals_the_float64_formula(kind, warmup, floor, total):
    config = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=floor)
    steps = np.arange(total + 5)           # past the end too: held at the floor
    got = np.array([lr_multiplier(int(s), total, config) for s in steps])
    np.testing.assert_allclose(got, reference(steps, total, kind, warmup, floor),
                               rtol=1e-12, atol=1e-12)


def test_warmup_is_linear_and_starts_above_zero():
    config = ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.0)
    values = [lr_multiplier(step, 50, config) for step in range(5)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0], rel=1e-12)
    assert values[0] > 0                     # the first update is not wasted
    assert np.allclose(np.diff(values), 0.2)


def test_boundary_steps():
    config = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    total = 20
    at = lambda step: lr_multiplier(step, total, config)  # noqa: E731
    assert at(3) == pytest.approx(1.0) and at(4) == pytest.approx(1.0)   # peak, both sides
    assert at(5) < 1.0
    assert at(12) == pytest.approx(0.1 + 0.9 / 2)                       # half-way down
    assert at(total) == pytest.approx(0.1) and at(total + 100) == pytest.approx(0.1)
    assert at(total - 1) > 0.1
    decay = [at(step) for step in range(4, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # No warm-up: the very first step runs at the full rate.
    assert lr_multiplier(0, total, ScheduleConfig(warmup_steps=0)) == 1.0
    assert lr_multiplier(3, 10, ScheduleConfig(kind="constant", warmup_steps=0)) == 1.0


def test_scheduler_applies_the_multiplier_and_resumes_from_its_state():
    config = ScheduleConfig(kind="cosine", warmup_steps=3, min_lr_ratio=0.25)
    total, lr = 12, 0.02

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)

    opt = optimizer()
    scheduler = build_scheduler(opt, total, config)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    # A resume restores the optimizer (its param groups hold the current rate) and then the
    # scheduler's counter, as the trainer's checkpoint does.
    opt2 = optimizer()
    resumed = build_scheduler(opt2, total, config)
    opt2.load_state_dict(opt.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for _ in range(6, total + 1):
        seen.append(opt2.param_groups[0]["lr"])
        opt2.step()
        resumed.step()
    want = reference(np.arange(total + 1), total, "cosine", 3, 0.25) * lr
    np.testing.assert_allclose(seen, want, rtol=1e-12)


@pytest.mark.parametrize("changes, field", [
    (dict(kind="linear"), "schedule.kind"), (dict(warmup_steps=-1), "schedule.warmup_steps"),
    (dict(min_lr_ratio=1.5), "schedule.min_lr_ratio"),
    (dict(min_lr_ratio=float("nan")), "schedule.min_lr_ratio"),
])
def test_bad_schedules_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        ScheduleConfig(**changes).validate()
