"""The generic training loop. It knows optimizers, schedules, checkpoints, ranks and logging,
and nothing about audio: the model, the data and the loss come from a :class:`TrainTask`."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from rba_core.errors import CheckpointError, ConfigError
from rba_core.files import write_text_atomic
from rba_core.train import checkpoint as ckpt
from rba_core.train import distributed as dd
from rba_core.train.config import TrainerConfig, config_to_dict
from rba_core.train.schedule import build_scheduler
from rba_core.train.run_lock import run_lock
from rba_core.train.step_log import COUNTED, RunCounters, SkippedSamples, StepLog

logger = logging.getLogger("rba.train")


@runtime_checkable
class TrainTask(Protocol):
    """What the trainer needs from a model + data + loss: the three methods below, plus the
    optional ones it uses when present.

    ``train_batches`` must be a pure function of its arguments (same batches in the same order
    for the same epoch, rank, world size and seed): exact resume replays it and skips the
    batches already trained on (or, when the returned object has ``iter_from(n)``, asks it to
    start at batch ``n`` without loading the ones before). Its iterator is pulled lazily, one
    optimizer step's ``optim.grad_accum`` batches right before that step, so a batch may be
    made from the weights as they are then (rollouts of the current policy).

    ``loss(batch)`` returns a scalar tensor and a dict of float metrics. ``tokens`` and
    ``samples`` are counts, summed over the step's micro-batches (``tokens`` also gives
    ``tokens_per_s`` and ``tokens_seen``); every other key is averaged over the micro-batches,
    then over the steps of a ``run.log_every`` window and over ranks, and written to
    ``metrics.jsonl`` (a key some steps lack is averaged over the steps that have it).

    Optional methods:

    - ``batch_weight(batch) -> float`` (e.g. its token count) weights micro-batches and ranks
      by it, so that a per-token mean loss trains exactly as on the combined batch;
    - ``fsdp_modules() -> list[nn.Module]`` (innermost first) for ``run.strategy=fsdp``;
    - ``on_step_end(step, record) -> dict[str, float] | None`` runs on every rank after each
      optimizer step (1-based ``step``; ``record`` holds the step's metrics, ``lr``,
      ``grad_norm`` and ``skipped``), before logging and checkpointing: per-step work such as
      an adaptive KL controller or a periodic evaluation, whose returned metrics join the
      step's record;
    - ``skipped_samples() -> Iterable[tuple[str, str]]``: the ``(sample, reason)`` pairs this
      rank's data has left out so far (a corrupt manifest line, a clip that does not decode),
      the sample named so that the same one gives the same name on every rank; the trainer
      counts each once per reason over ranks, epochs and a resume, in ``metrics.jsonl``
      (``skipped_samples``) and ``TrainResult.skipped_samples``;
    - ``state_dict() -> Any`` / ``load_state_dict(state)``: state beyond the trainable
      parameters (counters, controllers, frozen reference weights) that exact resume needs.
      ``state_dict()`` is called on every rank at each checkpoint (so it may gather across
      ranks); rank 0's result is saved in ``task.pt`` with ``torch.save``, and every rank
      gets it back through ``load_state_dict`` before the first resumed step.
    """

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def train_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> Iterable[Any]: ...

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class TrainResult:
    """Where a finished run ended. ``skipped_samples``: samples the data left out over the
    whole run, per reason."""

    step: int
    epoch: int
    skipped_steps: int
    nonfinite_loss: int
    nonfinite_grad: int
    output_dir: Path
    checkpoint: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    skipped_samples: dict[str, int] = field(default_factory=dict)
    # True when ``run.time_budget_minutes`` ended the run before max_steps / max_epochs.
    stopped_by_budget: bool = False
    train_seconds: float = 0.0


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) from one seed; ranks get distinct streams so
    that dropout differs between replicas, as it would across one larger batch."""
    derived = (seed + 1_000_003 * rank) % (2**63)
    random.seed(derived)
    np.random.seed(derived % (2**32))
    torch.manual_seed(derived)


_END = object()

# The clock the time budget reads (a seam for tests).
_step_clock = time.perf_counter

