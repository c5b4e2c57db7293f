"""Advantages from rewards: group-relative for sequence rewards, reward-to-go for token ones.

    seq_adv = group_advantages(rewards.sequence, kind="grpo")            # [B, G]
    tok_adv = token_advantages(rewards.token, mask, gamma=0.0)           # [B, G, T]
    advantages = combine_advantages(seq_adv, tok_adv, mask)              # [B, G, T]

Token advantages and the group baseline
---------------------------------------
token_advantages' baseline="group" subtracts one number per group: the mean over the group's
samples of each sample's mean reward-to-go (over its real tokens). A per-position baseline
(the group's mean at token index t) was rejected: after the first differing token, position t
of two samples lies in unrelated contexts, and the samples still running at t are the long
ones, so late positions would get a noisy baseline from few samples that also depends on the
lengths. A scalar per group leaves the credit assignment within each sequence untouched and is
the direct analogue of GRPO's mean_G. Like GRPO, the mean includes the sample itself. The
default is no baseline: on-policy distillation (RBA.md) uses the dense reward as is.
"""
from __future__ import annotations

import math

import torch

from rba_core.errors import ConfigError

ADVANTAGE_KINDS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")
TOKEN_BASELINES = ("none", "group")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {choices}")


def _check_finite(name: str, values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        bad = (~torch.isfinite(values)).nonzero()[0].tolist()
        raise ValueError(f"{name} holds a non-finite value at index {bad}; check the reward "
                         "that produced it")


def _check_group(name: str, group: int) -> None:
    if group < 2:
        raise ConfigError(f"{name} needs G >= 2 samples per prompt for a group baseline, got "
                          f"G={group}; raise the number of generations or drop the baseline")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", scale: str | None = None,
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages [B, G] of sequence rewards [B, G] (G samples per prompt).

    kind "grpo": r - mean_G(r); "rloo": r_i - mean_{j != i} r_j (leave-one-out).
    scale: divide by (std + eps) with the unbiased std (torch.std's default, as TRL) of each
    group ("group") or of all B * G rewards ("batch"; a distributed caller passes the gathered
    rewards), or not at all ("none"). None picks each estimator's published form: "group" for
    grpo, "none" for rloo. A group whose rewards are all equal gets exactly 0 (no NaN, even
    with eps=0): it carries no signal about which sample is better.
    """
    _check_choice("kind", kind, ADVANTAGE_KINDS)
    if scale is None:
        scale = "group" if kind == "grpo" else "none"
    _check_choice("scale", scale, SCALES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError("rewards must be a [B, G] tensor (prompts, samples), got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")
    _check_group("group_advantages", rewards.shape[1])
    _check_finite("rewards", rewards)
    r = rewards if rewards.dtype.is_floating_point else rewards.float()
    group = r.shape[1]
    centered = r - r.mean(dim=1, keepdim=True)
    if kind == "rloo":
        # r_i - (sum - r_i) / (G - 1) = G / (G - 1) * (r_i - mean)
        centered = centered * (group / (group - 1))
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    # The mean of equal floats can differ from them in the last bit; force the exact zero.
    equal = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(centered), centered)


def _reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted reward-to-go of masked-to-zero rewards; 0 at masked positions."""
    if gamma == 0.0:
        return rewards
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    if gamma == 1.0:
        return torch.where(mask, rewards.flip(-1).cumsum(-1).flip(-1), zero)
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        # Masked positions (padding, or tokens the policy did not produce) are not steps: the
        # discount counts the policy's own tokens only.
        running = torch.where(mask[..., t], rewards[..., t] + gamma * running, running)
        out[..., t] = torch.where(mask[..., t], running, zero)
    return out


def token_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 0.0,
                     baseline: str = "none") -> torch.Tensor:
    """Per-token reward-to-go [B, G, T]: A_t = sum_{s >= t} gamma^(#real tokens in (t, s])
    r_s over real tokens (gamma=0: the token's own reward), 0 at padding.

    baseline "group" subtracts the group's mean of the per-sample mean reward-to-go (see the
    module docstring for why one scalar per group); samples without real tokens are left out
    of that mean.
    """
    _check_choice("baseline", baseline, TOKEN_BASELINES)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ConfigError(f"gamma must be a discount in [0, 1], got {gamma!r}")
    if not isinstance(token_rewards, torch.Tensor) or token_rewards.dim() != 3:
        raise ValueError("token_rewards must be a [B, G, T] tensor, got "
                         f"{getattr(token_rewards, 'shape', type(token_rewards).__name__)}")
    if tuple(mask.shape) != tuple(token_rewards.shape):
        raise ValueError(f"mask {tuple(mask.shape)} must match token_rewards "
                         f"{tuple(token_rewards.shape)}")
    if baseline == "group":
        _check_group("token_advantages(baseline='group')", token_rewards.shape[1])
    mask = mask.bool()
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(mask, token_rewards, zero)
    _check_finite("token_rewards", rewards)
    adv = _reward_to_go(rewards, mask, float(gamma))
    if baseline == "group":
        lengths = mask.sum(-1)
        per_sample = adv.sum(-1) / lengths.clamp(min=1)
        has_tokens = lengths > 0
        count = has_tokens.sum(-1, keepdim=True).clamp(min=1)
        group_mean = torch.where(has_tokens, per_sample, zero).sum(-1, keepdim=True) / count
        adv = adv - group_mean[..., None]
    return torch.where(mask, adv, zero)


def combine_advantages(sequence_advantages: torch.Tensor | None,
                       token_advantages: torch.Tensor | None, mask: torch.Tensor
                       ) -> torch.Tensor:
    """Per-token advantages [B, G, T]: the sequence advantage [B, G] on every real token plus
    the token advantage [B, G, T]; 0 at padding. Either may be None, not both."""
    if sequence_advantages is None and token_advantages is None:
        raise ConfigError("combine_advantages needs sequence or token advantages; switch on at "
                          "least one reward")
    mask = mask.bool()
    if sequence_advantages is not None and tuple(sequence_advantages.shape) != tuple(
            mask.shape[:-1]):
        raise ValueError(f"sequence_advantages must be {tuple(mask.shape[:-1])}, got "
                         f"{tuple(sequence_advantages.shape)}")
    if token_advantages is not None and tuple(token_advantages.shape) != tuple(mask.shape):
        raise ValueError(f"token_advantages must be {tuple(mask.shape)}, got "
                         f"{tuple(token_advantages.shape)}")
    if sequence_advantages is None:
        total = token_advantages
    elif token_advantages is None:
        total = sequence_advantages[..., None].expand(mask.shape)
    else:
        total = sequence_advantages[..., None] + token_advantages
    return torch.where(mask, total, torch.zeros((), dtype=total.dtype, device=total.device))
