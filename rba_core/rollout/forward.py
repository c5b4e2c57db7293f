"""Layer-by-layer forwards of a Llama-family model over a shared prompt and G continuations.

The model's own ``forward`` attends over one flat sequence per row. These drive its layers
directly (through ``project_qkv`` / ``project_out`` / ``mlp``), so the prompt's keys and values
can be computed once and attended to by every continuation of its group through cascade
attention. No-grad decoding may pass ``packed`` (``rba_core.models.packed.PackedProjections``)
to ``suffix_forward`` to run the projections as fused, prepacked GEMMs instead of the modules.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rba_core.errors import ConfigError
from rba_core.kernels.cascade_attention import cascade_attention
from rba_core.models.llama import apply_rotary, attention
from rba_core.models.packed import PackedProjections


def check_model(model: torch.nn.Module) -> None:
    """Refuse models whose attention the shared-prefix path does not reproduce."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ConfigError(
            "rollout: the model must be an rba_core.models.llama.LlamaForCausalLM (a Llama-family "
            f"decoder with .config and .model.layers), got {type(model).__name__}"
        )
    if any(w is not None for w in getattr(config, "sliding_windows", ())):
        raise ConfigError(
            "rollout: sliding-window attention layers are not supported by the shared-prefix "
            "engine; use a model without sliding_window (or the plain rba_core.generation)"
        )


@dataclass
class Prompts:
    """A batch of prompts as right-padded embeddings ``[B, P, hidden]`` and lengths ``[B]``."""

    embeds: torch.Tensor
    lens: torch.Tensor
    lens_list: list[int]


def embed_prompts(model: torch.nn.Module, prompts: Sequence[torch.Tensor], *,
                  max_prompt_len: int | None = None) -> Prompts:
    """Each prompt is token ids ``[P]`` (int) or input embeddings ``[P, hidden]`` (float, e.g.
    speech frames spliced into a chat template). Embeddings keep their autograd graph."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError(
            "rollout: prompts must be a non-empty list of tensors (token ids [P] or embeddings "
            "[P, hidden]); wrap a single prompt in a list"
        )
    weight = model.model.embed_tokens.weight
    hidden_size = weight.shape[1]
    vocab = weight.shape[0]
    rows: list[torch.Tensor] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, torch.Tensor):
            raise ConfigError(f"rollout: prompt {i} is a {type(prompt).__name__}; pass a tensor "
                              "of token ids [P] or embeddings [P, hidden]")
        if prompt.is_floating_point():
            if prompt.dim() != 2 or prompt.shape[1] != hidden_size:
                raise ConfigError(
                    f"rollout: prompt {i} embeddings have shape {tuple(prompt.shape)}; they must "
                    f"be [P, {hidden_size}] (the model's hidden size)"
                )
            row = prompt.to(device=weight.device, dtype=weight.dtype)
        else:
            if prompt.dim() != 1:
                raise ConfigError(f"rollout: prompt {i} token ids have shape "
                                  f"{tuple(prompt.shape)}; they must be 1-D [P]")
            if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab):
                raise ConfigError(f"rollout: prompt {i} holds token ids outside [0, {vocab}); "
                                  "was it tokenized for another model?")
            row = None
        if prompt.shape[0] == 0:
            raise ConfigError(f"rollout: prompt {i} is empty; every prompt needs at least one "
                              "token (e.g. the chat template's BOS)")
        if max_prompt_len is not None and prompt.shape[0] > max_prompt_len:
            raise ConfigError(
                f"rollout: prompt {i} has {prompt.shape[0]} tokens but the cache holds "
                f"{max_prompt_len} prompt positions; raise max_prompt_len or shorten the prompt"
            )
        rows.append(model.embed(prompt.to(weight.device)) if row is None else row)
    lens_list = [r.shape[0] for r in rows]
    P = max(lens_list)
    embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, P - r.shape[0])) for r in rows])
    lens = torch.tensor(lens_list, dtype=torch.long, device=weight.device)
    return Prompts(embeds, lens, lens_list)


def _layer_calls(model: torch.nn.Module, packed: PackedProjections | None) -> list[tuple]:
    """Per layer, (project_qkv, project_out, mlp): the packed copies' when given, else the
    layer's own modules (differentiable, and the only choice while gradients are needed)."""
    if packed is not None:
        return [(p.project_qkv, p.project_out, p.mlp) for p in packed.layers]
    return [(layer.self_attn.project_qkv, layer.self_attn.project_out, layer.mlp)
            for layer in model.model.layers]


