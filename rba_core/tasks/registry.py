"""The training tasks by name: each ``task`` value maps to its config class and its builder, so
``rba train`` (and any other entry point) reads, validates and builds every task the same way.

A task's config class subclasses :class:`rba_core.train.TrainerConfig` with a ``task`` field
and the task's own sections; its builder takes that config and the rank's device and returns a
:class:`rba_core.train.TrainTask` that also has ``describe() -> dict`` (the facts ``rba train``
prints first) and ``export(folder)`` (what the run produced, for inference). A new task adds
one entry to ``TASKS``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rba_core.tasks.align import AlignConfig, build_align_task
from rba_core.tasks.distill import DistillConfig, build_distill_task
from rba_core.tasks.rba import RBATaskConfig, build_rba_task
from rba_core.errors import ConfigError
from rba_core.train.config import (
    TrainerConfig, build_config, invalid, read_config_file, with_overrides,
)


@dataclass(frozen=True)
class TaskSpec:
    """How one task name is configured and built."""

    config: type[TrainerConfig]
    build: Callable[[Any, torch.device], Any]


TASKS: dict[str, TaskSpec] = {
    "align": TaskSpec(AlignConfig, build_align_task),
    "sft": TaskSpec(DistillConfig, build_distill_task),
    "kd": TaskSpec(DistillConfig, build_distill_task),
    "rba": TaskSpec(RBATaskConfig, build_rba_task),
}
# What a file (or the command line) without a ``task`` key trains.
DEFAULT_TASK = "kd"


def task_spec(name: Any) -> TaskSpec:
    """The spec of task ``name``; an unknown name is a ConfigError listing the known ones."""
    if not isinstance(name, str) or name not in TASKS:
        invalid("task", "one of " + ", ".join(sorted(TASKS)), name)
    return TASKS[name]


def build_task_config(values: dict[str, Any] | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> TrainerConfig:
    """The validated config of the task that ``values`` plus ``overrides`` name (``task``,
    default ``DEFAULT_TASK``), in that task's config class."""
    merged = with_overrides(values, overrides)
    merged.setdefault("task", DEFAULT_TASK)
    name = merged["task"]
    spec = task_spec(name)
    _check_sections(name, spec.config, merged)
    return build_config(spec.config, merged)


def _check_sections(name: str, config: type[TrainerConfig], values: dict[str, Any]) -> None:
    """A section of another task (a kd file switched to task=align) says whose it is; other
    unknown keys get the config loader's own message."""
    for key in values:
        if key in _fields(config) or key in getattr(config, "MOVED", {}):
            continue
        owners = sorted(other for other, spec in TASKS.items() if key in _fields(spec.config))
        if owners:
            raise ConfigError(f"config section {key!r} belongs to task {' / '.join(owners)}, "
                              f"not task={name}; remove it, or set task to "
                              f"{' or '.join(owners)}")


def _fields(config: type[TrainerConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def load_task_config(path: str | os.PathLike,
                     overrides: list[str] | tuple[str, ...] = ()) -> TrainerConfig:
    """:func:`build_task_config` of a YAML file's sections."""
    return build_task_config(read_config_file(path), overrides)


def build_task(config: TrainerConfig, device: torch.device) -> Any:
    """The task that ``config`` (from :func:`build_task_config`) describes, on ``device``."""
    name = getattr(config, "task", None)
    spec = task_spec(name)
    if not isinstance(config, spec.config):
        raise TypeError(f"build_task: task {name!r} takes a {spec.config.__name__}, got a "
                        f"{type(config).__name__}; build it with build_task_config")
    return spec.build(config, device)
