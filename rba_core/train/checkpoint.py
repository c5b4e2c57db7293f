"""Training checkpoints: written atomically, the newest K kept, read back for exact resume.

One checkpoint is a folder ``OUTPUT/checkpoints/step_00000120/`` holding

    params.safetensors   the trainable parameters, in ``trainable_parameters()`` order
    optimizer.pt         the optimizer state (sharded FSDP state is stored whole)
    rng.pt               every rank's Python, NumPy, torch and CUDA generator states
    task.pt              the task's own ``state_dict()`` when it has one
    state.json           step, epoch, data position, scheduler and counters (written last)

The folder is first written under a temporary name and renamed into place
(``rba_core.files.atomic_folder``), so a crash during a save leaves the previous checkpoints
untouched and never a half-written one under a final name.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rba_core.errors import CheckpointError
from rba_core.files import atomic_folder, remove_stale_temps

CHECKPOINTS = "checkpoints"
STATE_NAME = "state.json"
PARAMS_NAME = "params.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
TASK_NAME = "task.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with their state.json), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def capture_rng() -> dict[str, Any]:
    """This process's generator states, in types that ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(output_dir: str | os.PathLike, step: int, *, params: list[torch.Tensor],
                     optimizer_state: dict[str, Any], rng_states: list[dict[str, Any]],
                     task_state: dict[str, Any] | None, state: dict[str, Any],
                     keep_last: int) -> Path:
    """Write one checkpoint atomically and delete all but the newest ``keep_last``.

    ``params`` are whole (unsharded) tensors; the caller gathers them on the writing rank.
    """
    root = checkpoint_root(output_dir)
    # What a save killed part-way left; the resuming run is the only writer here.
    remove_stale_temps(root)
    final = root / step_dir_name(step)
    # Re-saving a step (a resumed run reaching it again) replaces the old copy whole.
    with atomic_folder(final) as tmp:
        tensors = {f"param.{i:05d}": p.detach().to("cpu").contiguous()
                   for i, p in enumerate(params)}
        save_file(tensors, str(tmp / PARAMS_NAME))
        torch.save(optimizer_state, tmp / OPTIMIZER_NAME)
        torch.save(rng_states, tmp / RNG_NAME)
        if task_state is not None:
            torch.save(task_state, tmp / TASK_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1, sort_keys=True),
                                      encoding="utf-8")
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a training checkpoint (no {STATE_NAME}); pass a "
                              f"folder such as OUTPUT/{CHECKPOINTS}/step_00000100")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); resume from an older "
                              "checkpoint") from error
    for key in ("step", "epoch", "position", "world_size", "scheduler"):
        if key not in state:
            raise CheckpointError(f"{path}: missing {key!r}; the checkpoint is incomplete")
    return state


def read_params(folder: Path, expected: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The saved trainable tensors, checked against the task's parameter shapes."""
    path = folder / PARAMS_NAME
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = sorted(handle.keys())
            tensors = [handle.get_tensor(name) for name in names]
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: cannot be read ({error}); resume from an older "
                              "checkpoint") from error
    if len(tensors) != len(expected):
        raise CheckpointError(f"{path}: holds {len(tensors)} trainable tensors but the task has "
                              f"{len(expected)}; resume with the same model and trainable set")
    for index, (tensor, shape) in enumerate(zip(tensors, expected)):
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{path}: trainable tensor {index} has shape "
                                  f"{tuple(tensor.shape)}, the task's has {tuple(shape)}; "
                                  "resume with the same model configuration")
    return tensors


def read_torch(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path}: cannot be read ({error}); resume from an older "
                              "checkpoint") from error
