"""A tiny regression :class:`TrainTask`: the reference implementation of the protocol, used by
the trainer's tests and as a template for new tasks.

It touches every random generator the trainer must restore on resume: dropout draws from torch,
input noise from NumPy and a per-batch scale from Python's ``random``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


class ToyRegressionTask:
    """Fit ``y = tanh(x @ w)`` with a frozen input layer and a trainable two-layer head.

    ``poison`` lists ``(epoch, batch_index)`` pairs (per rank) whose inputs are NaN, to
    exercise the skip of non-finite losses.
    """

    def __init__(self, *, samples: int = 32, dim: int = 6, hidden: int = 12,
                 batch_size: int = 4, dropout: float = 0.1, noise: bool = True,
                 init_seed: int = 0, poison: tuple[tuple[int, int], ...] = (),
                 device: str | torch.device = "cpu") -> None:
        data = torch.Generator().manual_seed(1234)
        self.x = torch.randn(samples, dim, generator=data)
        target = torch.randn(dim, 1, generator=data)
        self.y = torch.tanh(self.x @ target)
        self.batch_size = batch_size
        self.noise = noise
        self.poison = set(poison)
        # State beyond the parameters, saved through state_dict(): resume must restore it.
        self.batches_seen = 0
        self.device = torch.device(device)
        self.model = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(),
            nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout)),
            nn.Linear(hidden, 1),
        )
        init = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():
            for param in self.model.parameters():
                param.copy_(torch.randn(param.shape, generator=init) * 0.5)
        self.model[0].requires_grad_(False)
        self.model.to(self.device)
        self.model.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_modules(self) -> list[nn.Module]:
        return [self.model[2], self.model]

    def train_batches(self, epoch: int, rank: int, world_size: int, seed: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        # One permutation of the whole set per epoch, strided over ranks, so that batch j of
        # every rank together is batch j of a single process with world_size times the size.
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(
            seed * 100_003 + epoch))
        shard = order[rank::world_size]
        batches = []
        for index in range(len(shard) // self.batch_size):
            rows = shard[index * self.batch_size:(index + 1) * self.batch_size]
            batches.append((self.x[rows], self.y[rows], (epoch, index) in self.poison))
        return batches

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, bool]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y, poisoned = batch
        self.batches_seen += 1
        x, y = x.to(self.device), y.to(self.device)
        if poisoned:
            x = torch.full_like(x, float("nan"))
        if self.noise:
            x = x + 0.05 * torch.from_numpy(np.random.standard_normal(x.shape)).to(x)
            x = x * (1.0 + 0.01 * random.random())
        prediction = self.model(x)
        loss = nn.functional.mse_loss(prediction.float(), y)
        return loss, {"mse": float(loss.detach()), "tokens": float(len(x))}

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_seen = int(state["batches_seen"])
