"""Triton kernels for the fused linear token scores (log-prob, entropy, log-sum-exp).

Forward: one program per block of rows walks the vocabulary in blocks; each logits tile
z = (h @ W.T + b) * scale comes from tl.dot over blocks of D and feeds an online log-sum-exp, the
target-logit gather and an online entropy accumulator. Nothing of size [N, V] is ever stored.

Backward: the gradient of the logits, dz (see the contract), is recomputed tile by tile from the
saved lse by a Triton kernel for one chunk of rows at a time into a [chunk_rows, V] buffer; two
cuBLAS GEMMs then give grad_hidden[chunk] = dz @ W and grad_weight += dz.T @ h[chunk].
Why not accumulate both gradients inside Triton: D is large (576 to 8192), so a program cannot
hold its [rows, D] or [V_block, D] gradient in registers; it would have to read-modify-write it in
global memory once per tile of the other dimension, which for N=8192, V=128k, D=4096 is hundreds of
GB of traffic against ~12 ms of GEMM work. The chunked design recomputes the logits once (the
minimum), runs the two gradient products on tensor cores without atomics (deterministic), and
bounds the extra memory by the chunk buffer (CHUNK_BYTES, about 256 MiB), not by N.

Under TRITON_INTERPRET=1 a bf16 tl.dot returns garbage (Triton issue 11584), so the launchers
read the variable at launch time and pass FP32_DOT to cast the operands to float32 there only.
Plain pointer arithmetic throughout (tl.make_block_ptr is gone in Triton 3.9).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import check_backend_inputs

#: Target size of the backward's dz buffer for one chunk of rows.
CHUNK_BYTES = 256 * 2**20


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w, scale,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_N, BLOCK_V] float32 tile of (h @ W.T + b) * scale; padded rows/columns hold junk."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        h = tl.load(h_ptr + rows64[:, None] * stride_h + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[None, :] * stride_w + dd[:, None],
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * scale


@triton.jit
def token_scores_fwd_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, logp_ptr, lse_ptr, ent_ptr,
    N, D, V, stride_h, stride_w, scale,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    # A finite start keeps the first rescale free of inf - inf and 0 * inf.
    m = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    # t = sum_v exp(z_v - m) * (z_v - m): entropy = log(s) - t / s, kept relative to the running
    # max so that large logits do not cancel.
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w,
                         scale, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT, DOT_PRECISION)
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        if WITH_ENTROPY:
            shifted = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
            t = alpha * (t + s * (m - m_new)) + tl.sum(e * shifted, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(logp_ptr + rows, z_target - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, log_s - t / s, mask=row_ok)


@triton.jit
def token_scores_dz_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr,
    N, D, V, stride_h, stride_w, stride_dz, scale,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of dz = d loss / d (h @ W.T + b)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w,
                     scale, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT, DOT_PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_GRAD_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= ge[:, None] * p * (z - (lse - ent)[:, None])
    dz = dz * scale
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (torch's matmul default), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def gpu_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D) on a GPU: tensor-core tiles for 16-bit inputs, smaller tiles
    for float32, whose exact ("ieee") products run on the FMA units."""
    return (32, 64, 32) if dtype == torch.float32 else (64, 128, 64)


def _blocks(dtype: torch.dtype, block_n: int | None, block_v: int | None,
            block_d: int | None) -> tuple[int, int, int]:
    defaults = (16, 64, 32) if interpreting() else gpu_blocks(dtype)
    return block_n or defaults[0], block_v or defaults[1], block_d or defaults[2]


def _check_triton_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"the Triton backend takes float16, bfloat16 or float32 hidden/weight, got "
            f"{hidden.dtype}; use backend='torch' for float64"
        )


