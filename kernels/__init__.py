"""rba's fused kernels, usable on their own from any trainer.

    from rba_core.kernels import (
        fused_linear_logprobs, fused_linear_policy_loss, fused_linear_distill_loss,
        FusedAudioAdapter,
    )

Each op runs its Triton kernels on CUDA tensors, the native C++ op (csrc/) on CPU tensors when
the extension is built, and plain PyTorch otherwise. Names resolve lazily so that importing the
package does not import Triton or compile anything.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "fused_linear_logprobs": "rba_core.kernels.linear_logprobs",
    "fused_linear_policy_loss": "rba_core.kernels.policy_loss",
    "fused_linear_distill_loss": "rba_core.kernels.linear_distill",
    "FusedAudioAdapter": "rba_core.kernels.audio_adapter",
    "AudioAdapter": "rba_core.kernels.audio_adapter",
    "AudioAdapterConfig": "rba_core.kernels.audio_adapter",
    "fused_audio_adapter": "rba_core.kernels.audio_adapter",
    "TokenScores": "rba_core.kernels.linear_logprobs",
    "cascade_attention": "rba_core.kernels.cascade_attention",
    "PolicyLossStats": "rba_core.kernels.policy_loss",
    "BackendError": "rba_core.kernels.backends",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module 'rba_core.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
