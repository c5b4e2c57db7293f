"""The generic trainer: AdamW, warm-up + cosine, clipping, accumulation, torchrun DDP / FSDP2,
atomic checkpoints with exact resume, JSON Lines metrics. It knows nothing about audio; the
model, data and loss come from a :class:`TrainTask` (the SpeechLM's are in
:mod:`rba_core.tasks`, with the config sections beyond :class:`TrainerConfig`).

    from rba_core.train import Trainer, TrainerConfig, build_config
    config = build_config(TrainerConfig, {"optim": {"lr": 1e-3}}, ["run.max_steps=100"])
    Trainer(config, my_task).train()
"""
from rba_core.train.config import (
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainerConfig,
    build_config,
    config_to_dict,
    load_config,
)
from rba_core.train.distributed import DistInfo, init_distributed, shutdown
from rba_core.train.metrics import plot_metrics, read_metrics
from rba_core.train.schedule import lr_multiplier
from rba_core.train.trainer import Trainer, TrainResult, TrainTask, seed_everything

__all__ = [
    "DistInfo", "OptimConfig", "RunConfig", "ScheduleConfig", "TrainResult", "TrainTask",
    "Trainer", "TrainerConfig", "build_config", "config_to_dict", "init_distributed",
    "load_config", "lr_multiplier", "plot_metrics", "read_metrics", "seed_everything",
    "shutdown",
]
