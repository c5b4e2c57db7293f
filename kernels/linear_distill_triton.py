"""Triton kernels for the fused linear distillation loss (student vs teacher LM head).

Logit tiles zs = hs @ Ws.T / T and zt = ht @ Wt.T / T are recomputed from the hidden states and
the weights block by block (tl.dot over D blocks), so no [N, V] buffer exists in either pass:

forward   `_distill_fwd_kernel` (program per row block, loop over V blocks): online
          log-sum-exp of both distributions; for forward and reverse KL the divergence is
          accumulated in the same pass as sum exp(z - m) * (zt - zs), rescaled whenever the
          running max m moves. `_distill_rowsum_kernel` is a second pass that needs the final
          log-sum-exps: the JSD loss, and the per-row constant of the reverse-KL/JSD gradient.
backward  `_distill_grad_hidden_kernel` (program per row block, loop over V blocks) and
          `_distill_grad_weight_kernel` (program per V block, loop over row blocks) recompute
          the tiles, form d loss / d zs per tile and multiply it into the fp32 gradient, which
          each program owns exclusively (no atomics); the first V (or row) block overwrites
          instead of adding, so no zero-fill is needed.

Plain pointer arithmetic (no tl.make_block_ptr) so the kernels build on Triton 3.6 to 3.9.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}

# Default tiles for a GPU; tests pass smaller ones so ragged edges are exercised.
DEFAULT_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}


def _interpreting() -> bool:
    # Read at launch time: the interpreter's bf16 tl.dot returns garbage (Triton issue 11584),
    # so operands are cast to fp32 there and only there.
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, D, stride_h, stride_w, inv_t,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                FP32_DOT: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 tile of (h @ W.T) * inv_t; out-of-range entries are 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    n_mask = offs_n < N
    v_mask = offs_v < V
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None].to(tl.int64) * stride_h + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        # W is read as its transpose [BLOCK_D, BLOCK_V] straight from memory.
        w = tl.load(w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_d[:, None],
                    mask=v_mask[None, :] & d_mask[:, None], other=0.0)
        if FP32_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(h, w)
    return acc * inv_t


@triton.jit
def _student_grad_tile(zs, zt, s_lse, t_lse, row_c, row_g, valid, log_beta, log_1m_beta,
                       KIND: tl.constexpr):
    """d loss / d zs for one tile, times the row's upstream gradient; 0 outside `valid`.

    forward KL: P_S - P_T; reverse KL: P_S (log P_S - log P_T - c);
    JSD: (1 - beta) P_S (log P_S - log M - c), with c the row constant from the rowsum pass.
    """
    lps = zs - s_lse[:, None]
    lpt = zt - t_lse[:, None]
    ps = tl.exp(lps)
    if KIND == 0:
        dz = ps - tl.exp(lpt)
    elif KIND == 1:
        dz = ps * (lps - lpt - row_c[:, None])
    else:
        a = lpt + log_beta
        b = lps + log_1m_beta
        mx = tl.maximum(a, b)
        lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
        dz = tl.exp(log_1m_beta) * ps * (lps - lm - row_c[:, None])
    return tl.where(valid, dz * row_g[:, None], 0.0)


@triton.jit
def _distill_fwd_kernel(sh_ptr, sw_ptr, th_ptr, tw_ptr, loss_ptr, slse_ptr, tlse_ptr,
                        N, V, DS, DT, stride_sh, stride_sw, stride_th, stride_tw, inv_t,
                        KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_s = tl.zeros((BLOCK_N,), tl.float32)
    sum_t = tl.zeros((BLOCK_N,), tl.float32)
    # sum over v of exp(z_p - m_p) * (z_p - z_q), p the distribution the KL is taken under.
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = n_mask[:, None] & (offs_v < V)[None, :]
        col_ok = (offs_v < V)[None, :]
        zs = _logit_tile(sh_ptr, sw_ptr, offs_n, offs_v, N, V, DS, stride_sh, stride_sw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        zt = _logit_tile(th_ptr, tw_ptr, offs_n, offs_v, N, V, DT, stride_th, stride_tw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        # Every V block holds at least one real column, so the new maxima are finite.
        new_ms = tl.maximum(m_s, tl.max(tl.where(col_ok, zs, float("-inf")), axis=1))
        new_mt = tl.maximum(m_t, tl.max(tl.where(col_ok, zt, float("-inf")), axis=1))
        es = tl.where(col_ok, tl.exp(zs - new_ms[:, None]), 0.0)
        et = tl.where(col_ok, tl.exp(zt - new_mt[:, None]), 0.0)
        alpha_s = tl.exp(m_s - new_ms)
        alpha_t = tl.exp(m_t - new_mt)
        sum_s = sum_s * alpha_s + tl.sum(es, axis=1)
        sum_t = sum_t * alpha_t + tl.sum(et, axis=1)
        if KIND == 0:
            acc = acc * alpha_t + tl.sum(tl.where(valid, et * (zt - zs), 0.0), axis=1)
        elif KIND == 1:
            acc = acc * alpha_s + tl.sum(tl.where(valid, es * (zs - zt), 0.0), axis=1)
        m_s = new_ms
        m_t = new_mt
    s_lse = m_s + tl.log(sum_s)
    t_lse = m_t + tl.log(sum_t)
    if KIND == 0:
        loss = acc / sum_t - t_lse + s_lse
    elif KIND == 1:
        loss = acc / sum_s - s_lse + t_lse
    else:
        loss = tl.zeros((BLOCK_N,), tl.float32)
    # A KL is >= 0; rounding of the two large terms that cancel may leave a tiny negative.
    loss = tl.maximum(loss, 0.0)
    tl.store(loss_ptr + offs_n, loss, mask=n_mask)
    tl.store(slse_ptr + offs_n, s_lse, mask=n_mask)
    tl.store(tlse_ptr + offs_n, t_lse, mask=n_mask)


@triton.jit
def _distill_rowsum_kernel(sh_ptr, sw_ptr, th_ptr, tw_ptr, slse_ptr, tlse_ptr, out_ptr,
                           N, V, DS, DT, stride_sh, stride_sw, stride_th, stride_tw, inv_t,
                           jsd_beta, log_beta, log_1m_beta,
                           WHAT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                           BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr):
    """Row sums that need the final log-sum-exps.

    WHAT 0: the JSD loss, beta sum P_T (log P_T - log M) + (1-beta) sum P_S (log P_S - log M).
    WHAT 1: the reverse-KL gradient constant, sum P_S (log P_S - log P_T).
    WHAT 2: the JSD gradient constant, sum P_S (log P_S - log M).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s_lse = tl.load(slse_ptr + offs_n, mask=n_mask, other=0.0)
    t_lse = tl.load(tlse_ptr + offs_n, mask=n_mask, other=0.0)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = n_mask[:, None] & (offs_v < V)[None, :]
        zs = _logit_tile(sh_ptr, sw_ptr, offs_n, offs_v, N, V, DS, stride_sh, stride_sw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        zt = _logit_tile(th_ptr, tw_ptr, offs_n, offs_v, N, V, DT, stride_th, stride_tw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        lps = zs - s_lse[:, None]
        lpt = zt - t_lse[:, None]
        ps = tl.exp(lps)
        if WHAT == 1:
            term = ps * (lps - lpt)
        else:
            a = lpt + log_beta
            b = lps + log_1m_beta
            mx = tl.maximum(a, b)
            lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
            if WHAT == 0:
                term = jsd_beta * tl.exp(lpt) * (lpt - lm) + (1.0 - jsd_beta) * ps * (lps - lm)
            else:
                term = ps * (lps - lm)
        acc += tl.sum(tl.where(valid, term, 0.0), axis=1)
    if WHAT == 0:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + offs_n, acc, mask=n_mask)


@triton.jit
def _distill_grad_hidden_kernel(sh_ptr, sw_ptr, th_ptr, tw_ptr, slse_ptr, tlse_ptr, c_ptr,
                                g_ptr, gh_ptr, N, V, DS, DT, stride_sh, stride_sw, stride_th,
                                stride_tw, stride_gh, inv_t, log_beta, log_1m_beta,
                                KIND: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                FP32_DOT: tl.constexpr):
    """gh[rows] = sum over V blocks of dz_tile @ Ws[vblock] (fp32, owned by this program)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s_lse = tl.load(slse_ptr + offs_n, mask=n_mask, other=0.0)
    t_lse = tl.load(tlse_ptr + offs_n, mask=n_mask, other=0.0)
    row_c = tl.load(c_ptr + offs_n, mask=n_mask, other=0.0)
    # inv_t folds in d zs / d (h @ W.T).
    row_g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0) * inv_t
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        valid = n_mask[:, None] & v_mask[None, :]
        zs = _logit_tile(sh_ptr, sw_ptr, offs_n, offs_v, N, V, DS, stride_sh, stride_sw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        zt = _logit_tile(th_ptr, tw_ptr, offs_n, offs_v, N, V, DT, stride_th, stride_tw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        dz = _student_grad_tile(zs, zt, s_lse, t_lse, row_c, row_g, valid, log_beta,
                                log_1m_beta, KIND)
        for d0 in range(0, DS, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < DS
            w = tl.load(sw_ptr + offs_v[:, None].to(tl.int64) * stride_sw + offs_d[None, :],
                        mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            if FP32_DOT:
                part = tl.dot(dz, w.to(tl.float32))
            else:
                part = tl.dot(dz.to(w.dtype), w)
            gh_ptrs = gh_ptr + offs_n[:, None].to(tl.int64) * stride_gh + offs_d[None, :]
            out_mask = n_mask[:, None] & d_mask[None, :]
            if v0 > 0:
                part += tl.load(gh_ptrs, mask=out_mask, other=0.0)
            tl.store(gh_ptrs, part, mask=out_mask)


@triton.jit
def _distill_grad_weight_kernel(sh_ptr, sw_ptr, th_ptr, tw_ptr, slse_ptr, tlse_ptr, c_ptr,
                                g_ptr, gw_ptr, N, V, DS, DT, stride_sh, stride_sw, stride_th,
                                stride_tw, stride_gw, inv_t, log_beta, log_1m_beta,
                                KIND: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                FP32_DOT: tl.constexpr):
    """gw[vblock] = sum over row blocks of dz_tile.T @ hs[rows] (fp32, owned by this program)."""
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        valid = n_mask[:, None] & v_mask[None, :]
        s_lse = tl.load(slse_ptr + offs_n, mask=n_mask, other=0.0)
        t_lse = tl.load(tlse_ptr + offs_n, mask=n_mask, other=0.0)
        row_c = tl.load(c_ptr + offs_n, mask=n_mask, other=0.0)
        row_g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0) * inv_t
        zs = _logit_tile(sh_ptr, sw_ptr, offs_n, offs_v, N, V, DS, stride_sh, stride_sw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        zt = _logit_tile(th_ptr, tw_ptr, offs_n, offs_v, N, V, DT, stride_th, stride_tw, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        dz_t = tl.trans(_student_grad_tile(zs, zt, s_lse, t_lse, row_c, row_g, valid, log_beta,
                                           log_1m_beta, KIND))
        for d0 in range(0, DS, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < DS
            h = tl.load(sh_ptr + offs_n[:, None].to(tl.int64) * stride_sh + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if FP32_DOT:
                part = tl.dot(dz_t, h.to(tl.float32))
            else:
                part = tl.dot(dz_t.to(h.dtype), h)
            gw_ptrs = gw_ptr + offs_v[:, None].to(tl.int64) * stride_gw + offs_d[None, :]
            out_mask = v_mask[:, None] & d_mask[None, :]
            if n0 > 0:
                part += tl.load(gw_ptrs, mask=out_mask, other=0.0)
            tl.store(gw_ptrs, part, mask=out_mask)


def _blocks(blocks: dict | None) -> dict:
    merged = dict(DEFAULT_BLOCKS)
    if blocks:
        unknown = set(blocks) - set(DEFAULT_BLOCKS)
        if unknown:
            raise ValueError(f"blocks: unknown keys {sorted(unknown)}; "
                             f"use {sorted(DEFAULT_BLOCKS)}")
        merged.update(blocks)
    for name, size in merged.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"blocks[{name!r}]={size}: tl.dot needs a power of two >= 16")
    return merged


def _beta_logs(kind: str, jsd_beta: float) -> tuple[float, float]:
    if kind != "jsd":
        return 0.0, 0.0
    return math.log(jsd_beta), math.log1p(-jsd_beta)


def _common(s_hidden, s_weight, t_hidden, t_weight):
    n, ds = s_hidden.shape
    return (n, s_weight.shape[0], ds, t_hidden.shape[1], s_hidden.stride(0), s_weight.stride(0),
            t_hidden.stride(0), t_weight.stride(0))


def _row_sums(s_hidden, s_weight, t_hidden, t_weight, temperature, jsd_beta, s_lse, t_lse,
              what: int, out: torch.Tensor, blk: dict) -> torch.Tensor:
    n, v, ds, dt, ssh, ssw, sth, stw = _common(s_hidden, s_weight, t_hidden, t_weight)
    log_beta, log_1m_beta = _beta_logs("jsd", jsd_beta) if what != 1 else (0.0, 0.0)
    grid = (triton.cdiv(n, blk["BLOCK_N"]),)
    _distill_rowsum_kernel[grid](
        s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse, out, n, v, ds, dt,
        ssh, ssw, sth, stw, 1.0 / temperature, float(jsd_beta), log_beta, log_1m_beta,
        WHAT=what, FP32_DOT=_interpreting(), **blk)
    return out


def distill_forward(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor,
                    t_weight: torch.Tensor, temperature: float, kind: str, jsd_beta: float,
                    *, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    blocks: dict | None = None):
    """Contract backend: (loss_rows [N] f32, s_lse [N] f32, t_lse [N] f32).

    Inputs are 2-D, contiguous in their last dimension, already compacted to valid rows.
    `out` (loss, s_lse, t_lse) lets tests hand in poisoned buffers that must be overwritten.
    """
    blk = _blocks(blocks)
    n, v, ds, dt, ssh, ssw, sth, stw = _common(s_hidden, s_weight, t_hidden, t_weight)
    if out is None:
        out = tuple(torch.empty(n, dtype=torch.float32, device=s_hidden.device) for _ in range(3))
    loss, s_lse, t_lse = out
    if n == 0:
        return loss, s_lse, t_lse
    grid = (triton.cdiv(n, blk["BLOCK_N"]),)
    _distill_fwd_kernel[grid](
        s_hidden, s_weight, t_hidden, t_weight, loss, s_lse, t_lse, n, v, ds, dt,
        ssh, ssw, sth, stw, 1.0 / temperature,
        KIND=KIND_CODES[kind], FP32_DOT=_interpreting(), **blk)
    if kind == "jsd":
        _row_sums(s_hidden, s_weight, t_hidden, t_weight, temperature, jsd_beta, s_lse, t_lse,
                  0, loss, blk)
    return loss, s_lse, t_lse


def distill_backward(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor,
                     t_weight: torch.Tensor, temperature: float, kind: str, jsd_beta: float,
                     s_lse: torch.Tensor, t_lse: torch.Tensor, grad_rows: torch.Tensor,
                     need_weight_grad: bool, *,
                     out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                     blocks: dict | None = None):
    """Contract backend: (grad_s_hidden [N, Ds] s_hidden.dtype, grad_s_weight [V, Ds] or None).

    `out` (grad_hidden, grad_weight_or_None) are the result buffers, fully overwritten.
    """
    blk = _blocks(blocks)
    n, v, ds, dt, ssh, ssw, sth, stw = _common(s_hidden, s_weight, t_hidden, t_weight)
    dev = s_hidden.device
    if out is None:
        out = (torch.empty_like(s_hidden),
               torch.empty_like(s_weight) if need_weight_grad else None)
    grad_h, grad_w = out
    if n == 0:
        grad_h.zero_()
        if grad_w is not None:
            grad_w.zero_()
        return grad_h, grad_w
    grad_rows = grad_rows.to(torch.float32).contiguous()
    if kind == "forward_kl":
        # The forward-KL gradient has no row constant; any [N] f32 buffer fills the slot.
        row_c = s_lse
    else:
        row_c = _row_sums(s_hidden, s_weight, t_hidden, t_weight, temperature, jsd_beta, s_lse,
                          t_lse, 1 if kind == "reverse_kl" else 2,
                          torch.empty(n, dtype=torch.float32, device=dev), blk)
    log_beta, log_1m_beta = _beta_logs(kind, jsd_beta)
    kind_code = KIND_CODES[kind]
    interp = _interpreting()
    inv_t = 1.0 / temperature

    gh = grad_h if grad_h.dtype == torch.float32 else torch.empty(
        grad_h.shape, dtype=torch.float32, device=dev)
    _distill_grad_hidden_kernel[(triton.cdiv(n, blk["BLOCK_N"]),)](
        s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse, row_c, grad_rows, gh,
        n, v, ds, dt, ssh, ssw, sth, stw, gh.stride(0), inv_t, log_beta, log_1m_beta,
        KIND=kind_code, FP32_DOT=interp, **blk)
    if gh is not grad_h:
        grad_h.copy_(gh)

    if grad_w is not None:
        gw = grad_w if grad_w.dtype == torch.float32 else torch.empty(
            grad_w.shape, dtype=torch.float32, device=dev)
        _distill_grad_weight_kernel[(triton.cdiv(v, blk["BLOCK_V"]),)](
            s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse, row_c, grad_rows, gw,
            n, v, ds, dt, ssh, ssw, sth, stw, gw.stride(0), inv_t, log_beta, log_1m_beta,
            KIND=kind_code, FP32_DOT=interp, **blk)
        if gw is not grad_w:
            grad_w.copy_(gw)
    return grad_h, grad_w


_INT_ARGS = ("N", "V", "DS", "DT")


def _signature(kernel, pointer_types: dict, constexpr_names: tuple[str, ...]) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexpr_names:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in _INT_ARGS or name.startswith("stride"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def compile_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for compile_check: every kernel and mode."""
    specs = []
    kernels = {
        _distill_fwd_kernel: ("KIND", {"loss_ptr": "*fp32", "slse_ptr": "*fp32",
                                       "tlse_ptr": "*fp32"}),
        _distill_rowsum_kernel: ("WHAT", {"slse_ptr": "*fp32", "tlse_ptr": "*fp32",
                                          "out_ptr": "*fp32"}),
        _distill_grad_hidden_kernel: ("KIND", {"slse_ptr": "*fp32", "tlse_ptr": "*fp32",
                                               "c_ptr": "*fp32", "g_ptr": "*fp32",
                                               "gh_ptr": "*fp32"}),
        _distill_grad_weight_kernel: ("KIND", {"slse_ptr": "*fp32", "tlse_ptr": "*fp32",
                                               "c_ptr": "*fp32", "g_ptr": "*fp32",
                                               "gw_ptr": "*fp32"}),
    }
    # Every mode in bf16 (each mode is its own code path); fp32 inputs only change the dot
    # operand types, so one mode per kernel covers them and keeps CI's compile time down.
    for dtype, modes in (("bf16", (0, 1, 2)), ("fp32", (0,))):
        inputs = {p: f"*{dtype}" for p in ("sh_ptr", "sw_ptr", "th_ptr", "tw_ptr")}
        for kernel, (mode_name, fp32_ptrs) in kernels.items():
            constexpr_names = (mode_name, "BLOCK_N", "BLOCK_V", "BLOCK_D", "FP32_DOT")
            sig = _signature(kernel, {**inputs, **fp32_ptrs}, constexpr_names)
            for mode in modes:
                specs.append((kernel, sig, {mode_name: mode, "FP32_DOT": False,
                                            **DEFAULT_BLOCKS}))
    return specs
