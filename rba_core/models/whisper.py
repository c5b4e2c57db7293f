"""Whisper audio encoder (all sizes; 80 or 128 mel bins), loaded from Hugging Face checkpoints.

Unlike the reference, it runs on clips shorter than 30 s without padding them: the positional
table is sliced to the clip's length. With ``frame_lengths`` a ragged batch is masked so that
each clip's output equals running that clip alone. Parameter names equal the Hugging Face
names below the encoder prefix (``model.encoder.`` in a full Whisper checkpoint), so loading
is one prefix rule and nothing else.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rba_core.errors import AudioError, CheckpointError, ConfigError

# The one naming rule: checkpoint name = prefix + our parameter name. Full Whisper checkpoints
# (WhisperForConditionalGeneration, our converter's output) use the first; WhisperModel and
# encoder-only exports use the second. Tensors under any other prefix (the decoder) are ignored.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class WhisperConfig:
    """The encoder's hyper-parameters, named as in Whisper's ``config.json``."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    # transformers builds its LayerNorms with torch's default eps, whatever config.json says.
    layer_norm_eps: float = 1e-5

    _REQUIRED = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "num_mel_bins", "max_source_positions")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_frames(self) -> int:
        """The most feature frames one clip may have (3000 = 30 s for every Whisper size)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = "config.json") -> WhisperConfig:
        model_type = config.get("model_type")
        if model_type is not None and model_type != "whisper":
            raise ConfigError(f"{source}: model_type is {model_type!r}, but WhisperEncoder loads "
                              "only \"whisper\" checkpoints; pass a Whisper checkpoint folder")
        values: dict[str, Any] = {}
        for name in cls._REQUIRED:
            if name not in config:
                raise ConfigError(f"{source}: missing field {name!r}; add it (Whisper tiny: "
                                  "d_model 384, encoder_layers 4, encoder_attention_heads 6, "
                                  "encoder_ffn_dim 1536, num_mel_bins 80, "
                                  "max_source_positions 1500)")
            value = config[name]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, got "
                                  f"{value!r}")
            values[name] = value
        activation = config.get("activation_function", "gelu")
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"{source}: activation_function {activation!r} is not supported; "
                              f"use one of {', '.join(sorted(_ACTIVATIONS))}")
        values["activation_function"] = activation
        if values["d_model"] % values["encoder_attention_heads"]:
            raise ConfigError(f"{source}: d_model {values['d_model']} is not divisible by "
                              f"encoder_attention_heads {values['encoder_attention_heads']}")
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> WhisperConfig:
        from rba_core.weights.safetensors_io import CONFIG_NAME, read_config

        return cls.from_dict(read_config(folder), source=str(Path(folder) / CONFIG_NAME))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table ``[length, channels]``: sines then cosines over
    geometrically spaced timescales. It is the initial value; checkpoints carry their own."""
    if channels % 2:
        raise ConfigError(f"sinusoidal positions need an even width, got d_model {channels}")
    increment = math.log(max_timescale) / max(channels // 2 - 1, 1)
    inverse = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float64))
    scaled = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1).to(torch.float32)


class WhisperAttention(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        d_model = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d_model, d_model)
        # Whisper's key projection has no bias (a bias on keys shifts every score of a query
        # equally, so softmax ignores it).
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, hidden: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(hidden)), heads(self.k_proj(hidden)), heads(self.v_proj(hidden)),
            attn_mask=attend)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.self_attn = WhisperAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.activation_function]

    def forward(self, hidden: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), attend)
        hidden = hidden + self.fc2(self.activation(self.fc1(self.final_layer_norm(hidden))))
        if hidden.dtype == torch.float16:
            # As the reference does: keeps fp16 activations finite in deep encoders.
            limit = torch.finfo(torch.float16).max - 1000
            hidden = hidden.clamp(-limit, limit)
        return hidden


