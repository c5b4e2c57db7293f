"""Plain-PyTorch distillation loss between a student and a teacher LM head.

Two roles share this code. Run in float64 it is the oracle the Triton and native backends are
tested against (the tests differentiate `distill_forward` by autograd, so the oracle for the
backward does not depend on the hand-written derivative in `distill_backward`). Run in the
inputs' dtype with float32 accumulation it is the CPU fallback when the native op is not built.
It works over row chunks, so the largest temporary is a few [chunk, V] tiles, never [N, V].

Definitions (zs = s_hidden @ s_weight.T / temperature, zt likewise, P_S/P_T their softmaxes):
    forward_kl = KL(P_T || P_S)
    reverse_kl = KL(P_S || P_T)
    jsd        = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M),  M = beta P_T + (1 - beta) P_S
"""
from __future__ import annotations

import math

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")

# Elements per [chunk, V] temporary: 2**23 float32 values are 32 MiB, large enough for an
# efficient matmul and small next to the [N, V] logits this path exists to avoid.
_CHUNK_ELEMENTS = 2**23


def _chunk_rows(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, min(max(n_rows, 1), _CHUNK_ELEMENTS // max(vocab, 1)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (the oracle); every narrower type accumulates in float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _log_mixture(lps: torch.Tensor, lpt: torch.Tensor, jsd_beta: float) -> torch.Tensor:
    """log M for M = beta P_T + (1 - beta) P_S, computed from the log-probabilities."""
    return torch.logaddexp(lpt + math.log(jsd_beta), lps + math.log1p(-jsd_beta))


def _rows_from_logits(zs: torch.Tensor, zt: torch.Tensor, kind: str, jsd_beta: float):
    lps = torch.log_softmax(zs, dim=-1)
    lpt = torch.log_softmax(zt, dim=-1)
    if kind == "forward_kl":
        loss = (lpt.exp() * (lpt - lps)).sum(-1)
    elif kind == "reverse_kl":
        loss = (lps.exp() * (lps - lpt)).sum(-1)
    else:
        lm = _log_mixture(lps, lpt, jsd_beta)
        loss = (jsd_beta * (lpt.exp() * (lpt - lm)).sum(-1)
                + (1.0 - jsd_beta) * (lps.exp() * (lps - lm)).sum(-1))
    # A divergence is >= 0; float rounding of cancelling terms can leave a tiny negative.
    return loss.clamp_min(0.0), torch.logsumexp(zs, dim=-1), torch.logsumexp(zt, dim=-1)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, inv_t: float, cdtype: torch.dtype):
    return (hidden.to(cdtype) @ weight.to(cdtype).T) * inv_t


def distill_forward(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor,
                    t_weight: torch.Tensor, temperature: float, kind: str, jsd_beta: float,
                    chunk_rows: int | None = None):
    """Per-row divergence and both log-sum-exps; float32 outputs (float64 for float64 inputs).

    Differentiable by autograd (the tests use that in float64 as the backward's oracle).
    """
    cdtype = _compute_dtype(s_hidden)
    inv_t = 1.0 / float(temperature)
    n, vocab = s_hidden.shape[0], s_weight.shape[0]
    step = _chunk_rows(n, vocab, chunk_rows)
    sw, tw = s_weight.to(cdtype), t_weight.to(cdtype)
    losses, s_lses, t_lses = [], [], []
    for start in range(0, n, step):
        zs = _logits(s_hidden[start:start + step], sw, inv_t, cdtype)
        zt = _logits(t_hidden[start:start + step], tw, inv_t, cdtype)
        loss, s_lse, t_lse = _rows_from_logits(zs, zt, kind, jsd_beta)
        losses.append(loss)
        s_lses.append(s_lse)
        t_lses.append(t_lse)
    if not losses:
        empty = s_hidden.new_zeros((0,), dtype=cdtype)
        return empty, empty.clone(), empty.clone()
    return torch.cat(losses), torch.cat(s_lses), torch.cat(t_lses)


def student_logit_grad(zs: torch.Tensor, zt: torch.Tensor, s_lse: torch.Tensor,
                       t_lse: torch.Tensor, kind: str, jsd_beta: float) -> torch.Tensor:
    """d loss_row / d zs for a [rows, V] tile of temperature-scaled logits.

    forward KL: P_S - P_T. reverse KL: P_S (log P_S - log P_T - KL(P_S||P_T)).
    JSD: (1 - beta) P_S (log P_S - log M - KL(P_S||M)), since d JSD / d P_S = (1-beta) log(P_S/M).
    """
    lps = zs - s_lse[:, None]
    ps = lps.exp()
    if kind == "forward_kl":
        return ps - (zt - t_lse[:, None]).exp()
    lpt = zt - t_lse[:, None]
    if kind == "reverse_kl":
        g = lps - lpt
        return ps * (g - (ps * g).sum(-1, keepdim=True))
    g = lps - _log_mixture(lps, lpt, jsd_beta)
    return (1.0 - jsd_beta) * ps * (g - (ps * g).sum(-1, keepdim=True))


def distill_backward(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor,
                     t_weight: torch.Tensor, temperature: float, kind: str, jsd_beta: float,
                     s_lse: torch.Tensor, t_lse: torch.Tensor, grad_rows: torch.Tensor,
                     need_weight_grad: bool, chunk_rows: int | None = None):
    """Gradients of sum(grad_rows * loss_rows) to the student's hidden and weight."""
    cdtype = _compute_dtype(s_hidden)
    inv_t = 1.0 / float(temperature)
    n, vocab = s_hidden.shape[0], s_weight.shape[0]
    step = _chunk_rows(n, vocab, chunk_rows)
    sw, tw = s_weight.to(cdtype), t_weight.to(cdtype)
    grad_h = torch.empty(s_hidden.shape, dtype=s_hidden.dtype, device=s_hidden.device)
    grad_w = (torch.zeros(s_weight.shape, dtype=cdtype, device=s_weight.device)
              if need_weight_grad else None)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        hs = s_hidden[rows].to(cdtype)
        zs = (hs @ sw.T) * inv_t
        zt = _logits(t_hidden[rows], tw, inv_t, cdtype)
        dz = student_logit_grad(zs, zt, s_lse[rows].to(cdtype), t_lse[rows].to(cdtype),
                                kind, jsd_beta)
        # The 1/temperature is the derivative of zs with respect to the raw logits h @ W.T.
        dz.mul_(grad_rows[rows].to(cdtype)[:, None] * inv_t)
        grad_h[rows] = (dz @ sw).to(s_hidden.dtype)
        if grad_w is not None:
            grad_w.addmm_(dz.T, hs)
    return grad_h, (grad_w.to(s_weight.dtype) if grad_w is not None else None)
