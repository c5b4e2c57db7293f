"""Load any supported checkpoint folder in one call, by its config.json ``model_type``."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rba_core.weights.safetensors_io import CONFIG_NAME, read_config
from rba_core.errors import ConfigError

LLM_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLM_MODEL_TYPES, "whisper")


def load_model(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Our module for a Hugging Face-layout folder: a ``LlamaForCausalLM`` for Llama, Mistral
    and Qwen2 (SmolLM2 is a Llama), a ``WhisperEncoder`` for Whisper. Weights are cast to
    ``dtype`` (the stored dtype when None) and placed on ``device``; the model is in eval mode."""
    model_type = read_config(folder).get("model_type")
    if model_type in LLM_MODEL_TYPES:
        from rba_core.models.llama import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    if model_type == "whisper":
        from rba_core.models.whisper import WhisperEncoder

        return WhisperEncoder.from_pretrained(folder, dtype=dtype, device=device)
    raise ConfigError(f"{Path(folder) / CONFIG_NAME}: model_type {model_type!r} is not "
                      f"supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
