"""Fused linear policy loss (GRPO / DAPO / Dr. GRPO family) straight from hidden states.

    from rba_core.kernels import fused_linear_policy_loss
    loss, stats = fused_linear_policy_loss(
        hidden, lm_head.weight, ids, advantages, old_logprobs, ref_logprobs, mask,
        beta=0.04, loss_type="grpo")
    loss.backward()          # grads of hidden (and of lm_head.weight when it requires grad)

The log-probs come from fused_linear_logprobs (no [N, V] logits, forward or backward); the
per-token clipped objective, KL and their derivative are one fused Triton elementwise kernel on
CUDA and plain PyTorch on the CPU.

On the native CPU backend, when a gradient is needed, the loss is a scalar, so its gradient is
computed in the forward itself, one chunk of rows at a time (_FusedPolicyLossFn): the C++ op
gives the chunk's log-probs and leaves its [rows, V] logits in a buffer, the PyTorch PPO/KL
terms below give d loss / d logp, and a second C++ op turns the logits into dz and runs the two
gradient GEMMs. That is eager PyTorch's GEMM count (the recompute backward needs one more); the
autograd backward only scales the stored gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import policy_loss_reference
from ._checks import (
    check_bias, check_choice, check_hidden_weight, check_ids, check_mask, check_non_negative,
    check_per_token, check_positive, check_tensor,
)
from .backends import resolve_backend
from .linear_logprobs import fused_linear_logprobs, token_scores_module, triton_serves

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass
class PolicyLossStats:
    """Per-token statistics with hidden's leading shape.

    logprobs (and entropy) stay attached to the autograd graph, so an entropy bonus can be added
    to the loss; ratio, kl and clipped are detached. Masked positions hold logprobs 0, ratio 1,
    kl 0, clipped False, entropy 0. kl is None without ref_logprobs; entropy is None unless
    return_entropy was set. clipped marks tokens whose objective is the clipped branch (zero
    policy gradient there).
    """
    logprobs: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None
    clipped: torch.Tensor
    entropy: torch.Tensor | None


class _PolicyTokenLossFn(torch.autograd.Function):
    """Sum of the weighted per-token losses; the kernel already produced d loss / d logp."""

    @staticmethod
    def forward(ctx, logp, old, ref, adv, weights, valid, options, terms_fn):
        # No old log-probs: the samples come from the current weights, old = logp (ratio 1).
        loss_t, grad_t, ratio, kl, clipped = terms_fn(logp, logp if old is None else old, ref,
                                                      adv, weights, valid, **options)
        ctx.save_for_backward(grad_t)
        ctx.logp_dtype = logp.dtype
        outputs = (ratio, clipped) if kl is None else (ratio, clipped, kl)
        ctx.mark_non_differentiable(*outputs)
        return loss_t.sum(), ratio, kl, clipped

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad_t,) = ctx.saved_tensors
        return (grad_loss * grad_t).to(ctx.logp_dtype), None, None, None, None, None, None, None


class _FusedPolicyLossFn(torch.autograd.Function):
    """Loss, log-probs and gradients in one pass over row chunks (native CPU backend).

    Outputs (loss, logp, entropy or None, ratio, kl or None, clipped) on compacted rows. The
    gradients of the loss are stored in the forward and handed over (scaled by grad_loss) on the
    first backward. Gradients through logp or entropy themselves (an entropy bonus), and any
    later backward through a retained graph, use the recompute backward from the saved lse.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, old, ref, adv, weights, scale, with_entropy,
                options, module):
        n, width = hidden.shape
        vocab = weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = hidden.new_empty((n, width), dtype=acc)
        grad_w = (hidden.new_zeros((vocab, width), dtype=acc)
                  if ctx.needs_input_grad[1] else None)
        grad_b = (hidden.new_zeros(vocab, dtype=acc)
                  if bias is not None and ctx.needs_input_grad[2] else None)
        logp = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n, dtype=acc) if with_entropy else None
        grad_t = hidden.new_empty(n, dtype=acc)
        ratio = hidden.new_empty(n, dtype=acc)
        kl = None if ref is None else hidden.new_empty(n, dtype=acc)
        clipped = hidden.new_empty(n, dtype=torch.bool)
        valid = torch.ones(n, dtype=torch.bool, device=hidden.device)
        loss = hidden.new_zeros((), dtype=acc)
        rows = min(module.chunk_rows(vocab), max(n, 1))
        # One logits buffer for all chunks: a fresh one per chunk costs page faults every time.
        tile = hidden.new_empty((rows, vocab), dtype=acc)
        for r0 in range(0, n, rows):
            part = slice(r0, min(n, r0 + rows))
            h, i, z = hidden[part], ids[part], tile[:part.stop - r0]
            lp, ls, ent = module.token_scores_chunk_forward(h, weight, bias, i, scale,
                                                            with_entropy, z)
            loss_t, g, r, k, c = policy_loss_reference.policy_token_terms(
                lp, lp if old is None else old[part], None if ref is None else ref[part],
                adv[part], weights[part],
                valid[part], **options)
            g = g.to(acc).contiguous()
            module.token_scores_chunk_backward(z, h, weight, bias, i, scale, ls, g,
                                               grad_h[part], grad_w, grad_b)
            loss += loss_t.sum()
            logp[part], lse[part], grad_t[part], ratio[part], clipped[part] = lp, ls, g, r, c
            if with_entropy:
                entropy[part] = ent
            if kl is not None:
                kl[part] = k
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy, grad_t)
        ctx.stored = (grad_h, grad_w, grad_b)
        ctx.scale, ctx.module = scale, module
        ctx.set_materialize_grads(False)
        outputs = (ratio, clipped) if kl is None else (ratio, clipped, kl)
        ctx.mark_non_differentiable(*outputs)
        return loss, logp, entropy, ratio, kl, clipped

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, *unused):
        hidden, weight, bias, ids, lse, entropy, grad_t = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        # Handing the stored tensors over (not copies) keeps peak memory at the gradients'
        # size; so they serve one backward only.
        stored, ctx.stored = ctx.stored, None
        grads = [None, None, None]
        if stored is not None and grad_loss is not None:
            grads = list(stored)
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                for g in grads:
                    if g is not None:
                        g.mul_(grad_loss)
        elif grad_loss is not None:
            term = grad_t * grad_loss
            grad_logp = term if grad_logp is None else grad_logp + term
        if grad_logp is not None or grad_entropy is not None:
            if grad_logp is None:
                grad_logp = torch.zeros_like(lse)
            extra = ctx.module.token_scores_backward(
                hidden, weight, bias, ids, ctx.scale, lse, entropy,
                grad_logp.to(lse.dtype).contiguous(),
                None if grad_entropy is None else grad_entropy.to(lse.dtype).contiguous(),
                need[1])
            grads = [e if g is None else (g if e is None else g.add_(e.to(g.dtype)))
                     for g, e in zip(grads, extra)]
        out = [None if g is None or not want else g.to(t.dtype)
               for g, want, t in zip(grads, need, (hidden, weight, bias))]
        return (*out, None, None, None, None, None, None, None, None, None)


