"""Prompts for the rollout engine: checks, embedding, right padding, and the shared prefill.

The prompt's keys and values are computed once (``prefill``) and attended to by every
continuation of its group: both are the model's own forward with a shared-prefix cache type
(``rba_core.rollout.cache``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rba_core.errors import ConfigError
from rba_core.rollout.cache import PrefixAttention, SharedPrefixKVCache


def check_model(model: torch.nn.Module) -> None:
    """Refuse models whose attention the shared-prefix path does not reproduce."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError(
            "rollout: the model must be an rba_core.models.llama.LlamaForCausalLM (a Llama-family "
            f"decoder with .config and .model.layers), got {type(model).__name__}"
        )
    if any(w is not None for w in getattr(config, "sliding_windows", ())):
        raise ConfigError(
            "rollout: sliding-window attention layers are not supported by the shared-prefix "
            "engine; use a model without sliding_window (its plain forward still works)"
        )


def check_context(model: torch.nn.Module, prompt_len: int, new_tokens: int, what: str) -> None:
    """ConfigError (naming ``what``) when ``prompt_len + new_tokens`` positions pass the
    model's context, ``config.max_position_embeddings``."""
    context = model.config.max_position_embeddings
    if prompt_len + new_tokens > context:
        more = f" and {new_tokens} new tokens" if new_tokens else ""
        raise ConfigError(
            f"{what} has {prompt_len} tokens{more}, past the model's context of {context} "
            "positions (max_position_embeddings); shorten the prompt"
            + (" or ask for fewer new tokens" if new_tokens else ""))


@dataclass
class Prompts:
    """A batch of prompts as right-padded embeddings ``[B, P, hidden]`` and lengths ``[B]``."""

    embeds: torch.Tensor
    lens: torch.Tensor
    lens_list: list[int]


def embed_prompts(model: torch.nn.Module, prompts: Sequence[torch.Tensor], *,
                  max_prompt_len: int | None = None, new_tokens: int = 0) -> Prompts:
    """Each prompt is token ids ``[P]`` (int) or input embeddings ``[P, hidden]`` (float, e.g.
    speech frames spliced into a chat template). Embeddings keep their autograd graph.

    A prompt that, with ``new_tokens`` more positions, does not fit the model's context
    (``max_position_embeddings``) is refused before anything is computed: attention over it
    would cost memory quadratic in its length for positions the model never learnt."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(
            "rollout: prompts must be a non-empty list of tensors (token ids [P] or embeddings "
            "[P, hidden]); wrap a single prompt in a list"
        )
    weight = model.model.embed_tokens.weight
    hidden_size = weight.shape[1]
    vocab = weight.shape[0]
    rows: list[torch.Tensor] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, torch.Tensor):
            raise TypeError(f"rollout: prompt {i} is a {type(prompt).__name__}; pass a tensor "
                            "of token ids [P] or embeddings [P, hidden]")
        if prompt.is_floating_point():
            if prompt.dim() != 2 or prompt.shape[1] != hidden_size:
                raise ValueError(
                    f"rollout: prompt {i} embeddings have shape {tuple(prompt.shape)}; they must "
                    f"be [P, {hidden_size}] (the model's hidden size)"
                )
            row = prompt.to(device=weight.device, dtype=weight.dtype)
        else:
            if prompt.dim() != 1:
                raise ValueError(f"rollout: prompt {i} token ids have shape "
                                 f"{tuple(prompt.shape)}; they must be 1-D [P]")
            if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab):
                raise ValueError(f"rollout: prompt {i} holds token ids outside [0, {vocab}); "
                                 "was it tokenized for another model?")
            row = None
        if prompt.shape[0] == 0:
            raise ValueError(f"rollout: prompt {i} is empty; every prompt needs at least one "
                             "token (e.g. the chat template's BOS)")
        check_context(model, prompt.shape[0], new_tokens, f"rollout: prompt {i}")
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


def prefill(model: torch.nn.Module, prompts: Prompts, cache: SharedPrefixKVCache | None = None
            ) -> tuple[torch.Tensor, PrefixAttention]:
    """The right-padded prompts through the model once: final-normed hidden states
    ``[B, P, hidden]`` and the ``PrefixAttention`` holding every layer's keys/values (also
    written into ``cache`` when given)."""
    B, P, _ = prompts.embeds.shape
    positions = torch.arange(P, device=prompts.embeds.device)[None].expand(B, P)
    attention = PrefixAttention(cache)
    hidden = model(inputs_embeds=prompts.embeds, position_ids=positions, kv_cache=attention,
                   return_hidden=True)
    return hidden, attention
