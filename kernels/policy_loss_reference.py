"""Per-token PPO/GRPO clipped objective and KL penalty in plain PyTorch.

The CPU path of fused_linear_policy_loss and the float64 oracle of policy_loss_triton. Per token
(logp the current log-prob, old/ref the behaviour and reference log-probs, A the advantage):

    ratio  = exp(logp - old)
    loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    d = ref - logp;  k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1

With kl_ratio the KL term is beta * kl_t * ratio, the ratio differentiable: the unbiased
reverse-KL gradient for samples from the old policy (DeepSeek-V3.2; TRL's
use_bias_correction_kl).

`weights` carries the loss normalisation (zero on masked tokens), so the caller's loss is
sum(weights * loss_t) and its gradient with respect to logp is weights * d loss_t / d logp.
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def policy_token_terms(
    logp: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    *,
    beta: float,
    kl_estimator: str,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_ratio: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(weighted loss_t, weighted d loss_t / d logp, ratio, kl or None, clipped), all 1-D.

    Inputs are 1-D of one length; valid is bool. Masked tokens give loss 0, gradient 0, ratio 1,
    kl 0 and clipped False. Computes in float32, or float64 when logp is float64.
    """
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp = logp.to(dtype)
    adv = advantages.to(dtype)
    ratio = torch.exp(logp - old_logprobs.to(dtype))
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
    # The clipped branch is the minimum only when the ratio left the trust region in the
    # direction the advantage rewards; there the objective is flat in logp.
    clipped = clipped_obj < unclipped
    loss = -torch.minimum(unclipped, clipped_obj)
    grad = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio)
    kl = None
    if ref_logprobs is not None:
        d = ref_logprobs.to(dtype) - logp
        if kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, -d
        else:
            ed = torch.exp(d)
            kl, dkl = ed - d - 1.0, 1.0 - ed
        if kl_ratio:
            loss = loss + beta * kl * ratio
            grad = grad + beta * ratio * (dkl + kl)
        else:
            loss = loss + beta * kl
            grad = grad + beta * dkl
        kl = torch.where(valid, kl, torch.zeros_like(kl))
    w = weights.to(dtype)
    zero = torch.zeros_like(loss)
    return (
        torch.where(valid, w * loss, zero),
        torch.where(valid, w * grad, zero),
        torch.where(valid, ratio, torch.ones_like(ratio)),
        kl,
        clipped & valid,
    )
