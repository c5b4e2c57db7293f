"""The RBA policy loss: PPO-clipped surrogate plus reference KL, from hidden states.

A thin layer over rba_core.kernels.fused_linear_policy_loss (which never materialises the
[tokens x vocab] logits and implements k1, k2 and k3 itself) that adds what a training loop
needs around it: checked hyper-parameters, an entropy bonus, a global normaliser for
distributed training, and the usual metrics.
"""
from __future__ import annotations

import math

import torch

from rba_core.errors import ConfigError
from rba_core.kernels import fused_linear_policy_loss
from rba_core.kernels.backends import BACKENDS
from rba_core.kernels.policy_loss import LOSS_TYPES
from rba_core.kernels.policy_loss_reference import KL_ESTIMATORS


def _check_number(name: str, value: object, low: float, *, low_open: bool = False,
                  high: float | None = None, fix: str = "") -> float:
    """value in [low, high) (or (low, high) with low_open); the message names the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value >= high):
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and < {high}")
        raise ConfigError(f"{name} must be {bound}, got {value!r}{fix}")
    return float(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {choices}")


def _check_normalizer(normalizer: float | torch.Tensor | None) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        # Not checked for > 0: that would synchronise with the device every step.
        if normalizer.numel() != 1:
            raise ConfigError(f"normalizer must be a number or a one-element tensor, got "
                              f"shape {tuple(normalizer.shape)}")
        return
    _check_number("normalizer", normalizer, 0.0, low_open=True,
                  fix=" (the global count of tokens or sequences the loss is divided by)")


def _token_weights(valid: torch.Tensor, loss_type: str, denominator: torch.Tensor | float,
                   max_length: int) -> torch.Tensor:
    """Each token's share of the loss, the kernel's normalisation with `denominator` as the
    count (of tokens for dapo, of sequences otherwise)."""
    valid_f = valid.to(torch.float32)
    if loss_type == "dapo":
        return valid_f / denominator
    if loss_type == "grpo":
        return valid_f / (valid_f.sum(-1, keepdim=True).clamp(min=1.0) * denominator)
    return valid_f / (max_length * denominator)


def policy_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    beta: float,
    kl_estimator: str = "k3",
    eps_low: float,
    eps_high: float,
    loss_type: str = "grpo",
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    return_entropy: bool = False,
    normalizer: float | torch.Tensor | None = None,
    max_length: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with beta * KL(pi || pi_ref), on N rows of T tokens.

    hidden [N, T, D] (the decoder's last hidden states at the positions that predict tokens),
    lm_head_weight [V, D]; tokens, mask (True on response tokens), old_logprobs, ref_logprobs
    [N, T]; advantages [N, T] or per row [N]. Per token, with ratio = exp(logp - old):
        loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    with kl_estimator k1, k2 or k3 (rba_core.rl.kl); logp is taken at `temperature`, which must
    be the sampling temperature old_logprobs were computed at.

    loss_type: "grpo" means over each row's tokens, then over rows; "dapo" means over all
    active tokens; "dr_grpo" sums and divides by rows * max_length (default T; pass the
    generation limit so that batches padded to different T weigh alike).
    normalizer: when given, the loss is the local SUM divided by it instead of by the local
    count: the global active-token count for dapo, the global number of rows for grpo and
    dr_grpo (dr_grpo still divides by max_length). Then the losses of the ranks' shards add up
    to the loss of the whole batch. Under DDP, which averages gradients over W ranks, pass
    normalizer = global count / W (as TRL does).
    entropy_coef: subtracts entropy_coef * entropy, aggregated like the loss; return_entropy
    computes the entropy for the metrics alone.

    Returns (scalar loss, metrics) with metrics as detached 0-dim tensors over active tokens:
    clip_fraction_low (ratio below 1 - eps_low with A < 0), clip_fraction_high (above
    1 + eps_high with A > 0), clip_fraction (both), ratio_min / ratio_mean / ratio_max,
    active_tokens, ref_kl_mean (the chosen estimator; with ref_logprobs) and entropy_mean
    (when computed). Tensors, not floats, so that logging costs no device synchronisation and
    a distributed caller can reduce them.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("backend", backend, BACKENDS)
    eps_low = _check_number("eps_low", eps_low, 0.0, high=1.0,
                            fix=" (the ratio floor is 1 - eps_low; TRL's default is 0.2)")
    eps_high = _check_number("eps_high", eps_high, 0.0,
                             fix=" (the ratio ceiling is 1 + eps_high; DAPO uses 0.28)")
    beta = _check_number("beta", beta, 0.0, fix=" (0 switches the reference KL off)")
    entropy_coef = _check_number("entropy_coef", entropy_coef, 0.0)
    _check_number("temperature", temperature, 0.0, low_open=True)
    _check_normalizer(normalizer)
    if beta > 0 and ref_logprobs is None:
        raise ConfigError(f"beta={beta} needs ref_logprobs (the reference policy's log-probs); "
                          "pass them or set beta=0")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must be [N, T, D] (rows, tokens, width), got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    rows, length = hidden.shape[:2]
    if max_length is None:
        max_length = length
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ConfigError(f"max_length must be a positive int (the generation limit), got "
                          f"{max_length!r}")

    with_entropy = return_entropy or entropy_coef > 0
    loss, stats = fused_linear_policy_loss(
        hidden, lm_head_weight, tokens, advantages, old_logprobs, ref_logprobs, mask,
        beta=beta, kl_estimator=kl_estimator, clip_eps_low=eps_low, clip_eps_high=eps_high,
        loss_type=loss_type, max_length=max_length, temperature=temperature,
        return_entropy=with_entropy, backend=backend)

    valid = (torch.ones((rows, length), dtype=torch.bool, device=hidden.device)
             if mask is None else mask.bool())
    count = valid.sum()
    local = count.clamp(min=1) if loss_type == "dapo" else rows
    denominator = local
    if normalizer is not None:
        # The kernel divided by the local count; trade it for the caller's global one.
        denominator = normalizer
        loss = loss * (local / normalizer)
    if entropy_coef > 0:
        weights = _token_weights(valid, loss_type, denominator, max_length)
        loss = loss - entropy_coef * (weights * stats.entropy).sum()

    per_token_adv = (advantages[:, None].expand(rows, length) if advantages.dim() == 1
                     else advantages)
    ratio = stats.ratio
    share = 1.0 / count.clamp(min=1).to(ratio.dtype)
    any_token = count > 0
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    metrics = {
        "clip_fraction_low": (stats.clipped & (per_token_adv < 0)).sum() * share,
        "clip_fraction_high": (stats.clipped & (per_token_adv > 0)).sum() * share,
        "clip_fraction": stats.clipped.sum() * share,
        "ratio_min": torch.where(any_token, torch.where(valid, ratio, math.inf).amin(), one),
        "ratio_mean": torch.where(any_token, (ratio * valid).sum() * share, one),
        "ratio_max": torch.where(any_token, torch.where(valid, ratio, -math.inf).amax(), one),
        "active_tokens": count,
    }
    if stats.kl is not None:
        metrics["ref_kl_mean"] = stats.kl.sum() * share
    if with_entropy:
        metrics["entropy_mean"] = stats.entropy.detach().sum() * share
    return loss, {name: value.detach() for name, value in metrics.items()}
