"""Training metrics: JSON Lines always, TensorBoard when installed, a PNG of the curves when
matplotlib is installed (``pip install matplotlib``, an optional extra)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from rba_core.files import write_atomic, write_text_atomic

logger = logging.getLogger("rba.train")

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


def _json_value(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to ``OUTPUT/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir: str | os.PathLike, *, resume_step: int | None,
                 tensorboard: bool) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            self._truncate_after(resume_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("run.tensorboard is on but tensorboard is not installed "
                               "(pip install tensorboard); metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"),
                                         purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after the checkpoint it resumes from, so the file
        reads as one uninterrupted run."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        # Atomic: a kill during this rewrite must not cost the lines before the checkpoint.
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _json_value(v) for k, v in record.items()}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key != "step" and numeric:
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


PLOTTED = ("loss", "lr", "grad_norm", "tokens_per_s")
# Counters and clocks: monotone lines that say nothing about training.
NOT_PLOTTED = ("step", "epoch", "time", "skipped_steps", "nonfinite_loss", "nonfinite_grad",
               "tokens_seen", "steps_per_s")


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Draw the curves in ``metrics_path`` into ``png_path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no %s was drawn (pip install matplotlib)",
                       Path(png_path).name)
        return False
    # A run resumed at its last step logs no line, so there may be no file to plot.
    if not Path(metrics_path).is_file():
        return False
    records = read_metrics(metrics_path)
    keys = [k for k in PLOTTED if any(isinstance(r.get(k), (int, float)) for r in records)]
    extra = sorted({k for r in records for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k not in keys and k not in NOT_PLOTTED})
    keys += extra
    if not keys:
        return False
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True,
                                squeeze=False)
    for axis, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            axis.plot(*zip(*points))
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    write_atomic(png_path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
    return True
