"""What flows through the RL step: a batch of rollouts and everything scored on them.

`Experience` keeps the grouped layout [B prompts, G samples, T tokens] that rewards and
advantages need (a group is the G samples of one prompt); `flatten()` turns it into the row
layout [N = B * G, T] that the loss and minibatching work on.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rba_core.errors import ConfigError

# Per-token tensors share the tokens' [B, G, T] (flat: [N, T]) shape; per-sequence ones the
# leading [B, G] (flat: [N]).
_TOKEN_TENSORS = ("tokens", "mask", "old_logprobs", "ref_logprobs", "teacher_logprobs",
                  "token_rewards", "advantages")
_SEQUENCE_TENSORS = ("sequence_rewards", "lengths")
_FLOAT_TENSORS = ("old_logprobs", "ref_logprobs", "teacher_logprobs", "token_rewards",
                  "advantages", "sequence_rewards")


def _check_tensors(obj: Any, lead: tuple[int, ...], layout: str) -> None:
    """Shapes, dtypes and devices of obj's tensor fields against tokens [*lead, T]."""
    tokens = obj.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be an int64 tensor {layout}, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    for name in _TOKEN_TENSORS + _SEQUENCE_TENSORS:
        value = getattr(obj, name)
        if value is None:
            if name in ("mask", "old_logprobs"):
                raise ValueError(f"{name} is required (a tensor {layout})")
            continue
        want = tuple(tokens.shape) if name in _TOKEN_TENSORS else lead
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape {want} (tokens are "
                             f"{layout}), got {got}")
        if value.device != tokens.device:
            raise ValueError(f"{name} is on {value.device} but tokens on {tokens.device}; "
                             "move them to one device")
        if name in _FLOAT_TENSORS and not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
    if obj.mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True on response tokens), got "
                         f"{obj.mask.dtype}; convert with mask.bool()")
    if obj.lengths.dtype.is_floating_point or obj.lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {obj.lengths.dtype}")


@dataclass
class Experience:
    """One batch of B prompts with G sampled responses each, padded to T tokens.

    tokens [B, G, T] int64 and mask [B, G, T] bool (True on response tokens); old_logprobs,
    ref_logprobs, teacher_logprobs, token_rewards and advantages are [B, G, T] floats;
    sequence_rewards [B, G] float; lengths [B, G] int (defaults to the mask's count);
    finish_reasons[b][g] says why sample g of prompt b stopped ("stop", "length", ...);
    metadata[b] is prompt b's data row (reference answer, task, id), shared by its G samples.
    """
    tokens: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    sequence_rewards: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    finish_reasons: list[list[str]] | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 3:
            got = (tuple(self.tokens.shape) if isinstance(self.tokens, torch.Tensor)
                   else type(self.tokens).__name__)
            raise ValueError(f"tokens must be [B, G, T] (prompts, samples, tokens), got {got}; "
                             "use FlatExperience for [B * G, T] rows")
        if self.lengths is None and isinstance(self.mask, torch.Tensor):
            self.lengths = self.mask.sum(-1)
        _check_tensors(self, self.group_shape, "[B, G, T]")
        batch, group = self.group_shape
        if not self.metadata:
            self.metadata = [{} for _ in range(batch)]
        if len(self.metadata) != batch:
            raise ValueError(f"metadata must hold one dict per prompt ({batch}), got "
                             f"{len(self.metadata)}")
        if self.finish_reasons is not None and (
                len(self.finish_reasons) != batch
                or any(len(reasons) != group for reasons in self.finish_reasons)):
            raise ValueError(f"finish_reasons must be {batch} lists of {group} strings "
                             "(one per sample of each prompt)")

    @property
    def group_shape(self) -> tuple[int, int]:
        """(B, G): prompts and samples per prompt."""
        return tuple(self.tokens.shape[:2])

    def flatten(self) -> FlatExperience:
        """The rows view [B * G, T]; row b * G + g is sample g of prompt b (no copies)."""
        batch, group = self.group_shape
        flat: dict[str, Any] = {}
        for name in _TOKEN_TENSORS:
            value = getattr(self, name)
            flat[name] = None if value is None else value.reshape(batch * group, -1)
        for name in _SEQUENCE_TENSORS:
            value = getattr(self, name)
            flat[name] = None if value is None else value.reshape(batch * group)
        flat["finish_reasons"] = (None if self.finish_reasons is None
                                  else [r for reasons in self.finish_reasons for r in reasons])
        flat["metadata"] = [row for row in self.metadata for _ in range(group)]
        flat["group_index"] = torch.arange(batch, device=self.tokens.device).repeat_interleave(
            group)
        return FlatExperience(**flat)


@dataclass
class FlatExperience:
    """Experience as N rows of T tokens, the layout of the loss and of minibatches.

    The fields are Experience's with the (B, G) dimensions merged; group_index [N] names the
    prompt each row was sampled from and metadata[n] is that prompt's data row.
    """
    tokens: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    group_index: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    sequence_rewards: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    finish_reasons: list[str] | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 2:
            raise ValueError("FlatExperience.tokens must be [N, T]; build it with "
                             "Experience.flatten()")
        if self.lengths is None and isinstance(self.mask, torch.Tensor):
            self.lengths = self.mask.sum(-1)
        _check_tensors(self, (self.num_rows,), "[N, T]")
        if tuple(self.group_index.shape) != (self.num_rows,):
            raise ValueError(f"group_index must be [{self.num_rows}], got "
                             f"{tuple(self.group_index.shape)}")
        if not self.metadata:
            self.metadata = [{} for _ in range(self.num_rows)]
        for name in ("metadata", "finish_reasons"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_rows:
                raise ValueError(f"{name} must have one entry per row ({self.num_rows}), got "
                                 f"{len(value)}")

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int] | slice) -> FlatExperience:
        """The given rows (indices or a slice) as a new FlatExperience, e.g. one minibatch."""
        if isinstance(rows, slice):
            index = torch.arange(self.num_rows, device=self.tokens.device)[rows]
        else:
            index = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        if index.dim() != 1:
            raise ValueError(f"rows must be 1-D, got shape {tuple(index.shape)}")
        positions = index.tolist()
        picked: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, torch.Tensor):
                picked[spec.name] = value.index_select(0, index)
            elif isinstance(value, list):
                picked[spec.name] = [value[i] for i in positions]
            else:
                picked[spec.name] = value
        return FlatExperience(**picked)

    def minibatches(self, size: int, *, generator: torch.Generator | None = None
                    ) -> Iterator[FlatExperience]:
        """Consecutive minibatches of `size` rows (the last may be smaller), in a random
        order drawn from `generator` when one is given (one seed for every random choice)."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"minibatch size must be a positive int (rows per minibatch), "
                              f"got {size!r}")
        order = (torch.randperm(self.num_rows, generator=generator) if generator is not None
                 else torch.arange(self.num_rows))
        for start in range(0, self.num_rows, size):
            yield self.select(order[start:start + size].to(self.tokens.device))
