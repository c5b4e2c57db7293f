"""What the trainer reports after each optimizer step: the skip warning, the progress bar, and
every ``run.log_every`` steps one JSON Lines record (plus TensorBoard) averaging the window of
steps since the last one over steps and ranks, with the run's counts of skipped steps and of
samples the data left out (``skipped_samples``: reason -> count, cumulative); the PNG of the
curves when the run ends."""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rba_core.train import distributed as dd
from rba_core.train.config import RunConfig
from rba_core.train.metrics import PLOT_NAME, MetricsWriter, plot_metrics

logger = logging.getLogger("rba.train")

# Per-step counts, not rates: summed over micro-batches, and kept out of the window's averages.
COUNTED = ("tokens", "samples")


@dataclass
class RunCounters:
    """Run-long totals; checkpointed, so a resumed run keeps counting from where it stopped."""

    skipped_steps: int = 0
    nonfinite_loss: int = 0
    nonfinite_grad: int = 0
    tokens_seen: float = 0.0
    # Seconds spent in optimizer steps (set-up, checkpoints and evaluation excluded), summed
    # over the run's processes in time: what ``run.time_budget_minutes`` is spent from.
    train_seconds: float = 0.0


class SkippedSamples:
    """The samples the task's data left out, by reason, over all ranks and a resume.

    The task's optional ``skipped_samples()`` lists this rank's ``(sample, reason)`` pairs so
    far; ``update`` (a collective) merges every rank's into one set, so a sample met by several
    ranks or in several epochs counts once. The set goes into each checkpoint, so the counts
    are cumulative over the whole run.
    """

    def __init__(self, task: Any, dist: dd.DistInfo) -> None:
        self.dist = dist
        self._source = getattr(task, "skipped_samples", None)
        self.seen: set[tuple[str, str]] = set()

    def update(self) -> None:
        if not callable(self._source):
            return
        new = sorted({(str(where), str(reason)) for where, reason in self._source()} - self.seen)
        for pairs in dd.gather_objects(new, self.dist):
            self.seen.update(pairs)  # type: ignore[arg-type]

    def counts(self) -> dict[str, int]:
        """Samples left out so far, per reason."""
        out: dict[str, int] = {}
        for _, reason in sorted(self.seen):
            out[reason] = out.get(reason, 0) + 1
        return out

    def state_dict(self) -> list[list[str]]:
        return [list(pair) for pair in sorted(self.seen)]

    def load_state_dict(self, state: list[list[str]]) -> None:
        self.seen = {(str(where), str(reason)) for where, reason in state}


class StepLog:
    """The after-step reporting of one run, on every rank (the averages need all ranks); only
    rank 0 writes files and shows the progress bar."""

    def __init__(self, dist: dd.DistInfo, output_dir: Path, run: RunConfig, *,
                 total_steps: int, step: int, resumed: bool, skipped: SkippedSamples) -> None:
        self.dist = dist
        self.skipped = skipped
        self.output_dir = output_dir
        self.run = run
        self.total_steps = total_steps
        self.writer = None
        self.progress = None
        if dist.is_main:
            self.writer = MetricsWriter(output_dir, resume_step=step if resumed else None,
                                        tensorboard=run.tensorboard)
            if run.progress:
                from tqdm.auto import tqdm

                self.progress = tqdm(total=total_steps, initial=step, desc="train",
                                     unit="step", dynamic_ncols=True)
        self.last_record: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.window: dict[str, tuple[float, int]] = {}
        self.window_steps = 0
        self.window_tokens = 0.0
        self.window_start = time.perf_counter()

    def after_step(self, record: dict[str, Any], step: int, epoch: int,
                   counters: RunCounters) -> None:
        """Report optimizer step ``step`` (1-based), whose metrics are ``record``."""
        if record["skipped"]:
            message = (f"step {step}: non-finite loss or gradient on some rank, update skipped "
                       f"({counters.skipped_steps} skipped so far)")
            if self.dist.is_main:
                logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        for key, value in record.items():
            if key in COUNTED or key == "skipped":
                continue
            total, count = self.window.get(key, (0.0, 0))
            self.window[key] = (total + float(value), count + 1)
        self.window_steps += 1
        self.window_tokens += float(record.get("tokens", 0.0))
        if self.progress is not None:
            self.progress.update(1)
            if "loss" in record:
                self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if step % self.run.log_every == 0 or step == self.total_steps:
            self.flush(step, epoch, counters)

    def flush(self, step: int, epoch: int, counters: RunCounters) -> None:
        """Average the window's metrics over its steps and ranks, then write them (rank 0).

        A skipped step has no loss, so each metric is averaged over the steps that report it.
        """
        if not self.window_steps:
            return
        local = {key: total / count for key, (total, count) in self.window.items() if count}
        gathered = dd.gather_objects((local, self.window_tokens), self.dist)
        merged: dict[str, float] = {}
        counts: dict[str, int] = {}
        total_tokens = 0.0
        for values, rank_tokens in gathered:  # type: ignore[misc]
            total_tokens += rank_tokens
            for key, value in values.items():
                merged[key] = merged.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
        record: dict[str, Any] = {key: merged[key] / counts[key] for key in merged}
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        counters.tokens_seen += total_tokens
        self.skipped.update()
        record.update(step=step, epoch=epoch, skipped_steps=counters.skipped_steps,
                      nonfinite_loss=counters.nonfinite_loss,
                      nonfinite_grad=counters.nonfinite_grad,
                      skipped_samples=self.skipped.counts(),
                      steps_per_s=self.window_steps / elapsed, time=time.time())
        if total_tokens:
            record["tokens_per_s"] = total_tokens / elapsed
            record["tokens_seen"] = counters.tokens_seen
        if self.writer is not None:
            self.writer.write(record)
        # The run's result carries the skipped samples in a field of their own.
        self.last_record = {k: v for k, v in record.items() if k != "skipped_samples"}
        self._reset()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> None:
        """The PNG of the curves (rank 0, ``run.plot``), from the JSON Lines file."""
        if self.writer is not None and self.run.plot:
            plot_metrics(self.writer.path, self.output_dir / PLOT_NAME)
