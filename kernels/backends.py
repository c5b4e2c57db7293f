"""Which implementation serves a kernel call: the one backend choice every op makes the same way.

    name = resolve_backend(backend, hidden.device)            # "triton", "native" or "torch"

``"auto"`` picks Triton for CUDA tensors, the native C++ op (``rba_core.kernels.native``) for CPU
tensors when it is built, and plain PyTorch otherwise; an explicit choice is checked against the
device and raises BackendError naming what would work. Ops without a native op pass
``choices=("auto", "triton", "torch")``. This module imports nothing of rba_core beyond
kernels/, which other trainers embed on their own.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "native", "torch")

_NATIVE = "rba_core.kernels.native"


class BackendError(ValueError):
    """A backend was asked for that cannot serve these tensors here (or does not exist)."""


def native_module() -> ModuleType | None:
    """rba_core.kernels.native when its extension works here, else None (it warns once why)."""
    try:
        native = importlib.import_module(_NATIVE)
    except ModuleNotFoundError as error:
        # Only the absence of the native module itself means "not available"; a missing
        # dependency inside it is a real fault and must surface.
        if error.name != _NATIVE:
            raise
        return None
    return native if native.available() else None


def _native_missing_reason() -> str:
    try:
        return importlib.import_module(_NATIVE).unavailable_reason() or "unknown reason"
    except ModuleNotFoundError:
        return f"{_NATIVE} is not installed"


def resolve_backend(backend: str, device: torch.device, *,
                    choices: Sequence[str] = BACKENDS, triton_serves: bool = True) -> str:
    """The backend (``"triton"``, ``"native"`` or ``"torch"``) that runs a call on ``device``.

    ``triton_serves`` False says the Triton kernels cannot take this call (a dtype or shape
    they do not handle), so ``"auto"`` falls back; an explicit ``"triton"`` is then left to
    the op, which says what it cannot take.
    """
    if backend not in choices:
        raise BackendError(f"backend must be one of {', '.join(choices)}, got "
                           f"backend={backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_serves:
            return "triton"
        if device.type == "cpu" and "native" in choices and native_module() is not None:
            return "native"
        return "torch"
    if backend == "triton":
        interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not interpreted:
            raise BackendError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; use "
                "backend='auto' (or set TRITON_INTERPRET=1 before importing triton to run the "
                "kernels through Triton's interpreter on the CPU)")
    if backend == "native":
        if device.type != "cpu":
            raise BackendError(f"backend='native' is the CPU op, got tensors on {device}; use "
                               "backend='auto' (Triton on CUDA)")
        if native_module() is None:
            raise BackendError(
                f"backend='native': the C++ extension rba_core._C is not usable here "
                f"({_native_missing_reason()}); reinstall with `pip install "
                "--no-build-isolation -e .` or use backend='auto' to fall back to PyTorch")
    return backend


def backend_module(name: str, *, triton: str, torch_fallback: str) -> ModuleType:
    """The module implementing a resolved backend for ops whose backends share one set of
    functions: ``triton`` and ``torch_fallback`` name the op's two Python modules."""
    if name == "native":
        native = native_module()
        assert native is not None, "resolve_backend returns 'native' only when it is usable"
        return native
    return importlib.import_module(triton if name == "triton" else torch_fallback)