def _fused_native_policy_loss(hidden, weight, bias, ids, advantages, old_logprobs, ref_logprobs,
                              mask, valid, weights, scale, return_entropy, options, module,
                              lead) -> tuple[torch.Tensor, PolicyLossStats]:
    """The native CPU training path: compacts the valid rows and runs _FusedPolicyLossFn."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    per_token = [None if t is None else t.reshape(-1)
                 for t in (ids, old_logprobs, ref_logprobs, advantages, weights)]
    rows = None
    if mask is not None:
        rows = valid.reshape(-1).nonzero().squeeze(1)
        flat_hidden = flat_hidden.index_select(0, rows)
        per_token = [None if t is None else t.index_select(0, rows) for t in per_token]
    flat_ids, old, ref, adv, w = per_token
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    old, ref = (None if t is None else t.to(acc).contiguous() for t in (old, ref))
    adv, w = (t.to(acc).contiguous() for t in (adv, w))
    loss, logp, entropy, ratio, kl, clipped = _FusedPolicyLossFn.apply(
        flat_hidden.contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), flat_ids.to(torch.int64).contiguous(),
        old, ref, adv, w, scale, return_entropy, options, module)

    def expand(values: torch.Tensor | None, fill) -> torch.Tensor | None:
        if values is None:
            return None
        if rows is not None:
            full = torch.full((valid.numel(),), fill, dtype=values.dtype, device=values.device)
            values = full.index_copy(0, rows, values)
        return values.reshape(lead)

    stats = PolicyLossStats(logprobs=expand(logp, 0), ratio=expand(ratio, 1), kl=expand(kl, 0),
                            clipped=expand(clipped, False), entropy=expand(entropy, 0))
    return loss, stats


def _token_weights(valid: torch.Tensor, loss_type: str, batched: bool,
                   sequence_ids: torch.Tensor | None, max_length: int | None) -> torch.Tensor:
    """Normalisation weight per token (zero where masked); the loss is sum(weight * loss_t)."""
    valid_f = valid.to(torch.float32)
    if loss_type == "dapo":
        return valid_f / valid_f.sum().clamp(min=1.0)
    if batched:
        num_seq = valid.shape[0]
        lengths = valid_f.sum(1, keepdim=True).expand_as(valid_f)
        length = valid.shape[1] if max_length is None else max_length
    else:
        if sequence_ids is None:
            raise ValueError(
                f"loss_type={loss_type!r} with flat [N, D] hidden needs sequence_ids= (one "
                "integer per token naming its sequence); or pass hidden as [B, T, D] with a mask"
            )
        _, inverse = torch.unique(sequence_ids, return_inverse=True)
        num_seq = int(inverse.max()) + 1 if inverse.numel() else 0
        lengths = torch.zeros(num_seq, device=valid.device).index_add_(0, inverse, valid_f)[inverse]
        if loss_type == "dr_grpo" and max_length is None:
            raise ValueError("loss_type='dr_grpo' with flat [N, D] hidden needs max_length= "
                             "(the fixed length each sequence's loss sum is divided by)")
        length = max_length
    if loss_type == "grpo":
        # Sequences with no valid token count in the mean with a loss of 0 (as in TRL).
        return valid_f / (lengths.clamp(min=1.0) * max(num_seq, 1))
    return valid_f / (max(num_seq, 1) * length)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio: bool = False,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_length: int | None = None,
    sequence_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped policy-gradient loss with optional KL to a reference, from hidden states.

    hidden [B, T, D] (or [N, D]), weight [V, D]; ids, old_logprobs, ref_logprobs and mask have
    hidden's leading shape; advantages are per token (leading shape) or, for [B, T, D] hidden,
    per sequence [B]. Per token: ratio = exp(logp - old), loss_t = -min(ratio * A,
    clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A) + beta * kl_t with kl_estimator
    k1 = logp - ref, k2 = (ref - logp)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1.
    kl_ratio multiplies each token's KL term by its ratio (differentiable): the unbiased
    reverse-KL gradient for samples from the old policy (DeepSeek-V3.2; TRL's
    use_bias_correction_kl); stats.kl stays kl_t.
    old_logprobs=None means the samples come from the current weights: old is logp itself,
    held constant (ratio 1, gradient -A per token; what TRL does when it skips the old policy's
    pass), which saves computing the log-probs twice.

    loss_type: "grpo" averages over each sequence's valid tokens, then over sequences (flat input
    needs sequence_ids); "dapo" divides the sum by the number of valid tokens; "dr_grpo" divides
    it by num_sequences * max_length (max_length defaults to T for [B, T, D]; flat input needs
    sequence_ids and max_length). Returns (scalar float32 loss, PolicyLossStats).
    """
    hidden, weight = check_hidden_weight(hidden, weight)
    lead = tuple(hidden.shape[:-1])
    batched = hidden.dim() == 3
    device = hidden.device
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("kl_estimator", kl_estimator, policy_loss_reference.KL_ESTIMATORS)
    chosen = resolve_backend(backend, device, triton_serves=triton_serves(hidden))
    beta = check_non_negative("beta", beta)
    for name, eps in (("clip_eps_low", clip_eps_low), ("clip_eps_high", clip_eps_high)):
        check_non_negative(name, eps)
    if clip_eps_low >= 1:
        raise ValueError(f"clip_eps_low must be < 1 (the ratio floor is 1 - clip_eps_low), "
                         f"got {clip_eps_low}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length <= 0):
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (the reference policy's log-probs); "
                         "pass them or set beta=0")
    if old_logprobs is not None:
        old_logprobs = check_per_token("old_logprobs", old_logprobs, lead, device)
    if ref_logprobs is not None:
        ref_logprobs = check_per_token("ref_logprobs", ref_logprobs, lead, device)
    advantages = check_tensor("advantages", advantages)
    if batched and tuple(advantages.shape) == lead[:1]:
        advantages = advantages[:, None].expand(lead)
    advantages = check_per_token("advantages", advantages, lead, device)
    if sequence_ids is not None:
        if batched:
            raise ValueError("sequence_ids is for flat [N, D] hidden; [B, T, D] rows are "
                             "already the sequences")
        sequence_ids = check_tensor("sequence_ids", sequence_ids)
        if tuple(sequence_ids.shape) != lead or sequence_ids.dtype.is_floating_point:
            raise ValueError(f"sequence_ids must be an integer tensor of shape {lead}, got "
                             f"{sequence_ids.dtype} {tuple(sequence_ids.shape)}")
    valid = check_mask(mask, lead, device)
    if valid is None:
        valid = torch.ones(lead, dtype=torch.bool, device=device)

    weights = _token_weights(valid, loss_type, batched, sequence_ids, max_length)
    options = {"beta": beta, "kl_estimator": kl_estimator, "kl_ratio": bool(kl_ratio),
               "clip_eps_low": float(clip_eps_low), "clip_eps_high": float(clip_eps_high)}
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad and chosen == "native":
        bias = check_bias(bias, weight)
        ids = check_ids(ids, lead, weight.shape[0], valid if mask is not None else None, device)
        scale = 1.0 / check_positive("temperature", temperature)
        return _fused_native_policy_loss(hidden, weight, bias, ids, advantages, old_logprobs,
                                         ref_logprobs, mask, valid, weights, scale,
                                         return_entropy, options, token_scores_module(chosen),
                                         lead)

    scores = fused_linear_logprobs(hidden, weight, ids, bias=bias, mask=mask,
                                   temperature=temperature, return_entropy=return_entropy,
                                   backend=chosen)
    logp = scores.logprobs if return_entropy else scores

    if chosen == "triton":
        from . import policy_loss_triton
        terms_fn = policy_loss_triton.policy_token_terms
    else:
        terms_fn = policy_loss_reference.policy_token_terms
    flat = [None if t is None else t.reshape(-1)
            for t in (logp, old_logprobs, ref_logprobs, advantages, weights, valid)]
    loss, ratio, kl, clipped = _PolicyTokenLossFn.apply(*flat, options, terms_fn)
    stats = PolicyLossStats(
        logprobs=logp,
        ratio=ratio.reshape(lead),
        kl=None if kl is None else kl.reshape(lead),
        clipped=clipped.reshape(lead),
        entropy=scores.entropy if return_entropy else None,
    )
    return loss, stats
