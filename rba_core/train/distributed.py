"""Process groups, devices and gradient averaging for ``torchrun`` launches.

Data parallelism averages the trainable parameters' gradients with one bucketed all-reduce per
optimizer step instead of wrapping a module in ``DistributedDataParallel``: a ``TrainTask``'s
loss may call any of its sub-modules in any order (the SpeechLM calls encoder, adapter and LLM
separately), which DDP's single-forward hooks do not allow, and frozen weights need no hooks at
all. FSDP2 (``fully_shard``) shards the modules a task names for models that do not fit one GPU;
it reduce-scatters their gradients itself.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from rba_core.errors import ConfigError

# A bucket this large (elements) keeps the temporary flat copy small next to the model.
BUCKET_ELEMENTS = 1 << 24


@dataclass
class DistInfo:
    """Where this process sits: its rank, the number of ranks, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer; launch with "
                          "torchrun, which sets it") from None


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` is this rank's GPU when CUDA is present, else the CPU; ``cuda`` is this rank's
    GPU; anything else is checked by ``rba_core.devices.parse_device``."""
    from rba_core.devices import parse_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = parse_device(device, "run.device")
    if chosen.type == "cuda" and chosen.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} "
                              "visible); start at most one process per GPU")
        chosen = torch.device("cuda", local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return chosen


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in RANK/WORLD_SIZE/LOCAL_RANK.

    Without those variables this is a single process. NCCL serves GPU runs and gloo CPU runs.
    Calling it again in an initialised process reuses the existing group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; launch "
                          "with torchrun")
    target = pick_device(device, local_rank)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        if target.type == "cuda":
            dist.init_process_group(backend, init_method="env://", device_id=target)
        else:
            dist.init_process_group(backend, init_method="env://")
        initialized_here = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, target, initialized_here)


def shutdown(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (checked by name: importing DTensor initialises
    more of torch.distributed than a single-process run needs)."""
    return type(tensor).__name__ == "DTensor"


def broadcast_parameters(params: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Give every rank rank 0's values, as DDP does at start, so that replicas agree even if a
    task initialised its weights from per-rank randomness."""
    if not info.distributed:
        return
    with torch.no_grad():
        for param in params:
            if not is_dtensor(param):
                dist.broadcast(param.data, src=0)


def all_reduce_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Average the gradients of replicated (non-FSDP) parameters over ranks.

    A parameter without a gradient on this rank contributes zeros, so every rank reduces buffers
    of the same size even when its batch left a parameter unused.
    """
    if not info.distributed:
        return
    replicated = [p for p in params if not is_dtensor(p)]
    if not replicated:
        return
    # A parameter no rank used keeps grad None, as in one process (AdamW then leaves it alone).
    present = torch.tensor([p.grad is not None for p in replicated], dtype=torch.int32,
                           device=_collective_device(info))
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param, used in zip(replicated, present.tolist()):
        if not used:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        by_dtype.setdefault(param.grad.dtype, []).append(param)
    for group in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for param in group:
            bucket.append(param)
            size += param.numel()
            if size >= BUCKET_ELEMENTS:
                _reduce_bucket(bucket, info.world_size)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket, info.world_size)


def _reduce_bucket(params: list[torch.Tensor], world_size: int) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size)
    offset = 0
    for param in params:
        count = param.numel()
        param.grad.copy_(flat[offset:offset + count].view_as(param.grad))
        offset += count


def all_true(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
    if not info.distributed:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=_collective_device(info))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() == 0.0


def min_over_ranks(value: int, info: DistInfo) -> int:
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(info))
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def sum_over_ranks(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device(info))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _collective_device(info: DistInfo) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def apply_fsdp(modules: list[torch.nn.Module], info: DistInfo, param_dtype: torch.dtype | None
               ) -> None:
    """``fully_shard`` each module (innermost first, as the task lists them) over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in modules:
        fully_shard(module, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def unsharded(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Within the block, FSDP2-sharded ``modules`` hold their whole parameters as plain
    tensors on every rank (a collective), e.g. to export them with ordinary save code."""
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded tensor (a collective for DTensors)."""
    if is_dtensor(tensor):
        return tensor.full_tensor()
    return tensor


def load_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy an unsharded ``full`` value into ``target``, keeping only this rank's shard."""
    with torch.no_grad():
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh,
                                      target.placements)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(full.to(target.device, target.dtype))
