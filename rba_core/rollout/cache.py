"""Shared-prefix attention as cache types of the model's one layer loop.

``SharedPrefixKVCache`` stores a prompt's keys/values once and each sample's suffix apart.
``PrefixAttention`` and ``CascadeAttention`` are what ``LlamaForCausalLM.forward`` takes as
its ``kv_cache`` to run a batch of prompts, then their G continuations attending to them (the
model's ``LayerAttention`` protocol): the prompt runs once per group, with or without storage.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rba_core.kernels.cascade_attention import cascade_attention
from rba_core.models.llama import attention


@dataclass
class SharedPrefixKVCache:
    """Per layer: prompt K/V ``[B, Hkv, P, D]`` once per prompt, suffix K/V ``[R, Hkv, T, D]``
    once per sample row. Everything is allocated up front; decoding writes in place.

    ``prefix_k[l]``/``suffix_k[l]`` are the views the attention of layer ``l`` reads. All live
    samples of a rollout sit at the same suffix position, so one ``length`` suffices.
    """

    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    suffix_k: torch.Tensor
    suffix_v: torch.Tensor
    prefix_lens: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, *, num_layers: int, num_kv_heads: int, head_dim: int, num_prompts: int,
                 max_prompt_len: int, num_rows: int, max_new_tokens: int,
                 dtype: torch.dtype, device: torch.device | str) -> "SharedPrefixKVCache":
        prefix_shape = (num_layers, num_prompts, num_kv_heads, max_prompt_len, head_dim)
        suffix_shape = (num_layers, num_rows, num_kv_heads, max_new_tokens, head_dim)
        # Zeros, not empty: attention reads slots past a prompt's or sample's length (masked to
        # probability 0), and 0 * NaN from uninitialised memory would still poison the output.
        return cls(
            prefix_k=torch.zeros(prefix_shape, dtype=dtype, device=device),
            prefix_v=torch.zeros(prefix_shape, dtype=dtype, device=device),
            suffix_k=torch.zeros(suffix_shape, dtype=dtype, device=device),
            suffix_v=torch.zeros(suffix_shape, dtype=dtype, device=device),
            prefix_lens=torch.zeros(num_prompts, dtype=torch.long, device=device),
        )

    @property
    def num_prompts(self) -> int:
        return self.prefix_k.shape[1]

    @property
    def max_prompt_len(self) -> int:
        return self.prefix_k.shape[3]

    @property
    def num_rows(self) -> int:
        return self.suffix_k.shape[1]

    @property
    def max_new_tokens(self) -> int:
        return self.suffix_k.shape[3]

    def fits(self, num_prompts: int, prompt_len: int, num_rows: int, new_tokens: int) -> bool:
        return (num_prompts <= self.num_prompts and prompt_len <= self.max_prompt_len
                and num_rows <= self.num_rows and new_tokens <= self.max_new_tokens)

    def reset(self, prefix_lens: torch.Tensor) -> None:
        """Start a new rollout over prompts of these lengths (one per leading prompt slot)."""
        self.prefix_lens.zero_()
        self.prefix_lens[: prefix_lens.numel()] = prefix_lens.to(self.prefix_lens.device)
        self.length = 0

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's prompt keys/values ``[B, Hkv, P, D]`` (right-padded)."""
        B, _, P, _ = k.shape
        self.prefix_k[layer, :B, :, :P] = k
        self.prefix_v[layer, :B, :, :P] = v

    def write_suffix(self, layer: int, rows: torch.Tensor, position: int | torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys/values ``[S, Hkv, 1, D]`` of one decode step at ``position`` for the
        given storage rows. ``position`` may be a device tensor of shape [1] (CUDA-graph
        friendly: no host value changes between replays)."""
        self.suffix_k[layer, rows, :, position] = k[:, :, 0]
        self.suffix_v[layer, rows, :, position] = v[:, :, 0]


def unshared_kv_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int,
                      element_size: int, prompt_lens: list[int], group_size: int,
                      new_tokens: int) -> int:
    """Bytes of K/V when every sample stores its own copy of the prompt (G * (P + T) per prompt)."""
    per_token = 2 * num_layers * num_kv_heads * head_dim * element_size
    return per_token * sum(group_size * (p + new_tokens) for p in prompt_lens)


class PrefixAttention:
    """Causal attention over right-padded prompts ``[B, P]`` (padding only ever follows the
    real tokens, so plain causal attention is exact for them). Records every layer's keys and
    values, keeping their autograd graph, and writes them into ``cache`` when given."""

    def __init__(self, cache: SharedPrefixKVCache | None = None) -> None:
        self.cache = cache
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        if self.cache is not None:
            self.cache.write_prefix(layer, k, v)
        self.keys.append(k)
        self.values.append(v)
        return attention(q, k, v, mask=None, causal=True)


class CascadeAttention:
    """Continuations ``[S, T]`` attending to their prompt's prefix keys/values (one copy per
    group of ``max_group`` samples, ``sample_prompt[s]`` naming the prompt) and causally to
    themselves, through ``cascade_attention``.

    Without ``cache`` the suffix keys/values are the ones of this forward (scoring, training).
    With ``cache`` (decode, T == 1) they are written at ``cache_position`` of storage ``rows``
    and the attention reads the cache's suffix up to ``suffix_lens``; ``cache_position`` may be
    a device tensor of shape [1] (nothing the CUDA graph reads from the host changes).
    """

    def __init__(self, prefix_keys: Sequence[torch.Tensor], prefix_values: Sequence[torch.Tensor],
                 prefix_lens: torch.Tensor, sample_prompt: torch.Tensor, max_group: int, *,
                 suffix_lens: torch.Tensor, cache: SharedPrefixKVCache | None = None,
                 rows: torch.Tensor | None = None, cache_position: int | torch.Tensor = 0,
                 group_starts: torch.Tensor | None = None, backend: str = "auto") -> None:
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_lens, self.sample_prompt, self.max_group = prefix_lens, sample_prompt, max_group
        self.suffix_lens, self.cache, self.rows = suffix_lens, cache, rows
        self.cache_position, self.group_starts, self.backend = cache_position, group_starts, backend

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        suffix_k, suffix_v, suffix_rows = k, v, None
        if self.cache is not None:
            self.cache.write_suffix(layer, self.rows, self.cache_position, k, v)
            suffix_k, suffix_v = self.cache.suffix_k[layer], self.cache.suffix_v[layer]
            suffix_rows = self.rows
            if isinstance(self.cache_position, int):
                # Views up to the current step, so the PyTorch path skips the unused tail.
                suffix_k = suffix_k[:, :, : self.cache_position + 1]
                suffix_v = suffix_v[:, :, : self.cache_position + 1]
        out = cascade_attention(
            q.transpose(1, 2), self.prefix_keys[layer], self.prefix_values[layer],
            self.prefix_lens, suffix_k, suffix_v, self.suffix_lens, self.sample_prompt,
            suffix_rows, max_group=self.max_group, group_starts=self.group_starts,
            backend=self.backend)
        return out.transpose(1, 2)
