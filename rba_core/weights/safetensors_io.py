"""Checkpoint I/O for Hugging Face-layout folders.

A folder holds ``config.json`` and either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are read through safetensors' memory-mapped
``safe_open`` and never through pickle, so a user's file cannot run code. Every failure names
the file at fault (and the tensor, where one is at fault) and says how to fix it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _safetensors_save_file
from torch import nn

from rba_core.errors import CheckpointError
from rba_core.files import write_atomic, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHT_FILES_BY_KIND = {
    "full": WEIGHTS_NAME,
    "adapter": "adapter.safetensors",
    "lora": "lora.safetensors",
}


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist; pass a folder holding "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs its {CONFIG_NAME} "
                              "(the Hugging Face model configuration)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); restore the file from the "
                              "original checkpoint") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, found {type(config).__name__}")
    return config


def _weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Each safetensors file to read, with the tensor names the index promises it holds
    (``None`` for a single unsharded file, whose own header is the list)."""
    single = folder / WEIGHTS_NAME
    index_path = folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return {single: None}
    if index_path.is_file():
        return _read_index(index_path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt"))
    hint = (f" (found {', '.join(pickled)}: pickle files are never loaded because they can run "
            "code; convert them to safetensors)") if pickled else ""
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")


def _read_index(index_path: Path) -> dict[Path, list[str]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index_path}: not valid JSON ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: needs a non-empty \"weight_map\" object mapping "
                              "tensor names to shard file names")
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        # A shard name with a directory part could point outside the checkpoint folder.
        if not isinstance(shard, str) or Path(shard).name != shard or not shard:
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to {shard!r}, which is "
                                  "not a plain file name inside the checkpoint folder")
        shards.setdefault(index_path.parent / shard, []).append(name)
    missing = [str(path) for path in shards if not path.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: shard file(s) missing: {', '.join(missing)}; "
                              "copy every shard the index lists into the folder")
    return shards


def load_tensors(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (or only those whose names start with ``prefix``;
    names are kept whole). Floating-point tensors are cast to ``dtype`` when given; integer
    tensors keep their type."""
    files = _weight_files(Path(folder))
    tensors: dict[str, torch.Tensor] = {}
    for path, promised in files.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                present = set(handle.keys())
                if promised is not None:
                    absent = sorted(set(promised) - present)
                    if absent:
                        raise CheckpointError(
                            f"{path}: the index promises tensor(s) {absent} in this shard but "
                            "the file lacks them; the index and shards come from different "
                            "checkpoints")
                names = promised if promised is not None else sorted(present)
                for name in names:
                    if prefix is not None and not name.startswith(prefix):
                        continue
                    tensor = handle.get_tensor(name)
                    target_dtype = dtype if dtype is not None and tensor.is_floating_point() \
                        else tensor.dtype
                    tensors[name] = tensor.to(device=device, dtype=target_dtype)
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error}); it is "
                                  "truncated or corrupt, so copy or download it again") from error
        except OSError as error:
            raise CheckpointError(f"{path}: cannot be read ({error})") from error
    return tensors


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def mismatch_report(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], *,
                    missing: list[str], unexpected: list[str]) -> str:
    """One line listing the missing, unexpected and mis-shaped tensors ("" when all match):
    what a strict load reports, so that a user sees every problem at once."""
    misshaped = [f"{name} (file {_shape(tensor)}, model {_shape(expected[name])})"
                 for name, tensor in found.items()
                 if name in expected and tensor.shape != expected[name].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes: {', '.join(misshaped)}")
    return "; ".join(problems)


def load_into_module(
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    source: str,
    tied: dict[str, str] | None = None,
) -> None:
    """Copy ``tensors`` into ``module``'s parameters and persistent buffers, strictly.

    Any missing, unexpected or mis-shaped tensor fails the whole load with one error listing
    all of them. ``tied`` maps a module parameter name to the source tensor that fills it when
    the file omits it (tied embeddings). Parameters keep the module's dtype and device, except
    on a module built on the meta device, which takes the tensors as they are.
    """
    expected = module.state_dict()
    tied = dict(tied or {})
    filled: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name in expected:
        if name in tensors:
            filled[name] = tensors[name]
        elif name in tied and tied[name] in tensors:
            filled[name] = tensors[tied[name]]
        else:
            missing.append(name)
    problems = mismatch_report(expected, filled, missing=missing,
                               unexpected=sorted(set(tensors) - set(expected)))
    if problems:
        raise CheckpointError(
            f"{source}: does not match {type(module).__name__} ({problems}); check "
            "that config.json describes these weights")
    on_meta = any(tensor.is_meta for tensor in expected.values())
    with torch.no_grad():
        module.load_state_dict(filled, strict=True, assign=on_meta)


def save_safetensors_atomic(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Save ``tensors`` to a safetensors file atomically. The metadata carries
    ``format: pt`` (what Hugging Face loaders expect) plus any given entries."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: tensors must map names (str) to torch tensors; got "
                                  f"{name!r} -> {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights); each gets its own copy.
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    full_metadata = {"format": "pt", **(metadata or {})}
    for key, value in full_metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(f"{path}: metadata must map str to str; got {key!r}: {value!r}")
    write_atomic(
        path,
        lambda temporary: _safetensors_save_file(prepared, str(temporary), metadata=full_metadata))


def save_pretrained(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    kind: str = "full",
) -> None:
    """Save trained weights and their config into ``folder``: ``kind`` "full" writes
    model.safetensors, "adapter" adapter.safetensors, "lora" lora.safetensors; each beside
    config.json, every file written atomically."""
    if kind not in WEIGHT_FILES_BY_KIND:
        raise CheckpointError(f"save_pretrained: kind {kind!r} is not one of "
                              f"{', '.join(WEIGHT_FILES_BY_KIND)}")
    folder = Path(folder)
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except TypeError as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: config is not JSON-serialisable "
                              f"({error})") from error
    save_safetensors_atomic(folder / WEIGHT_FILES_BY_KIND[kind], tensors)
    write_text_atomic(folder / CONFIG_NAME, config_text)
