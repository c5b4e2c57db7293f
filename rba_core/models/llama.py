"""Llama-family decoder: Llama 2 and 3 (incl. Llama-3 RoPE scaling), Mistral, Qwen2, SmolLM2.

One module covers the family: RMSNorm, rotary position embeddings, grouped-query attention and
a SwiGLU MLP; the members differ only in configuration (q/k/v biases for Qwen2, a sliding
window for Mistral, a tied LM head for SmolLM2). Parameter names equal the Hugging Face names,
and loading goes through one explicit name table, so a Hugging Face checkpoint folder loads
directly.

The attention of each layer is usable piece by piece (``project_qkv``, ``apply_rotary``,
``attention``, ``project_out``) so the rollout engine can drive shared-prefix KV caches itself.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rba_core.weights.safetensors_io import CONFIG_NAME, load_into_module, load_tensors, read_config
from rba_core.errors import ConfigError

try:
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # flash-attn is optional; SDPA covers every device.
    _flash_attn_func = None

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Hugging Face tensor name -> our parameter name, for the whole Llama family ({i}: layer index).
# Our names equal Hugging Face's, so each entry maps to itself; ``None`` marks a tensor that
# some checkpoints carry but that is recomputed rather than loaded (old Llama exports saved
# the rotary inverse frequencies).
LLAMA_NAME_TABLE: dict[str, str | None] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight":
        "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": None,
}
NAME_TABLES: dict[str, dict[str, str | None]] = {
    model_type: LLAMA_NAME_TABLE for model_type in SUPPORTED_MODEL_TYPES
}


def _compile_table(table: dict[str, str | None]) -> list[tuple[re.Pattern[str], str | None]]:
    return [
        (re.compile("^" + re.escape(source).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$"),
         target)
        for source, target in table.items()
    ]


_COMPILED_TABLES = {name: _compile_table(table) for name, table in NAME_TABLES.items()}


def map_hf_names(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to our parameter names through the family's table.
    Names the table does not know are kept as they are, so strict loading reports them."""
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        for pattern, target in _COMPILED_TABLES[model_type]:
            match = pattern.match(name)
            if match:
                if target is not None:
                    mapped[target.replace("{i}", match.groupdict().get("i") or "")] = tensor
                break
        else:
            mapped[name] = tensor
    return mapped


@dataclass
class LlamaConfig:
    """The decoder's shape and numerics, read off a Hugging Face ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per layer: None for full causal attention, else the sliding-window width in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = CONFIG_NAME) -> "LlamaConfig":
        """Build from a parsed config.json; ``source`` names the file in errors."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a supported LLM; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        architectures = config.get("architectures") or []
        unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unsupported:
            raise ConfigError(f"{source}: architecture {unsupported[0]!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def required_int(field: str) -> int:
            if field not in config or config[field] is None:
                raise ConfigError(f"{source}: missing field {field!r}; a {model_type} config "
                                  "needs it")
            value = config[field]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: field {field!r} must be a positive integer, "
                                  f"got {value!r}")
            return value

        vocab_size = required_int("vocab_size")
        hidden_size = required_int("hidden_size")
        intermediate_size = required_int("intermediate_size")
        num_layers = required_int("num_hidden_layers")
        num_heads = required_int("num_attention_heads")
        num_kv_heads = required_int("num_key_value_heads") \
            if config.get("num_key_value_heads") is not None else num_heads
        if num_heads % num_kv_heads:
            raise ConfigError(f"{source}: num_attention_heads ({num_heads}) must be a multiple "
                              f"of num_key_value_heads ({num_kv_heads})")
        if config.get("head_dim") is not None:
            head_dim = required_int("head_dim")
        elif hidden_size % num_heads:
            raise ConfigError(f"{source}: hidden_size ({hidden_size}) is not divisible by "
                              f"num_attention_heads ({num_heads}); give head_dim explicitly")
        else:
            head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim ({head_dim}) must be even for rotary "
                              "embeddings")
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise ConfigError(f"{source}: hidden_act {activation!r} is not supported; the "
                              "Llama family uses 'silu'")

        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")

        def rope_field(field: str) -> Any:
            if field not in rope:
                raise ConfigError(f"{source}: rope_scaling of type {rope_type!r} needs field "
                                  f"{field!r}")
            return rope[field]

        rope_kwargs: dict[str, Any] = {}
        if rope_type in ("linear", "llama3"):
            rope_kwargs["rope_factor"] = float(rope_field("factor"))
        if rope_type == "llama3":
            rope_kwargs["rope_low_freq_factor"] = float(rope_field("low_freq_factor"))
            rope_kwargs["rope_high_freq_factor"] = float(rope_field("high_freq_factor"))
            rope_kwargs["rope_original_max_position_embeddings"] = int(
                rope_field("original_max_position_embeddings"))

        sliding_windows = _sliding_windows(config, model_type, num_layers, source)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_windows=sliding_windows,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            **rope_kwargs,
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "LlamaConfig":
        return cls.from_dict(read_config(folder), source=str(Path(folder) / CONFIG_NAME))


