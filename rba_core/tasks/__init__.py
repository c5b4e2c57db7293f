"""Training tasks, one module each, with their packaged configs under ``configs/``:

- ``speech``: what every SpeechLM task shares (the task / model / data sections, the
  SpeechLM and dataset builders, per-rank batching, token weighting, FSDP layers, export);
- ``align``: CTC pre-alignment of the adapter (``task=align``);
- ``distill``: SFT and KD (``task=sft``, ``task=kd``; the ``kd`` section);
- ``rba``: RBA's RL step (``task=rba``; the ``rba`` section), for the SpeechLM and in text
  mode;
- ``registry``: task name -> config class and builder.

A task builds its model, data and loss from its config; the trainer runs it.
"""
from rba_core.tasks.registry import (
    DEFAULT_TASK,
    TASKS,
    TaskSpec,
    build_task,
    build_task_config,
    load_task_config,
    task_spec,
)

__all__ = ["DEFAULT_TASK", "TASKS", "TaskSpec", "build_task", "build_task_config",
           "load_task_config", "task_spec"]
