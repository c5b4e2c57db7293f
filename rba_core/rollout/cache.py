"""The shared-prefix KV cache: a prompt's keys/values stored once, each sample's suffix apart."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
