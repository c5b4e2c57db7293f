"""The one backend choice of the kernels: what "auto" picks on each device, the checks on an
explicit choice (one error type, a ValueError), and kernels/ importing nothing else of rba_core."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rba_core.kernels import backends
from rba_core.kernels.backends import BackendError, resolve_backend

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
NO_NATIVE = ("auto", "triton", "torch")


def test_auto_picks_triton_on_cuda_native_on_cpu_else_torch(monkeypatch):
    monkeypatch.setattr(backends, "native_module", lambda: object())
    assert resolve_backend("auto", CUDA) == "triton"
    assert resolve_backend("auto", CUDA, triton_serves=False) == "torch"
    assert resolve_backend("auto", CPU) == "native"
    assert resolve_backend("auto", CPU, choices=NO_NATIVE) == "torch"
    assert resolve_backend("auto", META) == "torch"
    monkeypatch.setattr(backends, "native_module", lambda: None)
    assert resolve_backend("auto", CPU) == "torch"


def test_explicit_choices_are_checked_against_the_device(monkeypatch):
    monkeypatch.setattr(backends, "native_module", lambda: object())
    assert resolve_backend("torch", CUDA) == "torch"
    assert resolve_backend("native", CPU) == "native"
    assert resolve_backend("triton", CUDA, triton_serves=False) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU) == "triton"
    cases = [
        (dict(backend="cuda", device=CPU), "backend must be one of auto, triton, native, torch"),
        (dict(backend="native", device=CPU, choices=NO_NATIVE), "one of auto, triton, torch"),
        (dict(backend="native", device=CUDA), "the CPU op"),
        (dict(backend="triton", device=META), "needs CUDA tensors"),
    ]
    for kwargs, words in cases:
        with pytest.raises(BackendError, match=words):
            resolve_backend(**kwargs)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU)
    monkeypatch.setattr(backends, "native_module", lambda: None)
    with pytest.raises(BackendError, match="not usable here"):
        resolve_backend("native", CPU)
    # A programmer's mistake, not a user's: a ValueError the rba CLI does not swallow.
    assert issubclass(BackendError, ValueError)
    assert not any(cls.__module__.startswith("rba_core.errors") for cls in BackendError.__mro__)


def test_kernels_import_no_other_rba_core_package():
    code = (
        "import sys, rba_core.kernels as k\n"
        "for name in ('audio_adapter', 'backends', 'cascade_attention', 'linear_distill',\n"
        "             'linear_logprobs', 'policy_loss'):\n"
        "    __import__('rba_core.kernels.' + name)\n"
        "other = sorted(m for m in sys.modules if m.startswith('rba_core.')\n"
        "               and not m.startswith('rba_core.kernels') and m != 'rba_core._C')\n"
        "print(other)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
