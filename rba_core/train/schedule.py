"""Learning-rate schedules as multipliers of the base rate, one value per optimizer step."""
from __future__ import annotations

import math

import torch

from rba_core.train.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """The factor applied to the base learning rate at optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 at step ``warmup_steps - 1`` so that the first update already
    moves the weights; cosine then falls from 1 at ``warmup_steps`` to ``min_lr_ratio`` at
    ``total_steps``.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = config.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (step count, base rates) round-trips through ``state_dict``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, config))