def _sliding_windows(config: dict[str, Any], model_type: str, num_layers: int,
                     source: str) -> tuple[int | None, ...]:
    """Which layers attend through a sliding window, following each family's convention."""
    window = config.get("sliding_window")
    if model_type == "llama" or window is None:
        return (None,) * num_layers
    if model_type == "mistral":
        return (int(window),) * num_layers
    layer_types = config.get("layer_types")
    if layer_types is None:
        if not config.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(config.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types lists {len(layer_types)} layers but "
                          f"num_hidden_layers is {num_layers}")
    if not config.get("use_sliding_window", True):
        return (None,) * num_layers
    return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least float32: bf16 squares lose too much (float64 stays float64).
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies (float32, CPU), with the configured scaling applied."""
    dim = config.head_dim
    # Always on the CPU, also inside a meta-device context: meta arithmetic here would import
    # torch._dynamo (seconds) for a table that is recomputed after loading anyway.
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by ``factor``, short ones kept, and the band
        # between the two cut-offs blends smoothly.
        factor = config.rope_factor
        old_context = config.rope_original_max_position_embeddings
        low_wavelen = old_context / config.rope_low_freq_factor
        high_wavelen = old_context / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(in_band, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids: ``forward(position_ids [B, T])`` returns two
    ``[B, T, head_dim]`` tensors in ``dtype``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # Device moves, dtype casts and to_empty all pass here; the frequencies are recomputed
        # in float32 afterwards, since a bf16 copy would shift every rotation angle.
        result = super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:
            self.inv_freq = rope_inverse_frequencies(self.config).to(self.inv_freq.device)
        return result

    def forward(self, position_ids: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries ``[B, H, T, D]`` and keys ``[B, Hkv, T, D]`` by cos/sin ``[B, T, D]``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def build_attention_mask(key_valid: torch.Tensor | None, past: int, query_len: int,
                         window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask ``[B or 1, 1, T, S]`` (True = may attend) for queries at cache indices
    ``past .. past+T-1`` over keys ``0 .. S-1``; None when plain causal attention (SDPA's
    ``is_causal``) or no mask at all gives the same result."""
    total = past + query_len
    if key_valid is None and (window is None or total <= window):
        if past == 0 or query_len == 1:
            return None
    query_index = torch.arange(past, total, device=device)[:, None]
    key_index = torch.arange(total, device=device)[None, :]
    allowed = key_index <= query_index
    if window is not None:
        allowed = allowed & (key_index > query_index - window)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :total].bool()
        # A padding query would have no key left, and softmax over nothing is NaN; it may see
        # itself instead (its output is never used).
        allowed = allowed | (key_index == query_index)[None, None]
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              mask: torch.Tensor | None, causal: bool,
              window: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: q ``[B, H, T, D]``, k/v
    ``[B, Hkv, S, D]`` -> ``[B, H, T, D]``. ``causal`` aligns the last query with the last
    key; ``mask`` (from ``build_attention_mask``) replaces it when given."""
    if (_flash_attn_func is not None and mask is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        out = _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
            window_size=(window - 1, 0) if window is not None else (-1, -1))
        return out.transpose(1, 2)
    query_len, key_len = q.shape[2], k.shape[2]
    if mask is None and causal and query_len > 1 and (
            key_len != query_len or (window is not None and key_len > window)):
        # SDPA's is_causal aligns the first query with the first key, which is only right
        # when queries and keys are the same positions and no window applies.
        mask = build_attention_mask(None, key_len - query_len, query_len, window, q.device)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    use_causal = causal and mask is None and query_len > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=use_causal)


class LayerAttention(Protocol):
    """What a layer asks of its cache type: the attended values ``[B, H, T, D]`` for its rotated
    queries ``[B, H, T, D]`` and new keys / values ``[B, Hkv, T, D]``. ``KVCache`` (one flat
    sequence per row) and the rollout's shared-prefix attentions implement it, so one layer
    loop serves plain forwards, cached decoding, and a prompt shared by G continuations."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor: ...