def prefix_forward(model: torch.nn.Module, prompts: Prompts, *, cache=None
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run the right-padded prompts ``[B, P]`` through every layer.

    Right padding keeps plain causal attention exact for the real tokens (padding only ever
    comes after them). Returns the final-normed hidden states ``[B, P, hidden]`` and the
    per-layer keys/values ``[B, Hkv, P, D]``; with a ``cache`` they are also written into it.
    """
    h = prompts.embeds
    B, P, _ = h.shape
    positions = torch.arange(P, device=h.device)[None].expand(B, P)
    cos, sin = model.model.rotary_emb(positions, h.dtype)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = attn.project_qkv(layer.input_layernorm(h))
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            cache.write_prefix(index, k, v)
        keys.append(k)
        values.append(v)
        h = h + attn.project_out(attention(q, k, v, mask=None, causal=True))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h), keys, values


def suffix_forward(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    prefix_keys: Sequence[torch.Tensor],
    prefix_values: Sequence[torch.Tensor],
    prefix_lens: torch.Tensor,
    sample_prompt: torch.Tensor,
    max_group: int,
    *,
    cache=None,
    rows: torch.Tensor | None = None,
    cache_position: int | torch.Tensor = 0,
    suffix_lens: torch.Tensor | None = None,
    group_starts: torch.Tensor | None = None,
    backend: str = "auto",
    packed: PackedProjections | None = None,
) -> torch.Tensor:
    """Continuation tokens ``embeds [S, T, hidden]`` at rotary ``positions [S, T]``, attending
    to their prompt's prefix and causally to themselves. Returns final-normed hidden ``[S, T,
    hidden]``.

    Without ``cache`` the suffix keys/values are the ones computed here (scoring, training).
    With ``cache`` (decode, T == 1) they are written at ``cache_position`` of storage ``rows``
    and the attention reads the cache's suffix up to ``suffix_lens``. ``packed`` (no grad)
    replaces the layers' projections with their packed copies.
    """
    h = embeds
    S, T, _ = h.shape
    cos, sin = model.model.rotary_emb(positions, h.dtype)
    if suffix_lens is None:
        suffix_lens = torch.full((S,), T, dtype=torch.long, device=h.device)
    calls = _layer_calls(model, packed)
    for index, layer in enumerate(model.model.layers):
        project_qkv, project_out, mlp = calls[index]
        q, k, v = project_qkv(layer.input_layernorm(h))
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            cache.write_suffix(index, rows, cache_position, k, v)
            suffix_k, suffix_v, suffix_rows = cache.suffix_k[index], cache.suffix_v[index], rows
            if isinstance(cache_position, int):
                # Views up to the current step, so the PyTorch path skips the unused tail.
                suffix_k = suffix_k[:, :, : cache_position + 1]
                suffix_v = suffix_v[:, :, : cache_position + 1]
        else:
            suffix_k, suffix_v, suffix_rows = k, v, None
        out = cascade_attention(
            q.transpose(1, 2), prefix_keys[index], prefix_values[index], prefix_lens,
            suffix_k, suffix_v, suffix_lens, sample_prompt, suffix_rows,
            max_group=max_group, group_starts=group_starts, backend=backend,
        )
        h = h + project_out(out.transpose(1, 2))
        h = h + mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h)
