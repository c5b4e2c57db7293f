"""Per-token log-probs (and entropy, log-sum-exp) of an LM head without [N, V] logits.

    from rba_core.kernels import fused_linear_logprobs
    logp = fused_linear_logprobs(hidden, lm_head.weight, ids, mask=mask)        # [B, T] float32
    with torch.no_grad():                                                        # scoring mode
        ref = fused_linear_logprobs(ref_hidden, ref_head.weight, ids, mask=mask)

Backends (per call, by device): CUDA -> Triton; CPU -> the native C++ op when built
(rba_core.kernels.native), else the chunked PyTorch code in linear_logprobs_reference.
"""
from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

from ._checks import check_bias, check_hidden_weight, check_ids, check_mask, check_positive
from .backends import backend_module, resolve_backend


class TokenScores(NamedTuple):
    """What fused_linear_logprobs returns when entropy or lse is asked for."""
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None


def token_scores_module(name: str) -> ModuleType:
    """The module whose token_scores_* functions implement resolved backend ``name``."""
    return backend_module(name, triton="rba_core.kernels.linear_logprobs_triton",
                          torch_fallback="rba_core.kernels.linear_logprobs_reference")


def triton_serves(hidden: torch.Tensor) -> bool:
    """The Triton token-score kernels take 16- and 32-bit floats; float64 goes to PyTorch."""
    return hidden.dtype != torch.float64


class _TokenScoresFn(torch.autograd.Function):
    """Differentiable wrapper over a backend's token_scores_forward/backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, scale, with_entropy, module):
        # The native op keeps part of the logits for the backward, which then recomputes less.
        ctx.kept = None
        if hasattr(module, "token_scores_forward_keep"):
            logp, lse, entropy, ctx.kept = module.token_scores_forward_keep(
                hidden, weight, bias, ids, scale, with_entropy)
        else:
            logp, lse, entropy = module.token_scores_forward(hidden, weight, bias, ids, scale,
                                                             with_entropy)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy)
        ctx.scale = scale
        ctx.module = module
        ctx.mark_non_differentiable(lse)
        # Unused outputs arrive as None, so an unused entropy costs nothing in backward.
        ctx.set_materialize_grads(False)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        args = (hidden, weight, bias, ids, ctx.scale, lse, entropy, grad_logp.contiguous(),
                None if grad_entropy is None else grad_entropy.contiguous(),
                ctx.needs_input_grad[1])
        if ctx.kept is not None:
            # The backward overwrites the kept logits: a second one (retain_graph) recomputes.
            kept, ctx.kept = ctx.kept, None
            grad_hidden, grad_weight, grad_bias = ctx.module.token_scores_backward_kept(
                *args, kept)
        else:
            grad_hidden, grad_weight, grad_bias = ctx.module.token_scores_backward(*args)
        return (
            grad_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
            grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None,
            grad_bias.to(bias.dtype) if ctx.needs_input_grad[2] else None,
            None, None, None, None,
        )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | TokenScores:
    """log softmax((hidden @ weight.T + bias) * logit_scale / temperature)[ids], per token.

    hidden: [N, D] or [B, T, D]; weight: [V, D] (the nn.Linear layout), same dtype as hidden
    (float16, bfloat16, float32; float64 on the torch backend); ids and mask have hidden's
    leading shape. Masked-out positions (mask False/0) are not computed and return 0; their ids
    may be anything (e.g. -100). Outputs are float32 (float64 for float64 inputs) with hidden's
    leading shape.

    Differentiable with respect to hidden, weight and bias (log-probs and entropy; lse is
    returned detached). Under torch.no_grad, or when nothing requires grad, nothing is saved.
    Returns the log-probs alone, or TokenScores(logprobs, entropy, lse) when return_entropy or
    return_lse is set (the fields not asked for are None).
    """
    hidden, weight = check_hidden_weight(hidden, weight)
    bias = check_bias(bias, weight)
    lead = tuple(hidden.shape[:-1])
    mask = check_mask(mask, lead, hidden.device)
    ids = check_ids(ids, lead, weight.shape[0], mask, hidden.device)
    scale = check_positive("logit_scale", logit_scale) / check_positive("temperature", temperature)
    module = token_scores_module(resolve_backend(backend, hidden.device,
                                                 triton_serves=triton_serves(hidden)))

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1)
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).nonzero().squeeze(1)
        flat_hidden = flat_hidden.index_select(0, rows)
        flat_ids = flat_ids.index_select(0, rows)
    flat_hidden = flat_hidden.contiguous()
    flat_ids = flat_ids.to(torch.int64).contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (flat_hidden, weight, bias)
    )
    if needs_grad:
        logp, lse, entropy = _TokenScoresFn.apply(flat_hidden, weight, bias, flat_ids, scale,
                                                  return_entropy, module)
    else:
        logp, lse, entropy = module.token_scores_forward(flat_hidden, weight, bias, flat_ids,
                                                         scale, return_entropy)

    def expand(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        if rows is not None:
            values = values.new_zeros(mask.numel()).index_copy(0, rows, values)
        return values.reshape(lead)

    if not (return_entropy or return_lse):
        return expand(logp)
    return TokenScores(expand(logp), expand(entropy), expand(lse) if return_lse else None)
