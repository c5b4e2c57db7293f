"""Plain-PyTorch token scores: the CPU fallback and, run in float64, the test oracle.

Implements the backend contract (notes: KERNELS_CONTRACT.md) with z = (h @ W.T + b) * scale.
Rows are processed in chunks so the largest temporary is a [chunk_rows, V] tile, never [N, V].
The code is dtype-generic: it computes in float32 for half/bfloat16/float32 inputs and in
float64 when given float64 inputs, which is how the tests build their oracle.
"""
from __future__ import annotations

import torch

from ._checks import check_backend_inputs

#: Bytes of one [chunk_rows, V] float32 tile the fallback aims for (a few copies live at once).
CHUNK_BYTES = 64 * 2**20


def default_chunk_rows(num_rows: int, vocab_size: int) -> int:
    return max(1, min(num_rows, CHUNK_BYTES // (4 * vocab_size)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
            dtype: torch.dtype) -> torch.Tensor:
    z = h.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return z * scale


def token_scores_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         ids: torch.Tensor, scale: float, with_entropy: bool, *,
                         chunk_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp [N], lse [N], entropy [N] or None), float32 (float64 for float64 inputs)."""
    check_backend_inputs(hidden, weight, bias, ids)
    dtype = _compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    chunk = chunk_rows or default_chunk_rows(n, v)
    logp = torch.empty(n, dtype=dtype, device=hidden.device)
    lse = torch.empty(n, dtype=dtype, device=hidden.device)
    entropy = torch.empty(n, dtype=dtype, device=hidden.device) if with_entropy else None
    w = weight.to(dtype)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        z = _logits(hidden[rows], w, bias, scale, dtype)
        chunk_lse = torch.logsumexp(z, dim=1)
        lse[rows] = chunk_lse
        logp[rows] = z.gather(1, ids[rows, None]).squeeze(1) - chunk_lse
        if with_entropy:
            p = torch.exp(z - chunk_lse[:, None])
            entropy[rows] = chunk_lse - (p * z).sum(1)
    return logp, lse, entropy


def token_scores_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          ids: torch.Tensor, scale: float, lse: torch.Tensor,
                          entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                          grad_entropy: torch.Tensor | None, need_weight_grad: bool, *,
                          chunk_rows: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden [N, D] hidden.dtype, grad_weight [V, D] or None, grad_bias [V] or None).

    grad_weight (only when need_weight_grad) and grad_bias (whenever there is a bias; it is cheap)
    accumulate in the compute dtype across chunks and are returned in weight's dtype.
    """
    check_backend_inputs(hidden, weight, bias, ids)
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the entropy saved by the forward (with_entropy=True)")
    dtype = _compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    chunk = chunk_rows or default_chunk_rows(n, v)
    w = weight.to(dtype)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(v, weight.shape[1], dtype=dtype, device=hidden.device) \
        if need_weight_grad else None
    grad_bias = torch.zeros(v, dtype=dtype, device=hidden.device) if bias is not None else None
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        h = hidden[rows].to(dtype)
        z = _logits(h, w, bias, scale, dtype)
        chunk_lse = lse[rows].to(dtype)[:, None]
        p = torch.exp(z - chunk_lse)
        g = grad_logp[rows].to(dtype)[:, None]
        dz = -g * p
        dz.scatter_add_(1, ids[rows, None], g)
        if grad_entropy is not None:
            mean_z = chunk_lse - entropy[rows].to(dtype)[:, None]
            dz -= grad_entropy[rows].to(dtype)[:, None] * p * (z - mean_z)
        dz *= scale
        grad_hidden[rows] = (dz @ w).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight += dz.T @ h
        if grad_bias is not None:
            grad_bias += dz.sum(0)
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(weight.dtype),
    )
