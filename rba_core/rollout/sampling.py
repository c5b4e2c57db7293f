"""Sampling settings and the per-step token choice (temperature, top-k, top-p, min-p)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rba_core.errors import ConfigError


@dataclass
class SamplingConfig:
    """How tokens are drawn. ``temperature == 0`` is greedy decoding.

    The filters apply in the order temperature, top-k, top-p, min-p (as Hugging Face's
    ``generate`` does); ``top_k = 0``, ``top_p = 1`` and ``min_p = 0`` switch them off.
    ``stop_ids`` end a sample when drawn (the stop token is kept); ``stop_strings`` end it once
    its decoded text contains one of them (needs a tokenizer). The one sampling config of rba:
    chat, generation, synthesis, evaluation and RL rollouts all draw through it.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def validate(self, name: Callable[[str], str] = lambda field: f"sampling.{field}"
                 ) -> None:
        """Raise ``ConfigError`` for an out-of-range setting; ``name`` spells a field the way
        the user wrote it (a config key by default; the CLI passes its flag names)."""
        def number(field: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"{name(field)} must be a number, got {value!r}")
            return float(value)

        def integer(field: str, value: object, low: int, meaning: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name(field)} must be an integer >= {low}{meaning}, got "
                                  f"{value!r}")

        if not 0 <= number("temperature", self.temperature) < math.inf:
            raise ConfigError(f"{name('temperature')} must be >= 0 (0 = greedy), got "
                              f"{self.temperature!r}")
        integer("top_k", self.top_k, 0, " (0 = off)")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise ConfigError(f"{name('top_p')} must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0 <= number("min_p", self.min_p) < 1:
            raise ConfigError(f"{name('min_p')} must be in [0, 1) (0 = off), got {self.min_p!r}")
        integer("max_new_tokens", self.max_new_tokens, 1, "")
        for token in self.stop_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ConfigError(f"{name('stop_ids')} must hold token ids >= 0, got {token!r}")
        for text in self.stop_strings:
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{name('stop_strings')} must hold non-empty strings, got "
                                  f"{text!r}")


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Tempered, filtered float32 logits ``[N, V]`` (removed tokens at -inf) for temperature > 0."""
    z = logits.float() / config.temperature
    if config.top_k and config.top_k < z.shape[-1]:
        kth = torch.topk(z, config.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Keep the smallest head whose mass reaches top_p: a token stays while the mass before
        # it is still below top_p (so the most likely token always stays).
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= config.top_p
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted),
                          float("-inf"))
    if config.min_p > 0.0:
        probs = torch.softmax(z, dim=-1)
        z = z.masked_fill(probs < config.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return z


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, config: SamplingConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits [N, V]`` from ``uniforms [N]`` in [0, 1).

    Inverse-CDF sampling with one uniform per row keeps a request's draws a function of its own
    seed alone. With top-k the draw is among exactly k tokens (a tie at the k-th value keeps
    the one ``torch.topk`` returns; ``filter_logits`` would keep both). Returns (tokens [N],
    log-prob under the untempered model [N], log-prob under the sampling distribution [N]),
    both log-probs float32.
    """
    logits = logits.float()
    # Only the drawn token's untempered log-prob is needed: its logit minus one log-sum-exp per
    # row, instead of a full [N, V] log-softmax copy at every step.
    log_norm = torch.logsumexp(logits, dim=-1)

    def model_logp(tokens: torch.Tensor) -> torch.Tensor:
        return logits.gather(-1, tokens[:, None])[:, 0] - log_norm

    if config.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, model_logp(tokens), torch.zeros_like(log_norm)
    if 0 < config.top_k < logits.shape[-1]:
        # Only the k best tokens can be drawn: filter and sample among them alone, which spares
        # a sort and a cumulative sum over the whole vocabulary at every step.
        values, candidates = torch.topk(logits / config.temperature, config.top_k, dim=-1)
        values = _filter_sorted(values, config)
    else:
        values, candidates = filter_logits(logits, config), None
    sample_logp = torch.log_softmax(values, dim=-1)
    cdf = sample_logp.double().exp().cumsum(-1)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    tokens = pick[:, 0] if candidates is None else candidates.gather(-1, pick)[:, 0]
    return tokens, model_logp(tokens), sample_logp.gather(-1, pick)[:, 0]


def _filter_sorted(values: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """top-p and min-p on tempered logits already sorted in descending order (the top-k)."""
    if config.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= config.top_p, float("-inf"))
    if config.min_p > 0.0:
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(probs < config.min_p * probs[:, :1], float("-inf"))
    return values