def token_scores_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         ids: torch.Tensor, scale: float, with_entropy: bool, *,
                         out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                         block_n: int | None = None, block_v: int | None = None,
                         block_d: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp [N], lse [N], entropy [N] or None) in float32. `out` supplies the buffers."""
    check_backend_inputs(hidden, weight, bias, ids)
    _check_triton_dtype(hidden)
    n, d = hidden.shape
    v = weight.shape[0]
    if out is None:
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else None
    else:
        logp, lse, entropy = out
        if with_entropy and entropy is None:
            raise ValueError("out must hold an entropy buffer when with_entropy=True")
    bn, bv, bd = _blocks(hidden.dtype, block_n, block_v, block_d)
    if n:
        token_scores_fwd_kernel[(triton.cdiv(n, bn),)](
            hidden, weight, weight if bias is None else bias, ids, logp, lse,
            entropy if with_entropy else lse,
            n, d, v, hidden.stride(0), weight.stride(0), float(scale),
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
            FP32_DOT=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
        )
    return logp, lse, entropy


def launch_dz(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              ids: torch.Tensor, scale: float, lse: torch.Tensor, entropy: torch.Tensor | None,
              grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, dz: torch.Tensor, *,
              block_n: int | None = None, block_v: int | None = None,
              block_d: int | None = None) -> torch.Tensor:
    """Fill dz [N, V] (any float dtype, unit column stride) for the rows of `hidden`."""
    n, d = hidden.shape
    v = weight.shape[0]
    if dz.shape != (n, v) or dz.stride(1) != 1:
        raise ValueError(f"dz must be a row-major [N, V] = ({n}, {v}) buffer, got "
                         f"{tuple(dz.shape)} with strides {dz.stride()}")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the entropy saved by the forward (with_entropy=True)")
    bn, bv, bd = _blocks(hidden.dtype, block_n, block_v, block_d)
    if n:
        token_scores_dz_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
            hidden, weight, weight if bias is None else bias, ids, lse,
            lse if entropy is None else entropy, grad_logp,
            grad_logp if grad_entropy is None else grad_entropy, dz,
            n, d, v, hidden.stride(0), weight.stride(0), dz.stride(0), float(scale),
            HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
            FP32_DOT=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
        )
    return dz


def token_scores_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          ids: torch.Tensor, scale: float, lse: torch.Tensor,
                          entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                          grad_entropy: torch.Tensor | None, need_weight_grad: bool, *,
                          chunk_rows: int | None = None, dz_out: torch.Tensor | None = None,
                          block_n: int | None = None, block_v: int | None = None,
                          block_d: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden [N, D], grad_weight [V, D] or None, grad_bias [V] or None).

    grad_hidden and grad_weight come back in the input dtype (grad_weight accumulates over row
    chunks in that dtype through addmm, whose products accumulate in float32); grad_bias
    accumulates in float32. `dz_out` ([chunk_rows, V], input dtype) lets a caller supply, and
    inspect, the chunk buffer.
    """
    check_backend_inputs(hidden, weight, bias, ids)
    _check_triton_dtype(hidden)
    n, d = hidden.shape
    v = weight.shape[0]
    grad_logp = grad_logp.to(torch.float32).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
    if dz_out is not None:
        chunk = dz_out.shape[0]
    else:
        chunk = max(1, min(n, chunk_rows or CHUNK_BYTES // (hidden.element_size() * v)))
    dz = dz_out if dz_out is not None else torch.empty(chunk, v, dtype=hidden.dtype,
                                                        device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight) if need_weight_grad else None
    grad_bias = torch.zeros(v, dtype=torch.float32, device=hidden.device) \
        if bias is not None else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = slice(start, stop)
        tile = launch_dz(hidden[rows], weight, bias, ids[rows], scale, lse[rows],
                         None if entropy is None else entropy[rows], grad_logp[rows],
                         None if grad_entropy is None else grad_entropy[rows], dz[: stop - start],
                         block_n=block_n, block_v=block_v, block_d=block_d)
        torch.mm(tile, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(tile.T, hidden[rows])
        if grad_bias is not None:
            grad_bias += tile.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(weight.dtype)


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """Kernel variants that compile_check builds for real GPU targets: the 16-bit tensor-core
    path with every optional feature on, and the float32 path with them off."""
    specs = []
    for dtype, ptr, flag in ((torch.bfloat16, "*bf16", True), (torch.float32, "*fp32", False)):
        bn, bv, bd = gpu_blocks(dtype)
        common = {"FP32_DOT": False, "DOT_PRECISION": _dot_precision(dtype),
                  "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}
        specs.append((
            token_scores_fwd_kernel,
            {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "ids_ptr": "*i64", "logp_ptr": "*fp32",
             "lse_ptr": "*fp32", "ent_ptr": "*fp32", "N": "i32", "D": "i32", "V": "i32",
             "stride_h": "i32", "stride_w": "i32", "scale": "fp32",
             **{k: "constexpr" for k in ("HAS_BIAS", "WITH_ENTROPY", *common)}},
            {"HAS_BIAS": flag, "WITH_ENTROPY": flag, **common},
        ))
        specs.append((
            token_scores_dz_kernel,
            {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "ids_ptr": "*i64", "lse_ptr": "*fp32",
             "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dz_ptr": ptr,
             "N": "i32", "D": "i32", "V": "i32", "stride_h": "i32", "stride_w": "i32",
             "stride_dz": "i32", "scale": "fp32",
             **{k: "constexpr" for k in ("HAS_BIAS", "HAS_GRAD_ENTROPY", *common)}},
            {"HAS_BIAS": flag, "HAS_GRAD_ENTROPY": flag, **common},
        ))
    return specs