# Restored with the optimizer's state, so a new value in the config would not take effect.
_OPTIMIZER_STATE = ("lr", "betas", "eps", "weight_decay")
# Settings a resumed run may change and stay the same run: how long it goes on, where it runs,
# and how it reports and checkpoints.
_RESUMABLE = frozenset(f"run.{name}" for name in (
    "output_dir", "max_steps", "max_epochs", "time_budget_minutes", "device", "strategy",
    "log_every",
    "checkpoint_every", "keep_last", "resume", "tensorboard", "progress", "plot"))


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as ``{"section.field": value}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


@dataclass
class Position:
    """Where the run is: optimizer steps taken, the epoch, and the batches of that epoch this
    rank has consumed (what a checkpoint records and a resume continues from)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class Trainer:
    """Run ``task`` under ``config``: ``Trainer(config, task).train()``.

    Build the task after :func:`rba_core.train.init_distributed` (for its device) and after
    :func:`seed_everything` (for identical initial weights on every rank); the trainer also
    broadcasts rank 0's trainable weights before the first step.
    """

    def __init__(self, config: TrainerConfig, task: TrainTask, *,
                 dist_info: dd.DistInfo | None = None) -> None:
        config.validate()
        for name in ("trainable_parameters", "train_batches", "loss"):
            if not callable(getattr(task, name, None)):
                raise ConfigError(f"the task {type(task).__name__} has no {name}(); a TrainTask "
                                  "needs trainable_parameters(), train_batches() and loss()")
        self.config = config
        self.task = task
        self.dist = dist_info or dd.init_distributed(config.run.device)
        self.output_dir = Path(config.run.output_dir)
        self.counters = RunCounters()
        self.skipped = SkippedSamples(task, self.dist)

    # ----------------------------------------------------------------------------- set-up
    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.config.run.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.dist.device.type == "cuda" else "float32"
        if dtype == "bfloat16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _params(self) -> list[nn.Parameter]:
        params = list(self.task.trainable_parameters())
        if not params:
            raise ConfigError(f"{type(self.task).__name__}.trainable_parameters() is empty; "
                              "nothing would train (unfreeze a module or add an adapter)")
        seen = set()
        for index, param in enumerate(params):
            if not isinstance(param, torch.Tensor) or not param.requires_grad:
                raise ConfigError(f"{type(self.task).__name__}.trainable_parameters()[{index}] "
                                  "does not require grad; return only trainable parameters")
            if id(param) in seen:
                raise ConfigError(f"{type(self.task).__name__}.trainable_parameters()[{index}] "
                                  "is listed twice; list each parameter once")
            seen.add(id(param))
        return params

    def _fsdp_modules(self) -> list[nn.Module]:
        getter = getattr(self.task, "fsdp_modules", None)
        if getter is None:
            raise ConfigError(f"run.strategy=fsdp needs {type(self.task).__name__}."
                              "fsdp_modules() naming the modules to shard; use run.strategy=ddp")
        return list(getter())

    def _first_batches(self) -> Iterable[Any]:
        return self.task.train_batches(0, self.dist.rank, self.dist.world_size, self.config.seed)

    def _total_steps(self) -> int:
        run = self.config.run
        per_epoch = None
        batches = self._first_batches()
        if hasattr(batches, "__len__"):
            count = dd.min_over_ranks(len(batches), self.dist)  # type: ignore[arg-type]
            per_epoch = count // self.config.optim.grad_accum
            if per_epoch == 0:
                raise ConfigError(
                    f"an epoch gives this rank {count} batches, fewer than optim.grad_accum="
                    f"{self.config.optim.grad_accum}; lower data.batch_size or grad_accum, or "
                    "use more data")
        if run.max_steps > 0:
            if run.max_epochs > 0 and per_epoch is not None:
                return min(run.max_steps, run.max_epochs * per_epoch)
            return run.max_steps
        if per_epoch is None:
            raise ConfigError("run.max_steps must be > 0 when the task's batches have no length "
                              "(the schedule needs to know how many steps there are)")
        return run.max_epochs * per_epoch

    # ------------------------------------------------------------------------ checkpoints
    def _resume_from(self) -> Path | None:
        resume = self.config.run.resume
        if resume == "never":
            if ckpt.list_checkpoints(self.output_dir):
                raise ConfigError(f"run.output_dir {self.output_dir} already holds checkpoints "
                                  "and run.resume=never; use run.resume=auto to continue it or "
                                  "choose a new run.output_dir")
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.output_dir)
        return Path(resume)

    def save(self, at: Position) -> Path | None:
        """Write a checkpoint from every rank's state; only rank 0 touches the disk."""
        params = [dd.full_tensor(p.detach()) for p in self.params]
        optimizer_state = self.optimizer.state_dict()
        # state_dict() shares the live per-parameter dicts: build new ones, never assign into
        # them, or the running optimizer would continue on gathered CPU copies.
        optimizer_state["state"] = {
            index: {key: dd.full_tensor(value).to("cpu") if isinstance(value, torch.Tensor)
                    else value for key, value in sorted(entry.items())}
            for index, entry in sorted(optimizer_state["state"].items())}
        rng_states = dd.gather_objects(ckpt.capture_rng(), self.dist)
        self.skipped.update()
        state_fn = getattr(self.task, "state_dict", None)
        task_state = state_fn() if callable(state_fn) else None
        path = None
        if self.dist.is_main:
            state = {
                "step": at.step, "epoch": at.epoch, "position": at.batch,
                "world_size": self.dist.world_size,
                "scheduler": self.scheduler.state_dict(),
                **dataclasses.asdict(self.counters),
                "skipped_samples": self.skipped.state_dict(),
                "config": config_to_dict(self.config),
            }
            path = ckpt.write_checkpoint(
                self.output_dir, at.step, params=params, optimizer_state=optimizer_state,
                rng_states=rng_states, task_state=task_state, state=state,
                keep_last=self.config.run.keep_last)
        dd.barrier(self.dist)
        return path

    def _load(self, folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Restore weights, optimizer, scheduler and counters; return the state and RNG list
        (RNG is restored after the data iterator has been advanced)."""
        state = ckpt.read_state(folder)
        shapes = [tuple(p.shape) for p in self.params]  # a DTensor's shape is the whole one
        for param, saved in zip(self.params, ckpt.read_params(folder, shapes)):
            dd.load_full_into(param, saved)
        optimizer_state = ckpt.read_torch(folder, ckpt.OPTIMIZER_NAME)
        for index, entry in optimizer_state["state"].items():
            param = self.params[int(index)]
            if dd.is_dtensor(param):
                from torch.distributed.tensor import distribute_tensor

                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        entry[key] = distribute_tensor(value.to(param.device), param.device_mesh,
                                                       param.placements)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{folder / ckpt.OPTIMIZER_NAME}: does not match this "
                                  f"optimizer ({error})") from error
        self.scheduler.load_state_dict(state["scheduler"])
        task_file = folder / ckpt.TASK_NAME
        load_fn = getattr(self.task, "load_state_dict", None)
        if task_file.is_file() and callable(load_fn):
            load_fn(ckpt.read_torch(folder, ckpt.TASK_NAME))
        self.counters = RunCounters(
            skipped_steps=int(state.get("skipped_steps", 0)),
            nonfinite_loss=int(state.get("nonfinite_loss", 0)),
            nonfinite_grad=int(state.get("nonfinite_grad", 0)),
            tokens_seen=float(state.get("tokens_seen", 0.0)),
            train_seconds=float(state.get("train_seconds", 0.0)))
        self.skipped.load_state_dict(state.get("skipped_samples", []))
        rng = ckpt.read_torch(folder, ckpt.RNG_NAME)
        return state, rng

    def _warn_changed_settings(self, saved: dict[str, Any]) -> None:
        """Say so when the checkpoint's settings differ from this run's. The optimizer's
        hyper-parameters and base rate come back with its state, so a changed ``optim.lr``
        (etc.) silently would not apply; any other changed setting applies but makes this
        another run than the checkpoint began (a changed ``data.batch_size`` cuts the epoch
        into other batches, so the data order is not replayed)."""
        current = config_to_dict(self.config)
        messages = []
        kept = [f"optim.{key}" for key in _OPTIMIZER_STATE
                if key in saved.get("optim", {})
                and saved["optim"][key] != current["optim"][key]]
        if kept:
            messages.append(f"{', '.join(kept)} differ from the checkpoint's; the resumed "
                            "optimizer keeps the checkpoint's values (start a new "
                            "run.output_dir to use the new ones)")
        old, new = _flatten(saved), _flatten(current)
        changed = [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(new)
                   if key in old and old[key] != new[key] and key not in _RESUMABLE
                   and key.removeprefix("optim.") not in _OPTIMIZER_STATE]
        if changed:
            messages.append(f"resuming with settings that differ from the checkpoint's "
                            f"({'; '.join(changed)}): they apply from here on, so this is not "
                            "the run the checkpoint began (the data order, for one, is not "
                            "replayed exactly); start a new run.output_dir to train with them "
                            "from the start")
        for message in messages:
            if self.dist.is_main:
                logger.warning(message)
            warnings.warn(message, stacklevel=3)

    # ----------------------------------------------------------------------------- the loop
    def _grad_norm_and_clip(self) -> float:
        """The global L2 norm of all trainable gradients (sharded ones summed over ranks),
        scaled down to ``optim.grad_clip`` when above it."""
        local = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        sharded = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        grads = []
        for param in self.params:
            if param.grad is None:
                continue
            grads.append(param.grad)
            if dd.is_dtensor(param.grad):
                sharded += param.grad.to_local().double().pow(2).sum()
            else:
                local += param.grad.double().pow(2).sum()
        if any(dd.is_dtensor(g) for g in grads):
            import torch.distributed as dist

            dist.all_reduce(sharded)
        norm = math.sqrt((local + sharded).item())
        clip = self.config.optim.grad_clip
        if clip > 0 and math.isfinite(norm) and norm > clip:
            scale = clip / (norm + 1e-6)
            for grad in grads:
                grad.mul_(scale)
        return norm

    def _micro_step(self, batch: Any, scale: float, fsdp: bool) -> tuple[bool, float,
                                                                          dict[str, float]]:
        with self._autocast():
            loss, metrics = self.task.loss(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"{type(self.task).__name__}.loss() must return a scalar tensor "
                              f"first, got {type(loss).__name__}"
                              f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        value = float(loss.detach().float().item())
        finite = math.isfinite(value)
        if fsdp:
            # FSDP's backward holds collectives: every rank must agree before any starts one.
            finite = dd.all_true(finite, self.dist)
        if finite:
            (loss.reshape(()) * scale).backward()
        return finite, value, {k: float(v) for k, v in metrics.items()}

    def _loss_scales(self, group: list[Any]) -> list[float]:
        """The factor on each micro-batch's loss before backward.

        Gradients are averaged over ranks afterwards, so plain ``1 / accum`` weighs every
        micro-batch equally. A task with ``batch_weight(batch)`` (e.g. its token count, for a
        per-token mean loss) gets ``world * w / sum(w over all ranks and micro-batches)``
        instead, which makes the update that of one process on the combined batch.
        """
        weight_fn = getattr(self.task, "batch_weight", None)
        if not callable(weight_fn):
            return [1.0 / len(group)] * len(group)
        weights = [float(weight_fn(batch)) for batch in group]
        total = dd.sum_over_ranks(sum(weights), self.dist)
        if total <= 0:
            return [0.0] * len(group)
        return [self.dist.world_size * weight / total for weight in weights]

    def _optimizer_step(self, group: list[Any], fsdp: bool) -> dict[str, Any]:
        scales = self._loss_scales(group)
        losses: list[float] = []
        sums: dict[str, float] = {}
        ok = True
        for batch, scale in zip(group, scales):
            finite, value, metrics = self._micro_step(batch, scale, fsdp)
            if not finite:
                ok = False
                self.counters.nonfinite_loss += 1
                break
            losses.append(value)
            for key, metric in metrics.items():
                sums[key] = sums.get(key, 0.0) + metric
        if not fsdp:
            ok = dd.all_true(ok, self.dist)
        lr = self.scheduler.get_last_lr()[0]
        record: dict[str, Any] = {"lr": lr}
        if ok:
            dd.all_reduce_gradients(self.params, self.dist)
            norm = self._grad_norm_and_clip()
            record["grad_norm"] = norm
            if math.isfinite(norm):
                self.optimizer.step()
            else:
                ok = False
                self.counters.nonfinite_grad += 1
        self.optimizer.zero_grad(set_to_none=True)
        # A skipped step still spends its slot of the schedule, so that step numbers, learning
        # rates and data positions stay aligned with an unskipped run. (Torch warns when the
        # schedule moves before any optimizer step, which a skipped first step does on purpose.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
            self.scheduler.step()
        record["skipped"] = 0 if ok else 1
        if losses:
            record["loss"] = sum(losses) / len(losses)
            for key, total in sums.items():
                # Counts (tokens, samples) add up over micro-batches; rates average.
                record[key] = total if key in COUNTED else total / len(losses)
        if not ok:
            self.counters.skipped_steps += 1
        return record

    @staticmethod
    def _take(iterator: Iterator[Any], count: int) -> list[Any]:
        group = []
        for _ in range(count):
            try:
                group.append(next(iterator))
            except StopIteration:
                break
        return group

    def train(self) -> TrainResult:
        """Train until ``run.max_steps`` / ``run.max_epochs``; resume first if configured.
        ``run.output_dir`` is held for the run (``rba_core.train.run_lock``): a folder another
        live run holds raises ConfigError, on every rank, before any work."""
        with run_lock(self.output_dir, self.dist):
            return self._train()

    def _train(self) -> TrainResult:
        run = self.config.run
        fsdp = self._set_up()
        at, rng_states, resumed_from = self._resume()
        self._write_config()
        log = StepLog(self.dist, self.output_dir, run, total_steps=self.total_steps,
                      step=at.step, resumed=resumed_from is not None, skipped=self.skipped)
        last_path = resumed_from
        last_saved = at.step if resumed_from is not None else -1
        try:
            # A step's time runs from the end of the previous one (checkpoints excluded), so
            # it includes fetching its batches: where the RL task rolls out.
            # A resumed run whose budget is already spent takes no further step.
            budget_stop = self._budget_spent()
            started = _step_clock()
            for group in () if budget_stop else self._step_groups(at, rng_states):
                record = self._optimizer_step(group, fsdp)
                # Before the task's step-end hook: its held-out checks are evaluation.
                self.counters.train_seconds += _step_clock() - started
                at.batch += len(group)
                at.step += 1
                record.update(self._task_step_end(at.step, record))
                log.after_step(record, at.step, at.epoch, self.counters)
                if run.checkpoint_every and at.step % run.checkpoint_every == 0:
                    last_path = self.save(at)
                    last_saved = at.step
                started = _step_clock()
                if self._budget_spent():
                    budget_stop = True
                    break
            log.flush(at.step, at.epoch, self.counters)
            if last_saved != at.step and at.step > 0:
                last_path = self.save(at)
        finally:
            log.close()
        log.plot()
        self.skipped.update()
        return TrainResult(step=at.step, epoch=at.epoch,
                           skipped_steps=self.counters.skipped_steps,
                           nonfinite_loss=self.counters.nonfinite_loss,
                           nonfinite_grad=self.counters.nonfinite_grad,
                           output_dir=self.output_dir, checkpoint=last_path,
                           last_metrics=log.last_record,
                           skipped_samples=self.skipped.counts(),
                           stopped_by_budget=budget_stop,
                           train_seconds=self.counters.train_seconds)

    # -------------------------------------------------------------------- train()'s steps
    def _set_up(self) -> bool:
        """Shard (FSDP) or replicate the task's model, collect its trainable parameters, give
        every rank rank 0's values, and build the optimizer and the schedule. Returns whether
        the model is FSDP-sharded."""
        config, run, info = self.config, self.config.run, self.dist
        fsdp = run.strategy == "fsdp"
        if fsdp:
            modules = self._fsdp_modules()
            if not modules:
                raise ConfigError(f"run.strategy=fsdp needs {type(self.task).__name__}."
                                  "fsdp_modules() to name at least one module to shard; use "
                                  "run.strategy=ddp for this task")
            if not info.distributed:
                raise ConfigError("run.strategy=fsdp shards over several processes; launch with "
                                  "torchrun --nproc_per_node=N (N > 1) or use run.strategy=ddp")
            autocast_bf16 = run.dtype == "bfloat16" or (run.dtype == "auto"
                                                        and info.device.type == "cuda")
            dd.apply_fsdp(modules, info, torch.bfloat16 if autocast_bf16 else None)
        self.params = self._params()
        dd.broadcast_parameters(self.params, info)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
            weight_decay=config.optim.weight_decay)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, config.schedule)
        return fsdp

    def _resume(self) -> tuple[Position, list[dict[str, Any]] | None, Path | None]:
        """Load the checkpoint ``run.resume`` names, if any: weights, optimizer, schedule,
        counters and task state now; the returned RNG states (one per rank) wait until the
        data iterator has been advanced. Without one, seed this rank's stream afresh."""
        info, seed = self.dist, self.config.seed
        folder = self._resume_from()
        if folder is None:
            seed_everything(seed, info.rank)
            return Position(), None, None
        state, rng_states = self._load(folder)
        at = Position(int(state["step"]), int(state["epoch"]), int(state["position"]))
        saved_world = int(state["world_size"])
        if saved_world != info.world_size:
            # Each rank's shard changes with the world size; keep the number of samples
            # already seen this epoch instead of the exact batches.
            at.batch = at.batch * saved_world // info.world_size
            warnings.warn(f"resuming a {saved_world}-rank checkpoint on {info.world_size} "
                          "ranks: the data order within this epoch is not replayed exactly",
                          stacklevel=3)
            rng_states = None
            seed_everything(seed + at.step, info.rank)
        self._warn_changed_settings(state.get("config", {}))
        if info.is_main:
            logger.info("resuming from %s (step %d)", folder, at.step)
        return at, rng_states, folder

    def _write_config(self) -> None:
        """The resolved configuration beside the run's outputs (rank 0)."""
        if not self.dist.is_main:
            return
        import yaml

        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.output_dir / "config.yaml",
                          yaml.safe_dump(config_to_dict(self.config), sort_keys=False))

    def _step_groups(self, at: Position,
                     rng_states: list[dict[str, Any]] | None) -> Iterator[list[Any]]:
        """Each optimizer step's ``optim.grad_accum`` batches, from ``at`` to the run's end.

        The caller advances ``at.step`` and ``at.batch`` after each group; this moves
        ``at.epoch`` on when an epoch's batches run out. A resumed epoch replays from batch
        ``at.batch``, and the checkpoint's RNG states are restored only after that, so the
        batches skipped draw nothing.
        """
        run, info = self.config.run, self.dist
        accum = self.config.optim.grad_accum
        while at.step < self.total_steps and (run.max_epochs == 0 or at.epoch < run.max_epochs):
            batches = self.task.train_batches(at.epoch, info.rank, info.world_size,
                                              self.config.seed)
            iterator = self._batches_from(batches, at.batch)
            if rng_states is not None:
                ckpt.restore_rng(rng_states[info.rank])
                rng_states = None
            while at.step < self.total_steps:
                group = self._take(iterator, accum)
                # Every rank must run the same number of steps or collectives would hang;
                # the shortest shard ends the epoch (a trailing partial group is dropped).
                if dd.min_over_ranks(len(group), info) < accum:
                    break
                yield group
            if at.step >= self.total_steps:
                return
            at.epoch += 1
            at.batch = 0

    @staticmethod
    def _batches_from(batches: Iterable[Any], start: int) -> Iterator[Any]:
        iter_from = getattr(batches, "iter_from", None)
        if callable(iter_from):
            return iter(iter_from(start))
        iterator = iter(batches)
        for _ in range(start):
            if next(iterator, _END) is _END:
                break
        return iterator

    def _budget_spent(self) -> bool:
        """Whether ``run.time_budget_minutes`` of step time are spent. Ranks decide together
        (the slowest one's clock), or one would stop while the others wait in a collective."""
        budget = self.config.run.time_budget_minutes
        if budget <= 0:
            return False
        spent = self.counters.train_seconds >= 60.0 * budget
        if dd.min_over_ranks(0 if spent else 1, self.dist) == 1:
            return False
        if self.dist.is_main:
            logger.info("run.time_budget_minutes=%g spent (%.0f s of steps): stopping",
                        budget, self.counters.train_seconds)
        return True

    def _task_step_end(self, step: int, record: dict[str, Any]) -> dict[str, float]:
        hook = getattr(self.task, "on_step_end", None)
        if not callable(hook):
            return {}
        extra = hook(step, dict(record))
        return {} if extra is None else {key: float(value) for key, value in extra.items()}