class WhisperEncoder(nn.Module):
    """Log-mel features ``[B, n_mels, T]`` -> hidden states ``[B, ceil(T / 2), d_model]``."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, config.d_model)
        # Whisper's positions are fixed sinusoids; whatever table the checkpoint holds replaces
        # this one and stays frozen, as in the reference.
        if self.embed_positions.weight.device.type != "meta":
            with torch.no_grad():
                self.embed_positions.weight.copy_(sinusoids(config.max_source_positions,
                                                            config.d_model))
        self.embed_positions.weight.requires_grad_(False)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config)
                                    for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    @staticmethod
    def output_lengths(frame_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames per clip: the stride-2 convolution halves the count, rounding up."""
        return (frame_lengths - 1) // 2 + 1

    def _check_inputs(self, features: torch.Tensor,
                      frame_lengths: torch.Tensor | Any | None) -> torch.Tensor | None:
        config = self.config
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else \
                type(features).__name__
            raise AudioError(f"WhisperEncoder: features must be a tensor [batch, n_mels, frames], "
                             f"got {shape}; add a batch dimension with features[None]")
        if not features.is_floating_point():
            raise AudioError(f"WhisperEncoder: features must be floating point, got "
                             f"{features.dtype}")
        batch, mels, frames = features.shape
        if mels != config.num_mel_bins:
            raise AudioError(f"WhisperEncoder: features have {mels} mel bins but this encoder "
                             f"takes {config.num_mel_bins}; compute them with "
                             f"n_mels={config.num_mel_bins}")
        if frames == 0 or batch == 0:
            raise AudioError(f"WhisperEncoder: features {tuple(features.shape)} are empty")
        if frames > config.max_frames:
            raise AudioError(f"WhisperEncoder: features have {frames} frames "
                             f"({frames / 100:.2f} s) but Whisper takes at most "
                             f"{config.max_frames} ({config.max_frames / 100:.0f} s); split or "
                             "trim the audio")
        if frame_lengths is None:
            return None
        lengths = torch.as_tensor(frame_lengths, device=features.device)
        if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise AudioError(f"WhisperEncoder: frame_lengths must be {batch} integers (one per "
                             f"clip), got {lengths.dtype} of shape {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > frames).any()):
            raise AudioError(f"WhisperEncoder: frame_lengths {lengths.tolist()} must lie in "
                             f"1..{frames} (the features' frame count)")
        return lengths.to(torch.long)

    def forward(
        self,
        features: torch.Tensor,
        frame_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, ceil(T/2), d_model], out_lengths [B])``.

        Without ``frame_lengths`` every frame is attended to, exactly as Whisper does on its
        30 s padded input. With them, frames past each clip's length are zeroed before each
        convolution (where running the clip alone would see the convolution's zero padding)
        and masked as attention keys; output rows past ``out_lengths`` are zero.
        """
        lengths = self._check_inputs(features, frame_lengths)
        batch, _, frames = features.shape
        features = features.to(self.conv1.weight.dtype)
        out_frames = (frames - 1) // 2 + 1
        valid_in = valid_out = attend = None
        if lengths is not None and bool((lengths < frames).any()):
            valid_in = torch.arange(frames, device=features.device) < lengths[:, None]
            valid_out = torch.arange(out_frames, device=features.device) < \
                self.output_lengths(lengths)[:, None]
            attend = valid_out[:, None, None, :]
        if valid_in is not None:
            features = features.masked_fill(~valid_in[:, None, :], 0.0)
        hidden = F.gelu(self.conv1(features))
        if valid_in is not None:
            hidden = hidden.masked_fill(~valid_in[:, None, :], 0.0)
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)
        hidden = hidden + self.embed_positions.weight[:out_frames]
        for layer in self.layers:
            hidden = layer(hidden, attend)
        hidden = self.layer_norm(hidden)
        if valid_out is not None:
            hidden = hidden.masked_fill(~valid_out[:, :, None], 0.0)
        if lengths is None:
            out_lengths = torch.full((batch,), out_frames, dtype=torch.long,
                                     device=features.device)
        else:
            out_lengths = self.output_lengths(lengths)
        return hidden, out_lengths

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> WhisperEncoder:
        """The encoder of a Whisper checkpoint folder (a full encoder-decoder checkpoint or an
        encoder-only one); decoder tensors are not read. ``dtype`` defaults to float32."""
        from rba_core.weights.safetensors_io import load_into_module, load_tensors

        config = WhisperConfig.from_folder(folder)
        dtype = torch.float32 if dtype is None else dtype
        for prefix in ENCODER_PREFIXES:
            tensors = load_tensors(folder, dtype=dtype, device=device, prefix=prefix)
            if tensors:
                break
        else:
            raise CheckpointError(f"{folder}: holds no Whisper encoder tensors (names starting "
                                  f"with {' or '.join(ENCODER_PREFIXES)}); pass a Whisper "
                                  "checkpoint folder")
        with torch.device("meta"):
            encoder = cls(config)
        load_into_module(encoder, {name[len(prefix):]: tensor for name, tensor in tensors.items()},
                         source=f"{folder} ({prefix}*)")
        return encoder.eval()