class FlatAttention:
    """Causal attention over one flat sequence per row (no cache), with padding masks."""

    def __init__(self, masks: dict[int | None, torch.Tensor | None]) -> None:
        self.masks = masks

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        return attention(q, k, v, mask=self.masks[window], causal=True, window=window)


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions so decoding
    never reallocates. All rows share one write position (prompts are left-padded); which
    slots hold real tokens is tracked per row, as is each row's count of real tokens (the next
    rotary position)."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.has_padding = False
        self.max_len = max_len
        # The attention masks of the tokens being written, per sliding window (set by the model).
        self.masks: dict[int | None, torch.Tensor | None] = {}

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        self.seen.zero_()
        self.key_valid.zero_()

    def begin(self, num_new: int, valid: torch.Tensor | None) -> None:
        """Record the padding of ``num_new`` tokens about to be written (called by the model
        before its layers write); raises when they would not fit."""
        if self.length + num_new > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {self.length} are used "
                             f"and {num_new} more do not fit; allocate a larger max_len")
        end = self.length + num_new
        if valid is None:
            self.key_valid[:, self.length:end] = True
        else:
            self.key_valid[:, self.length:end] = valid.bool()
            self.has_padding = True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        """``LayerAttention``: append the new keys/values, attend over everything held."""
        keys, values = self.update(layer, k, v)
        return attention(q, keys, values, mask=self.masks[window], causal=True, window=window)

    def update(self, layer: int, key: torch.Tensor,
               value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values ``[B, Hkv, T, D]`` after the current length and
        return all keys/values up to them (views, no copies)."""
        end = self.length + key.shape[2]
        self.keys[layer, :, :, self.length:end] = key
        self.values[layer, :, :, self.length:end] = value
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_new: int, valid: torch.Tensor | None) -> None:
        """Commit ``num_new`` written positions (called by the model after its layers)."""
        self.length += num_new
        self.seen += num_new if valid is None else valid.long().sum(-1)


def merge_heads(attended: torch.Tensor) -> torch.Tensor:
    """Attention output ``[B, H, T, D]`` -> ``[B, T, H * D]``, the output projection's input."""
    batch, _, length, _ = attended.shape
    return attended.transpose(1, 2).reshape(batch, length, -1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's gated activation, the down projection's input."""
    return F.silu(gate) * up


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_windows[layer_idx]
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)

    def project_qkv(self, hidden: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, T, hidden]`` -> q ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]``."""
        return self.split_heads(self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden))

    def split_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections ``[B, T, heads * D]`` -> q ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]``."""
        batch, length, _ = q.shape
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` -> ``[B, T, hidden]``."""
        return self.o_proj(merge_heads(attended))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: "LayerAttention", packed: Any = None) -> torch.Tensor:
        """One pre-norm block. ``attention`` (the cache type) turns this layer's rotated q and
        k, and v, into the attended values; ``packed`` (a ``PackedLayer``, no grad) replaces
        the projections with fused, prepacked copies. Called as a module, so FSDP's hooks
        gather the layer's weights."""
        attn = self.self_attn
        project_qkv, project_out, mlp = ((attn.project_qkv, attn.project_out, self.mlp)
                                         if packed is None else
                                         (packed.project_qkv, packed.project_out, packed.mlp))
        q, k, v = project_qkv(self.input_layernorm(hidden))
        q, k = apply_rotary(q, k, cos, sin)
        hidden = hidden + project_out(attention.attend(attn.layer_idx, q, k, v, attn.window))
        return hidden + mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        # Random init only off the meta device: on meta, normal_ drags in torch._dynamo
        # (seconds of import) for a tensor that loading replaces anyway.
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM whose parameter names equal the Hugging Face names."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` output projection (the embedding matrix when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache in this model's dtype and device."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, dtype=weight.dtype,
                       device=weight.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: "KVCache | LayerAttention | None" = None,
        return_hidden: bool = False,
        packed: Any = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]``, or with ``return_hidden`` the final-normed hidden states
        ``[B, T, hidden]``.

        ``attention_mask`` ``[B, T]`` marks real tokens (1) and padding (0) among the new
        tokens; prompts are left-padded, and rotary positions count real tokens only. With a
        ``KVCache`` the new tokens follow what the cache holds and are appended to it. Any
        other ``kv_cache`` is a cache type of its own (``LayerAttention``, e.g. the rollout's
        shared-prefix attentions): it attends, and ``position_ids`` must be given.
        ``packed`` (``rba_core.models.packed.PackedProjections``, no grad) runs the layers'
        projections from fused, prepacked weight copies.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LlamaForCausalLM.forward: pass exactly one of input_ids and "
                             "inputs_embeds")
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must "
                             f"be [batch, new tokens] = {[batch, length]}")
        flat_cache = kv_cache if isinstance(kv_cache, KVCache) else None
        if kv_cache is None or flat_cache is not None:
            attention = self._flat_attention(hidden, attention_mask, flat_cache)
            if position_ids is None:
                position_ids = self._positions(batch, length, attention_mask, flat_cache,
                                               hidden.device)
        else:
            if position_ids is None:
                raise ValueError("LlamaForCausalLM.forward: a shared-prefix cache type needs "
                                 "position_ids")
            attention = kv_cache
        cos, sin = self.model.rotary_emb(position_ids, hidden.dtype)
        layers = packed.layers if packed is not None else [None] * len(self.model.layers)
        for layer, packed_layer in zip(self.model.layers, layers):
            hidden = layer(hidden, cos, sin, attention, packed_layer)
        if flat_cache is not None:
            flat_cache.advance(length, attention_mask)
        hidden = self.model.norm(hidden)
        if return_hidden:
            return hidden
        head = self.lm_head_weight if packed is None else None
        return F.linear(hidden, head) if head is not None else packed.lm_head(hidden)

    def _flat_attention(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                        kv_cache: "KVCache | None") -> "LayerAttention":
        """Masks for one flat sequence per row, recorded in the KVCache when there is one."""
        batch, length = hidden.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None:
            if kv_cache.batch_size != batch:
                raise ValueError(f"kv_cache was allocated for batch {kv_cache.batch_size}, "
                                 f"inputs have batch {batch}")
            kv_cache.begin(length, attention_mask)
            key_valid = kv_cache.key_valid if kv_cache.has_padding else None
        else:
            key_valid = attention_mask
        masks = {window: build_attention_mask(key_valid, past, length, window, hidden.device)
                 for window in set(self.config.sliding_windows)}
        if kv_cache is None:
            return FlatAttention(masks)
        kv_cache.masks = masks
        return kv_cache

    @staticmethod
    def _positions(batch: int, length: int, attention_mask: torch.Tensor | None,
                   kv_cache: KVCache | None, device: torch.device) -> torch.Tensor:
        start = kv_cache.seen[:, None] if kv_cache is not None else torch.zeros(
            batch, 1, dtype=torch.long, device=device)
        if attention_mask is None:
            return start + torch.arange(length, device=device)[None]
        counted = attention_mask.long().cumsum(-1) - 1
        return start + counted.clamp(min=0)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "LlamaForCausalLM":
        """Load a Hugging Face-layout folder (config.json plus safetensors) in ``dtype`` (the
        stored dtype when None) onto ``device``."""
        config_path = Path(folder) / CONFIG_NAME
        config = LlamaConfig.from_dict(read_config(folder), source=str(config_path))
        # Built on the meta device: every weight comes from the file, so random initialisation
        # would be wasted work.
        with torch.device("meta"):
            model = cls(config)
        tensors = map_hf_names(load_tensors(folder, dtype=dtype, device=device),
                               config.model_type)
        if config.tie_word_embeddings:
            # Some exports store the tied head as well; the embedding is the one in use.
            tensors.pop("lm_head.weight", None)
        load_into_module(model, tensors, source=str(folder))
        model.model.rotary_emb.inv_freq = rope_inverse_frequencies(config).to(device)
        return model.eval()
