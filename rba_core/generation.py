"""Batched generation with a preallocated KV cache.

Ragged prompts are left-padded so every row writes its next token at the same cache slot;
padding is masked out of attention and skipped by the rotary positions, so a row's tokens do
not depend on the other rows in its batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rba_core.models.llama import LlamaForCausalLM


@dataclass
class SamplingConfig:
    """How the next token is chosen. ``temperature`` 0 is greedy (argmax); otherwise the
    logits are divided by it, restricted to the ``top_k`` most likely tokens (0: all) and to
    the smallest set whose probability reaches ``top_p`` (1.0: all), then sampled."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def select_next_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                       generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits ``[B, V]``."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token once the more likely ones already reach top_p; the best always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, T]`` and attention mask ``[B, T]`` with each prompt right-aligned."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (a list of token ids). A row ends after its first stop
    id (which is included) or after ``max_new_tokens``. Sampling draws from a generator seeded
    with ``seed``, so equal seeds give equal samples. Without ``use_cache`` every step runs
    the whole sequence again (slow; a reference for the cached path)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, stop_ids=tuple(stop_ids), seed=seed)
    sampling.validate()
    device = model.lm_head_weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    batch = ids.shape[0]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stop = torch.tensor(sorted(set(sampling.stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
    head = model.lm_head_weight

    cache = model.new_kv_cache(batch, ids.shape[1] + max_new_tokens) if use_cache else None
    step_ids, step_mask = ids, mask
    steps = 0
    for steps in range(1, max_new_tokens + 1):
        hidden = model(step_ids, attention_mask=step_mask, kv_cache=cache, return_hidden=True)
        logits = torch.nn.functional.linear(hidden[:, -1], head)
        token = select_next_tokens(logits, sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        produced[:, steps - 1] = token
        if stop.numel():
            finished |= torch.isin(token, stop)
        if bool(finished.all()):
            break
        if cache is not None:
            # The cache remembers the prompt padding; new tokens are all real.
            step_ids, step_mask = token[:, None], None
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids, step_mask = ids, mask

    return cut_at_stop(produced[:, :steps].tolist(), sampling.stop_ids)


def cut_at_stop(rows: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> list[list[int]]:
    """Each row up to and including its first stop id (whole when it has none)."""
    stop_set = set(stop_ids)
    results: list[list[int]] = []
    for row in rows:
        out: list[int] = []
        for token in row:
            out.append(token)
            if token in stop_set:
                break
        results.append(out)
    return results
