"""One fused Triton elementwise kernel for the per-token PPO/GRPO objective, KL and d/d logp.

Same math as policy_loss_reference.policy_token_terms; one pass over the tokens writes the
weighted loss, its derivative with respect to logp (which the backward then only scales), the
ratio, the KL and the clipped flag.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .policy_loss_reference import KL_ESTIMATORS


@triton.jit
def policy_token_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, weight_ptr, valid_ptr,
    loss_ptr, grad_ptr, ratio_ptr, kl_ptr, clipped_ptr,
    M, beta, eps_low, eps_high,
    HAS_REF: tl.constexpr, KL_KIND: tl.constexpr, KL_RATIO: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    valid = tl.load(valid_ptr + offs, mask=ok, other=0) != 0
    ratio = tl.exp(logp - old)
    unclipped = ratio * adv
    clipped_obj = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
    clipped = clipped_obj < unclipped
    loss = -tl.minimum(unclipped, clipped_obj)
    grad = tl.where(clipped, 0.0, -adv * ratio)
    if HAS_REF:
        d = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32) - logp
        if KL_KIND == 0:
            kl = -d
            dkl = tl.full(d.shape, 1.0, tl.float32)
        elif KL_KIND == 1:
            kl = 0.5 * d * d
            dkl = -d
        else:
            ed = tl.exp(d)
            kl = ed - d - 1.0
            dkl = 1.0 - ed
        if KL_RATIO:
            loss = loss + beta * kl * ratio
            grad = grad + beta * ratio * (dkl + kl)
        else:
            loss = loss + beta * kl
            grad = grad + beta * dkl
        tl.store(kl_ptr + offs, tl.where(valid, kl, 0.0), mask=ok)
    tl.store(loss_ptr + offs, tl.where(valid, w * loss, 0.0), mask=ok)
    tl.store(grad_ptr + offs, tl.where(valid, w * grad, 0.0), mask=ok)
    tl.store(ratio_ptr + offs, tl.where(valid, ratio, 1.0), mask=ok)
    tl.store(clipped_ptr + offs, (clipped & valid).to(tl.uint8), mask=ok)


BLOCK = 1024


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
    out: tuple[torch.Tensor, ...] | None = None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Triton twin of policy_loss_reference.policy_token_terms (float32 results).

    `out` = (loss, grad, ratio, kl, clipped_uint8) supplies the output buffers ([M] float32,
    clipped uint8; kl is ignored without ref_logprobs).
    """
    m = logp.numel()
    inputs = [t.reshape(-1).contiguous() for t in (logp, old_logprobs, advantages, weights)]
    ref = None if ref_logprobs is None else ref_logprobs.reshape(-1).contiguous()
    valid_u8 = valid.reshape(-1).to(torch.uint8).contiguous()
    if out is None:
        loss, grad, ratio, kl = (torch.empty(m, dtype=torch.float32, device=logp.device)
                                 for _ in range(4))
        clipped = torch.empty(m, dtype=torch.uint8, device=logp.device)
    else:
        loss, grad, ratio, kl, clipped = out
    if m:
        policy_token_kernel[(triton.cdiv(m, block),)](
            *inputs[:2], inputs[0] if ref is None else ref, *inputs[2:], valid_u8,
            loss, grad, ratio, kl, clipped,
            m, float(beta), float(clip_eps_low), float(clip_eps_high),
            HAS_REF=ref is not None, KL_KIND=KL_ESTIMATORS.index(kl_estimator),
            KL_RATIO=bool(kl_ratio), BLOCK=block,
        )
    return loss, grad, ratio, None if ref is None else kl, clipped.view(torch.bool)


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """Kernel variants that compile_check builds for real GPU targets."""
    signature = {
        **{name: "*fp32" for name in ("logp_ptr", "old_ptr", "ref_ptr", "adv_ptr", "weight_ptr",
                                      "loss_ptr", "grad_ptr", "ratio_ptr", "kl_ptr")},
        "valid_ptr": "*u8", "clipped_ptr": "*u8",
        "M": "i32", "beta": "fp32", "eps_low": "fp32", "eps_high": "fp32",
        "HAS_REF": "constexpr", "KL_KIND": "constexpr", "KL_RATIO": "constexpr",
        "BLOCK": "constexpr",
    }
    # k3 carries the most code (k1/k2 are subsets of its arithmetic); no-ref drops the KL.
    return [
        (policy_token_kernel, signature,
         {"HAS_REF": has_ref, "KL_KIND": 2, "KL_RATIO": kl_ratio, "BLOCK": BLOCK})
        for has_ref, kl_ratio in ((False, False), (True, False), (True, True))
    ]
