"""One training run per output folder: the lock that keeps a second ``rba train`` (or
``Trainer.train``) off a folder a live run is writing.

Global rank 0 holds an advisory lock (``rba_core.files.exclusive_lock``) on ``OUTPUT/.train.lock``
for the run and writes who it is into that file (pid, host, start time, command). The system
drops the lock when its process dies, however it dies, so a killed run never blocks the next
one; the details it leaves behind tell the next run that it takes over from a run that ended
without releasing (a kill), which it says. No other rank touches the file, whatever the layout
(one node or many, an output folder shared between nodes or not): rank 0 decides and every rank
learns the outcome from one collective, so a refused launch fails on every rank together
instead of leaving some waiting in a collective that rank 0 never joins.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rba_core.errors import ConfigError
from rba_core.files import exclusive_lock, sync_handle
from rba_core.train import distributed as dd

LOCK_NAME = ".train.lock"

logger = logging.getLogger("rba.train")

# Folders this process holds (resolved path -> depth): the command holds its folder around
# building the task, training and exporting, and the trainer's own hold inside is then a no-op.
_held: dict[Path, int] = {}


def read_holder(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The details the last holder of ``output_dir``'s lock wrote (None when there are none:
    never locked, released cleanly, or written only in part)."""
    try:
        holder = json.loads((Path(output_dir) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def describe(holder: dict[str, Any] | None) -> str:
    """``pid N on HOST, started TIME: COMMAND`` for a message."""
    if holder is None:
        return "a process that has not written its details yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"pid {holder.get('pid')} on {holder.get('host', '?')}, started {started}: "
            f"{holder.get('command', '?')}")


def _write_holder(path: Path) -> None:
    # In place, not by rename: the lock belongs to this inode.
    details = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
               "command": " ".join(sys.argv)[:300]}
    with open(path, "r+", encoding="utf-8") as handle:
        handle.truncate(0)
        handle.write(json.dumps(details) + "\n")
        sync_handle(handle)


@contextlib.contextmanager
def _hold(output_dir: Path) -> Iterator[str | None]:
    """Rank 0's part: the lock held for the block, yielding None; or, when a live process holds
    it, yielding the refusal (and holding nothing)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    with contextlib.ExitStack() as stack:
        failure: OSError | None = None
        try:
            stack.enter_context(exclusive_lock(path, wait=False))
        except OSError as error:
            failure = error
        if failure is not None and not isinstance(failure, BlockingIOError):
            # Some network file systems refuse locks; training still works, unguarded.
            logger.warning("cannot lock run.output_dir %s (%s): a second run started on it "
                           "would not be stopped", output_dir, failure)
            yield None
            return
        if failure is not None:
            yield (f"run.output_dir {output_dir} is in use by another training run "
                   f"({describe(read_holder(output_dir))}); wait for it to end or stop it, or "
                   "choose another run.output_dir")
            return
        stale = read_holder(output_dir)
        if stale is not None:
            logger.warning("run.output_dir %s: taking over the lock of a run that ended without "
                           "releasing it (killed?): %s", output_dir, describe(stale))
        _write_holder(path)
        try:
            yield None
        finally:
            # Emptied before the lock drops: what a later run finds here means a kill.
            with open(path, "r+", encoding="utf-8") as handle:
                handle.truncate(0)
                sync_handle(handle)


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike, info: dd.DistInfo) -> Iterator[None]:
    """Hold ``output_dir`` for one training run for the block. Every rank calls it (it is a
    collective); a folder a live run holds raises ConfigError on every rank, naming that run.
    Nested holds of one folder in one process are free."""
    key = Path(output_dir).resolve()
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    with contextlib.ExitStack() as stack:
        refusal = stack.enter_context(_hold(key)) if info.is_main else None
        refusal = dd.gather_objects(refusal, info)[0]
        if refusal is not None:
            raise ConfigError(refusal)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
