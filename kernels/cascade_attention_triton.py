"""Triton decode-step cascade attention (one query token per sample).

Two launches:
1. ``_prefix_kernel``, one program per (prompt, key/value head): the queries of all of the
   prompt's samples (G samples x heads-per-kv-head rows) against the prompt's K/V, read once.
   It leaves the online-softmax state (running max m, sum l, unnormalised output acc) per row.
2. ``_suffix_kernel``, one program per (sample, key/value head): continues that state over the
   sample's own suffix K/V and normalises. Continuing an online softmax from another partial's
   (m, l, acc) is exactly the log-sum-exp merge of the two partial attentions.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["cascade_decode", "compile_specs"]


@triton.jit
def _prefix_kernel(
    q_ptr, pk_ptr, pv_ptr, plen_ptr, gstart_ptr, acc_ptr, m_ptr, l_ptr,
    stride_qs, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_as, stride_ah,
    stride_ms,
    scale, D,
    REP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    start = tl.load(gstart_ptr + b)
    count = tl.load(gstart_ptr + b + 1) - start
    plen = tl.load(plen_ptr + b)

    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m // REP
    head = kvh * REP + offs_m % REP
    row_ok = g < count
    sample = (start + g).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + sample[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = pk_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = pv_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    for n0 in range(0, plen, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < plen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    tl.store(acc_ptr + sample[:, None] * stride_as + head[:, None] * stride_ah + offs_d[None, :],
             acc, mask=q_mask)
    tl.store(m_ptr + sample * stride_ms + head, m_i, mask=row_ok)
    tl.store(l_ptr + sample * stride_ms + head, l_i, mask=row_ok)


@triton.jit
def _suffix_kernel(
    q_ptr, sk_ptr, sv_ptr, slen_ptr, rows_ptr, acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_qs, stride_qh,
    stride_kr, stride_kh, stride_kn,
    stride_vr, stride_vh, stride_vn,
    stride_as, stride_ah,
    stride_ms,
    stride_os, stride_oh,
    scale, D,
    REP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    s_idx = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + s_idx).to(tl.int64)
    slen = tl.load(slen_ptr + s_idx)

    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < REP
    head = kvh * REP + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rd_mask = r_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + s_idx * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
                mask=rd_mask, other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    # Padded rows start from a neutral state so that they never produce NaN or inf.
    m_i = tl.load(m_ptr + s_idx * stride_ms + head, mask=r_ok, other=0.0)
    l_i = tl.load(l_ptr + s_idx * stride_ms + head, mask=r_ok, other=1.0)
    acc = tl.load(acc_ptr + s_idx * stride_as + head[:, None] * stride_ah + offs_d[None, :],
                  mask=rd_mask, other=0.0)

    k_base = sk_ptr + row * stride_kr + kvh * stride_kh
    v_base = sv_ptr + row * stride_vr + kvh * stride_vh
    for n0 in range(0, slen, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < slen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + s_idx * stride_os + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rd_mask)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def cascade_decode(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    sample_prompt: torch.Tensor,
    sample_rows: torch.Tensor,
    *,
    scale: float,
    max_group: int,
    group_starts: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Launch both kernels; q is [S, 1, Hq, D]. Inputs were validated by the caller."""
    S, _, Hq, D = q.shape
    B, Hkv = prefix_k.shape[:2]
    rep = Hq // Hkv
    dev = q.device
    # The kernels index the last dimension with unit stride.
    q3 = q[:, 0]
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    prefix_k, prefix_v, suffix_k, suffix_v = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (prefix_k, prefix_v, suffix_k, suffix_v)
    )
    if group_starts is None:
        counts = torch.bincount(sample_prompt, minlength=B)
        gstart = torch.zeros(B + 1, dtype=torch.int32, device=dev)
        gstart[1:] = counts.cumsum(0)
    else:
        gstart = group_starts.to(device=dev, dtype=torch.int32)
    plen = prefix_lens.to(device=dev, dtype=torch.int32)
    slen = suffix_lens.to(device=dev, dtype=torch.int32)
    rows = sample_rows.to(device=dev, dtype=torch.int32)

    acc = torch.empty(S, Hq, D, dtype=torch.float32, device=dev)
    m = torch.empty(S, Hq, dtype=torch.float32, device=dev)
    l = torch.empty(S, Hq, dtype=torch.float32, device=dev)
    out = torch.empty(S, Hq, D, dtype=q.dtype, device=dev)
    fp32_dot = os.environ.get("TRITON_INTERPRET") == "1"
    block_d = _pow2_at_least_16(D)
    _prefix_kernel[(B, Hkv)](
        q3, prefix_k, prefix_v, plen, gstart, acc, m, l,
        q3.stride(0), q3.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
        acc.stride(0), acc.stride(1),
        m.stride(0),
        scale, D,
        REP=rep, BLOCK_M=_pow2_at_least_16(max_group * rep), BLOCK_N=block_n, BLOCK_D=block_d,
        FP32_DOT=fp32_dot,
    )
    _suffix_kernel[(S, Hkv)](
        q3, suffix_k, suffix_v, slen, rows, acc, m, l, out,
        q3.stride(0), q3.stride(1),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2),
        suffix_v.stride(0), suffix_v.stride(1), suffix_v.stride(2),
        acc.stride(0), acc.stride(1),
        m.stride(0),
        out.stride(0), out.stride(1),
        scale, D,
        REP=rep, BLOCK_R=_pow2_at_least_16(rep), BLOCK_N=block_n, BLOCK_D=block_d,
        FP32_DOT=fp32_dot,
    )
    return out[:, None]


def compile_specs() -> list[tuple[object, dict, dict]]:
    """(kernel, signature, constexprs) for an ahead-of-time compile check on sm_80 / sm_90.

    Shapes follow SmolLM2-135M (head size 64, 3 query heads per key/value head) with G = 8.
    """
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        prefix_sig = {
            "q_ptr": f"*{dtype}", "pk_ptr": f"*{dtype}", "pv_ptr": f"*{dtype}",
            "plen_ptr": "*i32", "gstart_ptr": "*i32",
            "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
            "stride_qs": "i32", "stride_qh": "i32",
            "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
            "stride_vb": "i32", "stride_vh": "i32", "stride_vn": "i32",
            "stride_as": "i32", "stride_ah": "i32",
            "stride_ms": "i32",
            "scale": "fp32", "D": "i32",
            "REP": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_D": "constexpr", "FP32_DOT": "constexpr",
        }
        specs.append((_prefix_kernel, prefix_sig,
                      {"REP": 3, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 64, "FP32_DOT": False}))
        suffix_sig = {
            "q_ptr": f"*{dtype}", "sk_ptr": f"*{dtype}", "sv_ptr": f"*{dtype}",
            "slen_ptr": "*i32", "rows_ptr": "*i32",
            "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": f"*{dtype}",
            "stride_qs": "i32", "stride_qh": "i32",
            "stride_kr": "i32", "stride_kh": "i32", "stride_kn": "i32",
            "stride_vr": "i32", "stride_vh": "i32", "stride_vn": "i32",
            "stride_as": "i32", "stride_ah": "i32",
            "stride_ms": "i32",
            "stride_os": "i32", "stride_oh": "i32",
            "scale": "fp32", "D": "i32",
            "REP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_D": "constexpr", "FP32_DOT": "constexpr",
        }
        specs.append((_suffix_kernel, suffix_sig,
                      {"REP": 3, "BLOCK_R": 16, "BLOCK_N": 64, "BLOCK_D": 64, "FP32_DOT": False}))
    return specs
