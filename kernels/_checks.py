"""Input validation shared by the fused kernels.

Every failure raises ValueError or TypeError with a message that names the argument at fault and
says how to fix it, because these ops are called from other people's trainers where a shape
mistake would otherwise surface as an opaque Triton or CUDA error (or silently wrong numbers).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {choices}")


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_float_tensor(name: str, value: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
                       ) -> torch.Tensor:
    value = check_tensor(name, value)
    if value.dtype not in dtypes:
        raise TypeError(
            f"{name} has dtype {value.dtype}; use one of {tuple(str(d) for d in dtypes)} "
            f"(convert with {name}.to(torch.bfloat16) or .float())"
        )
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"inputs must be on one device, got {listing}; move them with .to(device)")


def check_hidden_weight(hidden: object, weight: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, D] or [B, T, D] against an LM head weight [V, D] of the same dtype."""
    hidden = check_float_tensor("hidden", hidden, dtypes)
    weight = check_float_tensor("weight", weight, dtypes)
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}; "
            "flatten extra leading dimensions first"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's second dimension "
            f"D ({weight.shape[1]}); weight is [V, D] as stored by nn.Linear"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; "
            f"cast one, e.g. hidden.to(weight.dtype)"
        )
    check_same_device(hidden=hidden, weight=weight)
    return hidden, weight


def check_bias(bias: object, weight: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = check_float_tensor("bias", bias)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias ({bias.dtype}) must have weight's dtype ({weight.dtype})")
    check_same_device(weight=weight, bias=bias)
    return bias


def check_mask(mask: object, leading_shape: Sequence[int], device: torch.device
               ) -> torch.Tensor | None:
    """A bool or integer 0/1 mask with the leading shape of hidden; returned as bool."""
    if mask is None:
        return None
    mask = check_tensor("mask", mask)
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(
            f"mask must have hidden's leading shape {tuple(leading_shape)}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or integer (1 = keep), got {mask.dtype}; use mask.bool()")
    check_same_device(hidden=torch.empty(0, device=device), mask=mask)
    return mask if mask.dtype == torch.bool else mask != 0


def check_ids(ids: object, leading_shape: Sequence[int], vocab_size: int,
              mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Token ids with hidden's leading shape, inside [0, V) wherever the mask keeps the token.

    Masked positions may hold anything (padding ids such as -100 are common), so they are not
    range-checked.
    """
    ids = check_tensor("ids", ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor (token ids), got {ids.dtype}; use ids.long()")
    if tuple(ids.shape) != tuple(leading_shape):
        raise ValueError(
            f"ids must have hidden's leading shape {tuple(leading_shape)}, got {tuple(ids.shape)}"
        )
    check_same_device(hidden=torch.empty(0, device=device), ids=ids)
    kept = ids if mask is None else ids[mask]
    if kept.numel():
        low, high = int(kept.min()), int(kept.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"ids contains {bad}, outside the vocabulary [0, {vocab_size}); mask padding "
                "positions out with mask= or fix the tokenizer/LM head mismatch"
            )
    return ids


def check_per_token(name: str, value: object, leading_shape: Sequence[int],
                    device: torch.device) -> torch.Tensor:
    value = check_float_tensor(name, value)
    if tuple(value.shape) != tuple(leading_shape):
        raise ValueError(
            f"{name} must have hidden's leading shape {tuple(leading_shape)}, "
            f"got {tuple(value.shape)}"
        )
    check_same_device(hidden=torch.empty(0, device=device), **{name: value})
    return value


def check_backend_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         ids: torch.Tensor) -> None:
    """The low-level backend functions take compacted, contiguous 2-D rows (see the contract)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("ids", ids)):
        if t is not None and not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous for the backend functions; pass {name}.contiguous() "
                "(the public fused_linear_* functions do this for you)"
            )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"backend functions take hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if ids.shape != (hidden.shape[0],) or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 [N] = ({hidden.shape[0]},), got {ids.dtype} "
                         f"{tuple(ids.shape)}")

