"""Triton kernels of the fused audio adapter (the Ultravox-style projector).

The adapter runs on a packed set of M "stacked rows": row m is k consecutive encoder frames of
one sample, i.e. k*E consecutive elements of the contiguous frames tensor [B, T, E] starting at
`row_off[m]`, of which only the first `row_lim[m]` (valid frames * E) are real; the rest are the
zero tail padding. So the stacking is pure index arithmetic inside the loads: nothing is copied,
and rows that lie wholly in the padding are never part of the packed set.

Forward, three kernels:
  (a) `_stack_norm_linear1_kernel`: gather + pre-RMSNorm + linear_1 + activation epilogue. The
      norm is folded into the matmul: rmsnorm(x) @ W1^T = rstd * ((x * g1) @ W1^T), and the row's
      sum of squares is accumulated in the same K loop, so x is read once.
  (b) `_matmul_kernel`: linear_2 (v = a @ W2^T + b2) into an fp32 buffer, tensor-core tiles.
  (c) `_postnorm_scatter_kernel`: post-RMSNorm over llm_dim and the scatter of each row to its
      place in the zero-initialised [B, T_out, D] output.
  Why (b) and (c) are separate: the post-norm needs whole rows of llm_dim (2048-8192 for real
  LLMs); a program spanning all of it would need a [BLOCK_M, D] fp32 accumulator that does not
  fit in registers, forcing tiny row blocks and starving the tensor cores. The split keeps the
  matmul tiled freely; (c) is a memory-bound pass over M*D, small next to the 2*M*D*H matmul.

Backward: `_postnorm_bwd_kernel` (row-wise, two passes over D), `_matmul_kernel` with an
activation-backward epilogue (dv @ W2 -> du) and plain (du @ W1 -> dy), `_prenorm_bwd_kernel`
(row-wise, scatters dx into the frames' gradient), `_wgrad_kernel` (dW = G^T X with the bias
gradient as a by-product; for linear_1 X is the normalised gathered frames, rebuilt in the load)
and `_norm_weight_grad_kernel` (column reductions for the two RMSNorm weights).

All accumulation is fp32. Under TRITON_INTERPRET=1 the tl.dot operands are cast to fp32 (a bf16
tl.dot is wrong in the interpreter, Triton issue 11584); on a GPU they stay in the input dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACT_SWIGLU = 0
ACT_GELU = 1
ACT_RELU = 2
# Epilogue code of `_matmul_kernel` meaning "store the product as is".
EPILOGUE_NONE = -1

ACTIVATION_CODES = {"swiglu": ACT_SWIGLU, "gelu": ACT_GELU, "relu": ACT_RELU}


@triton.jit
def _load_rows(base, off_ptr, lim_ptr, rows, cols, M, K):
    """Tile [rows, cols] of a row-gathered matrix: row m starts at base + off[m] and holds
    lim[m] real elements; the rest of its K columns read as zero (the stacking tail)."""
    rmask = rows < M
    off = tl.load(off_ptr + rows, mask=rmask, other=0)
    lim = tl.load(lim_ptr + rows, mask=rmask, other=0)
    mask = rmask[:, None] & (cols[None, :] < lim[:, None]) & (cols[None, :] < K)
    return tl.load(base + off[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _gelu(z):
    # Exact (erf) GELU, as Ultravox's "gelu"; the constants are 1/sqrt(2) and 1/sqrt(2*pi).
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return cdf + z * pdf


@triton.jit
def _stack_norm_linear1_kernel(
    x_ptr, off_ptr, lim_ptr, g1_ptr, w1_ptr, b1_ptr, u_ptr, a_ptr, r1_ptr,
    M, K1, H, stride_w1n, stride_w1k, eps,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_U: tl.constexpr, UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # int64: M * width may pass 2**31 for long batches.
    rows64 = rows.to(tl.int64)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols_n < H
    dot_ty = tl.float32 if UPCAST else w1_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K1
        x = _load_rows(x_ptr, off_ptr, lim_ptr, rows, ks, M, K1).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
        g = tl.load(g1_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        xg = (x * g[None, :]).to(dot_ty)
        wmask = kmask[:, None] & nmask[None, :]
        w_ptrs = w1_ptr + ks[:, None] * stride_w1k + cols_n[None, :] * stride_w1n
        w = tl.load(w_ptrs, mask=wmask, other=0.0).to(dot_ty)
        acc = tl.dot(xg, w, acc, input_precision=F32_PREC)
        if ACT == 0:
            # Ultravox's SwiGLU: output columns [0, H) are x, [H, 2H) are the gate.
            wg = tl.load(w_ptrs + H * stride_w1n, mask=wmask, other=0.0).to(dot_ty)
            acc_gate = tl.dot(xg, wg, acc_gate, input_precision=F32_PREC)

    rstd = 1.0 / tl.sqrt(sumsq / K1 + eps)
    rmask = rows < M
    if pid_n == 0:
        tl.store(r1_ptr + rows, rstd, mask=rmask)
    u = acc * rstd[:, None]
    if HAS_BIAS:
        u += tl.load(b1_ptr + cols_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if ACT == 0:
        n1 = 2 * H
        gate = acc_gate * rstd[:, None]
        if HAS_BIAS:
            gate += tl.load(b1_ptr + H + cols_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        act = u * (gate / (1.0 + tl.exp(-gate)))
        if SAVE_U:
            u_ptrs = u_ptr + rows64[:, None] * n1 + cols_n[None, :]
            tl.store(u_ptrs, u, mask=omask)
            tl.store(u_ptrs + H, gate, mask=omask)
    else:
        if ACT == 1:
            act = _gelu(u)
        else:
            act = tl.maximum(u, 0.0)
        if SAVE_U:
            tl.store(u_ptr + rows64[:, None] * H + cols_n[None, :], u, mask=omask)
    a_ptrs = a_ptr + rows64[:, None] * H + cols_n[None, :]
    tl.store(a_ptrs, act.to(a_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, u_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]), C contiguous.

    EPILOGUE -1 stores the product. EPILOGUE = an activation code treats the product as dL/da
    for a = act(u) with u [M, N] (or [M, 2N] for SwiGLU) saved by the forward, and stores
    dL/du in C with u's width instead.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    nmask = cols < N
    dot_ty = tl.float32 if UPCAST else b_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(
            a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=rmask[:, None] & kmask[None, :], other=0.0,
        ).to(dot_ty)
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=kmask[:, None] & nmask[None, :], other=0.0,
        ).to(dot_ty)
        acc = tl.dot(a, b, acc, input_precision=F32_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & nmask[None, :]
    out_ty = c_ptr.dtype.element_ty
    if EPILOGUE == -1:
        tl.store(c_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ty), mask=omask)
    elif EPILOGUE == 0:
        u_ptrs = u_ptr + rows64[:, None] * (2 * N) + cols[None, :]
        ux = tl.load(u_ptrs, mask=omask, other=0.0).to(tl.float32)
        ug = tl.load(u_ptrs + N, mask=omask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-ug))
        silu = ug * sig
        d_x = acc * silu
        d_gate = acc * ux * sig * (1.0 + ug * (1.0 - sig))
        c_ptrs = c_ptr + rows64[:, None] * (2 * N) + cols[None, :]
        tl.store(c_ptrs, d_x.to(out_ty), mask=omask)
        tl.store(c_ptrs + N, d_gate.to(out_ty), mask=omask)
    else:
        u = tl.load(u_ptr + rows64[:, None] * N + cols[None, :], mask=omask, other=0.0)
        u = u.to(tl.float32)
        if EPILOGUE == 1:
            du = acc * _gelu_grad(u)
        else:
            du = tl.where(u > 0.0, acc, 0.0)
        tl.store(c_ptr + rows64[:, None] * N + cols[None, :], du.to(out_ty), mask=omask)


@triton.jit
def _postnorm_scatter_kernel(
    v_ptr, g2_ptr, out_ptr, out_off_ptr, r2_ptr, M, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[row m] = v[m] * rstd(v[m]) * g2, written at out + out_off[m]; v is fp32 [M, D]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    rmask = rows < M
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (ds < D)[None, :]
        v = tl.load(v_ptr + rows64[:, None] * D + ds[None, :], mask=m2, other=0.0)
        sumsq += tl.sum(v * v, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / D + eps)
    tl.store(r2_ptr + rows, rstd, mask=rmask)
    off = tl.load(out_off_ptr + rows, mask=rmask, other=0)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        m2 = rmask[:, None] & dmask[None, :]
        v = tl.load(v_ptr + rows64[:, None] * D + ds[None, :], mask=m2, other=0.0)
        g = tl.load(g2_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
        y = v * rstd[:, None] * g[None, :]
        tl.store(out_ptr + off[:, None] + ds[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _postnorm_bwd_kernel(
    dout_ptr, out_off_ptr, out_lim_ptr, v_ptr, r2_ptr, g2_ptr, dv_ptr, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dv = rstd * (q - vn * mean(q * vn)) with q = dout * g2, vn = v * rstd; dout is gathered
    from the [B, T_out, D] gradient at the packed rows' places."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    rmask = rows < M
    rstd = tl.load(r2_ptr + rows, mask=rmask, other=0.0)
    dot_qv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        m2 = rmask[:, None] & dmask[None, :]
        dout = _load_rows(dout_ptr, out_off_ptr, out_lim_ptr, rows, ds, M, D).to(tl.float32)
        g = tl.load(g2_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows64[:, None] * D + ds[None, :], mask=m2, other=0.0)
        dot_qv += tl.sum(dout * g[None, :] * v, axis=1)
    coef = dot_qv * rstd * rstd * rstd / D
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        m2 = rmask[:, None] & dmask[None, :]
        dout = _load_rows(dout_ptr, out_off_ptr, out_lim_ptr, rows, ds, M, D).to(tl.float32)
        g = tl.load(g2_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows64[:, None] * D + ds[None, :], mask=m2, other=0.0)
        dv = rstd[:, None] * dout * g[None, :] - v * coef[:, None]
        tl.store(dv_ptr + rows64[:, None] * D + ds[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _prenorm_bwd_kernel(
    dy_ptr, x_ptr, off_ptr, lim_ptr, r1_ptr, g1_ptr, dx_ptr, M, K1,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = rstd * (dy * g1 - xn * mean(dy * g1 * xn)), scattered to the real frames only (the
    stacking tail has no frames behind it; the caller zero-fills dx elsewhere)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    rmask = rows < M
    rstd = tl.load(r1_ptr + rows, mask=rmask, other=0.0)
    off = tl.load(off_ptr + rows, mask=rmask, other=0)
    lim = tl.load(lim_ptr + rows, mask=rmask, other=0)
    dot_qx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K1
        dy = tl.load(dy_ptr + rows64[:, None] * K1 + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g1_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        x = _load_rows(x_ptr, off_ptr, lim_ptr, rows, ks, M, K1).to(tl.float32)
        dot_qx += tl.sum(dy * g[None, :] * x, axis=1)
    coef = dot_qx * rstd * rstd * rstd / K1
    for k0 in range(0, K1, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K1
        dy = tl.load(dy_ptr + rows64[:, None] * K1 + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g1_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        x = _load_rows(x_ptr, off_ptr, lim_ptr, rows, ks, M, K1).to(tl.float32)
        dx = rstd[:, None] * dy * g[None, :] - x * coef[:, None]
        smask = rmask[:, None] & (ks[None, :] < lim[:, None]) & kmask[None, :]
        tl.store(dx_ptr + off[:, None] + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _wgrad_kernel(
    g_ptr, x_ptr, off_ptr, lim_ptr, r_ptr, colscale_ptr, dw_ptr, db_ptr, M, N, K,
    GATHER_X: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[N, K] = G[M, N]^T @ X[M, K] and, from the pid_k == 0 programs, db[N] = sum_m G.

    GATHER_X: X is the pre-normed input of linear_1, rebuilt in the load from the gathered
    frames as x * r[m] (row rstd) and, after the reduction, * colscale[k] (the norm weight),
    so the normalised [M, k*E] matrix is never stored. Otherwise X is a contiguous [M, K].
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = ns < N
    kmask = ks < K
    dot_ty = tl.float32 if UPCAST else g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        ms64 = ms.to(tl.int64)
        mmask = ms < M
        gt = tl.load(g_ptr + ms64[None, :] * N + ns[:, None],
                     mask=nmask[:, None] & mmask[None, :], other=0.0)
        if HAS_BIAS:
            bias_acc += tl.sum(gt.to(tl.float32), axis=1)
        if GATHER_X:
            x = _load_rows(x_ptr, off_ptr, lim_ptr, ms, ks, M, K).to(tl.float32)
            r = tl.load(r_ptr + ms, mask=mmask, other=0.0)
            x = x * r[:, None]
        else:
            x = tl.load(x_ptr + ms64[:, None] * K + ks[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(gt.to(dot_ty), x.to(dot_ty), acc, input_precision=F32_PREC)
    if GATHER_X:
        acc = acc * tl.load(colscale_ptr + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
    tl.store(dw_ptr + ns[:, None] * K + ks[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + ns, bias_acc.to(db_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _norm_weight_grad_kernel(
    p_ptr, q_ptr, off_ptr, lim_ptr, r_ptr, out_ptr, M, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[k] = sum_m P[m, k] * Q[m, k] * r[m]: the gradient of an RMSNorm weight, with P the
    contiguous [M, K] upstream gradient (or the fp32 pre-norm values) and Q row-gathered."""
    pid = tl.program_id(0)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        ms64 = ms.to(tl.int64)
        mmask = ms < M
        p = tl.load(p_ptr + ms64[:, None] * K + ks[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        q = _load_rows(q_ptr, off_ptr, lim_ptr, ms, ks, M, K).to(tl.float32)
        r = tl.load(r_ptr + ms, mask=mmask, other=0.0)
        acc += tl.sum(p * q * r[:, None], axis=0)
    tl.store(out_ptr + ks, acc.to(out_ptr.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------------------------
# Launchers. Each takes its output buffers from the caller (tests hand in poisoned ones).
# ----------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _f32_precision() -> str:
    # Follow torch's own setting for fp32 matmuls (off by default), so the fused fp32 adapter is
    # as exact as the unfused one unless the user opted into TF32.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _tiles(m: int, n: int, k: int) -> tuple[int, int, int]:
    return _block(m, 64), _block(n, 64), _block(k, 32)


def forward_stack_norm_linear1(
    frames: torch.Tensor, row_off: torch.Tensor, row_lim: torch.Tensor, g1: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor | None, activation: str, eps: float,
    u: torch.Tensor | None, a: torch.Tensor, r1: torch.Tensor,
) -> None:
    """Kernel (a). frames contiguous [B, T, E]; w1 [N1, k*E]; writes a [M, H], r1 [M] fp32 and,
    when given, u [M, N1] fp32 (the pre-activation, kept for the backward)."""
    m, hidden = a.shape
    k1 = w1.shape[1]
    bm, bn, bk = _tiles(m, hidden, k1)
    grid = (triton.cdiv(m, bm), triton.cdiv(hidden, bn))
    _stack_norm_linear1_kernel[grid](
        frames, row_off, row_lim, g1, w1, b1 if b1 is not None else w1,
        u if u is not None else a, a, r1,
        m, k1, hidden, w1.stride(0), w1.stride(1), float(eps),
        ACT=ACTIVATION_CODES[activation], HAS_BIAS=b1 is not None, SAVE_U=u is not None,
        UPCAST=_interpreting(), F32_PREC=_f32_precision(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )


def matmul(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    act_backward: str | None = None, u: torch.Tensor | None = None,
) -> None:
    """out = a @ b (+ bias); with act_backward, out = dL/du of act given a @ b = dL/da."""
    m, k = a.shape
    n = b.shape[1]
    bm, bn, bk = _tiles(m, n, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    epilogue = EPILOGUE_NONE if act_backward is None else ACTIVATION_CODES[act_backward]
    _matmul_kernel[grid](
        a, b, bias if bias is not None else b, out, u if u is not None else out,
        m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, UPCAST=_interpreting(),
        F32_PREC=_f32_precision(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )


def postnorm_scatter(
    v: torch.Tensor, g2: torch.Tensor, eps: float, out: torch.Tensor, out_off: torch.Tensor,
    r2: torch.Tensor,
) -> None:
    """Kernel (c): normalise fp32 rows v [M, D] and write them at out.view(-1)[out_off[m]:]."""
    m, d = v.shape
    bm, bd = _block(m, 16), _block(d, 128)
    _postnorm_scatter_kernel[(triton.cdiv(m, bm),)](
        v, g2, out, out_off, r2, m, d, float(eps), BLOCK_M=bm, BLOCK_D=bd,
    )


def postnorm_backward(
    dout: torch.Tensor, out_off: torch.Tensor, out_lim: torch.Tensor, v: torch.Tensor,
    r2: torch.Tensor, g2: torch.Tensor, dv: torch.Tensor,
) -> None:
    m, d = v.shape
    bm, bd = _block(m, 16), _block(d, 128)
    _postnorm_bwd_kernel[(triton.cdiv(m, bm),)](
        dout, out_off, out_lim, v, r2, g2, dv, m, d, BLOCK_M=bm, BLOCK_D=bd,
    )


def prenorm_backward(
    dy: torch.Tensor, frames: torch.Tensor, row_off: torch.Tensor, row_lim: torch.Tensor,
    r1: torch.Tensor, g1: torch.Tensor, dframes: torch.Tensor,
) -> None:
    m, k1 = dy.shape
    bm, bk = _block(m, 16), _block(k1, 128)
    _prenorm_bwd_kernel[(triton.cdiv(m, bm),)](
        dy, frames, row_off, row_lim, r1, g1, dframes, m, k1, BLOCK_M=bm, BLOCK_K=bk,
    )


def weight_grad(
    g: torch.Tensor, x: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None,
    gather: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """dw = g^T @ X, db = g.sum(0). gather = (row_off, row_lim, r1, g1) makes X the pre-normed,
    gathered stacked rows of the frames tensor x instead of the contiguous matrix x."""
    m, n = g.shape
    k = dw.shape[1]
    bn, bk = _block(n, 64), _block(k, 64)
    bm = _block(m, 32)
    off, lim, r, colscale = gather if gather is not None else (g, g, g, g)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _wgrad_kernel[grid](
        g, x, off, lim, r, colscale, dw, db if db is not None else dw, m, n, k,
        GATHER_X=gather is not None, HAS_BIAS=db is not None, UPCAST=_interpreting(),
        F32_PREC=_f32_precision(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )


def norm_weight_grad(
    p: torch.Tensor, q: torch.Tensor, off: torch.Tensor, lim: torch.Tensor, r: torch.Tensor,
    out: torch.Tensor,
) -> None:
    m, k = p.shape
    bm, bk = _block(m, 32), _block(k, 128)
    _norm_weight_grad_kernel[(triton.cdiv(k, bk),)](
        p, q, off, lim, r, out, m, k, BLOCK_M=bm, BLOCK_K=bk,
    )


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (kernels/compile_check.py compiles each for sm_80 and sm_90).
# ----------------------------------------------------------------------------------------------

def _sig(kernel, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def compile_specs() -> list[tuple[object, dict, dict]]:
    """Every kernel and constexpr branch in bf16 (the training dtype), plus the fp32 variants of
    the tl.dot kernels, with GPU-sized blocks. Kept small: each spec costs a full compile."""
    specs = []

    def add(kernel, types, constexprs):
        specs.append((kernel, _sig(kernel, types, constexprs), constexprs))

    dot_blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    for p, acts in (("*bf16", (ACT_SWIGLU, ACT_GELU, ACT_RELU)), ("*fp32", (ACT_SWIGLU,))):
        for act in acts:
            add(_stack_norm_linear1_kernel,
                dict(x_ptr=p, off_ptr="*i64", lim_ptr="*i32", g1_ptr=p, w1_ptr=p, b1_ptr=p,
                     u_ptr="*fp32", a_ptr=p, r1_ptr="*fp32", M="i32", K1="i32", H="i32",
                     stride_w1n="i32", stride_w1k="i32", eps="fp32"),
                dict(ACT=act, HAS_BIAS=True, SAVE_U=True, UPCAST=False, F32_PREC="ieee",
                     **dot_blocks))
            add(_matmul_kernel,
                dict(a_ptr=p, b_ptr=p, bias_ptr=p, c_ptr=p, u_ptr="*fp32", M="i32", N="i32",
                     K="i32", stride_am="i32", stride_ak="i32", stride_bk="i32",
                     stride_bn="i32"),
                dict(EPILOGUE=act, HAS_BIAS=False, UPCAST=False, F32_PREC="ieee", **dot_blocks))
        add(_matmul_kernel,
            dict(a_ptr=p, b_ptr=p, bias_ptr=p, c_ptr="*fp32", u_ptr="*fp32", M="i32", N="i32",
                 K="i32", stride_am="i32", stride_ak="i32", stride_bk="i32", stride_bn="i32"),
            dict(EPILOGUE=EPILOGUE_NONE, HAS_BIAS=True, UPCAST=False, F32_PREC="ieee",
                 **dot_blocks))
        add(_wgrad_kernel,
            dict(g_ptr=p, x_ptr=p, off_ptr="*i64", lim_ptr="*i32", r_ptr="*fp32",
                 colscale_ptr=p, dw_ptr=p, db_ptr=p, M="i32", N="i32", K="i32"),
            dict(GATHER_X=True, HAS_BIAS=True, UPCAST=False, F32_PREC="ieee",
                 BLOCK_M=32, BLOCK_N=64, BLOCK_K=64))
    p = "*bf16"
    add(_wgrad_kernel,
        dict(g_ptr=p, x_ptr=p, off_ptr="*i64", lim_ptr="*i32", r_ptr="*fp32", colscale_ptr=p,
             dw_ptr=p, db_ptr=p, M="i32", N="i32", K="i32"),
        dict(GATHER_X=False, HAS_BIAS=False, UPCAST=False, F32_PREC="ieee",
             BLOCK_M=32, BLOCK_N=64, BLOCK_K=64))
    add(_postnorm_scatter_kernel,
        dict(v_ptr="*fp32", g2_ptr=p, out_ptr=p, out_off_ptr="*i64", r2_ptr="*fp32", M="i32",
             D="i32", eps="fp32"),
        dict(BLOCK_M=16, BLOCK_D=128))
    add(_postnorm_bwd_kernel,
        dict(dout_ptr=p, out_off_ptr="*i64", out_lim_ptr="*i32", v_ptr="*fp32", r2_ptr="*fp32",
             g2_ptr=p, dv_ptr=p, M="i32", D="i32"),
        dict(BLOCK_M=16, BLOCK_D=128))
    add(_prenorm_bwd_kernel,
        dict(dy_ptr="*fp32", x_ptr=p, off_ptr="*i64", lim_ptr="*i32", r1_ptr="*fp32",
             g1_ptr=p, dx_ptr=p, M="i32", K1="i32"),
        dict(BLOCK_M=16, BLOCK_K=128))
    add(_norm_weight_grad_kernel,
        dict(p_ptr="*fp32", q_ptr=p, off_ptr="*i64", lim_ptr="*i32", r_ptr="*fp32", out_ptr=p,
             M="i32", K="i32"),
        dict(BLOCK_M=32, BLOCK_K=128))
    return specs
