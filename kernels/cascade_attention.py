"""Cascade (bifurcated) attention: G samples' queries over one shared prefix plus own suffixes.

A group of G samples continues the same prompt. Their keys and values split into the prompt's
(stored once per prompt) and each sample's own suffix. Attention over the concatenation equals
two partial attentions merged through their log-sum-exp: the prefix part is computed once per
group, with the G samples' queries stacked as extra rows, so the prompt's K/V are read once per
group instead of G times.

    out = cascade_attention(q, prefix_k, prefix_v, prefix_lens,
                            suffix_k, suffix_v, suffix_lens, sample_prompt)

Shapes (S samples, B prompts, Hq query heads, Hkv key/value heads, D head size):
- ``q`` [S, Tq, Hq, D]: the last Tq query positions of each sample's suffix.
- ``prefix_k``, ``prefix_v`` [B, Hkv, P, D]; ``prefix_lens`` [B]: valid keys per prompt
  (ragged prompts are right-padded).
- ``suffix_k``, ``suffix_v`` [R, Hkv, T, D]: suffix storage rows; ``sample_rows`` [S] says which
  row belongs to each sample (default: row s). ``suffix_lens`` [S]: valid suffix keys, the
  current queries included; query t of sample s sits at suffix position
  ``suffix_lens[s] - Tq + t`` and sees the suffix causally up to it (and the whole prefix).
- ``sample_prompt`` [S]: the prompt each sample continues, non-decreasing (samples of one
  prompt are contiguous; finished samples may be dropped, so groups can be ragged).

Returns [S, Tq, Hq, D] in q's dtype. Backends: ``"triton"`` (decode step, Tq == 1, no
autograd; on CPU tensors it needs TRITON_INTERPRET=1), ``"torch"`` (any Tq, differentiable),
``"auto"`` (Triton for CUDA decode steps without autograd, else torch).
"""
from __future__ import annotations

import math

import torch

from rba_core.kernels.backends import resolve_backend

__all__ = ["cascade_attention", "cascade_attention_reference", "attention_reference"]


def _check_inputs(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                  sample_prompt, sample_rows) -> None:
    if q.dim() != 4:
        raise ValueError(f"cascade_attention: q must be [S, Tq, Hq, D], got shape {tuple(q.shape)}")
    if prefix_k.dim() != 4 or prefix_k.shape != prefix_v.shape:
        raise ValueError(
            "cascade_attention: prefix_k and prefix_v must both be [B, Hkv, P, D], got "
            f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    if suffix_k.dim() != 4 or suffix_k.shape != suffix_v.shape:
        raise ValueError(
            "cascade_attention: suffix_k and suffix_v must both be [R, Hkv, T, D], got "
            f"{tuple(suffix_k.shape)} and {tuple(suffix_v.shape)}"
        )
    S, _, Hq, D = q.shape
    B, Hkv, _, Dk = prefix_k.shape
    if Dk != D or suffix_k.shape[3] != D:
        raise ValueError(
            f"cascade_attention: head size differs: q has {D}, prefix {Dk}, "
            f"suffix {suffix_k.shape[3]}"
        )
    if suffix_k.shape[1] != Hkv:
        raise ValueError(
            f"cascade_attention: prefix has {Hkv} key/value heads but suffix has "
            f"{suffix_k.shape[1]}"
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"cascade_attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})"
        )
    for name, t, n in (("prefix_lens", prefix_lens, B), ("suffix_lens", suffix_lens, S),
                       ("sample_prompt", sample_prompt, S)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"cascade_attention: {name} must be 1-D of length {n}, got {tuple(t.shape)}"
            )
    if sample_rows is not None and (sample_rows.dim() != 1 or sample_rows.shape[0] != S):
        raise ValueError(
            f"cascade_attention: sample_rows must be 1-D of length {S}, got "
            f"{tuple(sample_rows.shape)}"
        )
    if q.dtype != prefix_k.dtype or q.dtype != suffix_k.dtype:
        raise ValueError(
            f"cascade_attention: q, prefix and suffix must share a dtype, got {q.dtype}, "
            f"{prefix_k.dtype}, {suffix_k.dtype}"
        )


def cascade_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    sample_prompt: torch.Tensor,
    sample_rows: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    max_group: int | None = None,
    group_starts: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of each sample's queries over its prompt's prefix and its own suffix.

    ``max_group`` bounds the number of samples of one prompt; ``group_starts`` [B + 1] (the
    first sample of each prompt, then S) may be passed when already known. Passing both keeps
    the call free of device syncs (needed for CUDA-graph capture).
    Every prompt needs at least one prefix key (``prefix_lens >= 1``) and every sample
    ``suffix_lens >= Tq``; these are not checked on the device to keep the decode step sync-free.
    """
    _check_inputs(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                  sample_prompt, sample_rows)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if sample_rows is None:
        sample_rows = torch.arange(q.shape[0], device=q.device)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, prefix_k, prefix_v, suffix_k, suffix_v)
    )
    backend = resolve_backend(backend, q.device, choices=("auto", "triton", "torch"),
                              triton_serves=q.shape[1] == 1 and not needs_grad)
    if backend == "triton":
        if q.shape[1] != 1:
            raise ValueError(
                f"cascade_attention: the Triton kernel serves decode steps (Tq == 1), got Tq = "
                f"{q.shape[1]}; use backend='torch' for multi-token queries"
            )
        if needs_grad:
            raise ValueError(
                "cascade_attention: the Triton kernel has no backward; use backend='torch' "
                "(or torch.no_grad()) when gradients are needed"
            )
        from rba_core.kernels import cascade_attention_triton

        if max_group is None:
            max_group = int(torch.bincount(sample_prompt, minlength=prefix_k.shape[0]).max())
        return cascade_attention_triton.cascade_decode(
            q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
            sample_prompt, sample_rows, scale=scale, max_group=max_group,
            group_starts=group_starts,
        )
    return cascade_attention_reference(
        q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_prompt,
        sample_rows, scale=scale, max_group=max_group,
    )


def cascade_attention_reference(
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
    max_group: int | None = None,
) -> torch.Tensor:
    """The PyTorch path: prefix attention batched per group, suffix per sample, merged.

    Differentiable. Accumulates in float32 (float64 for float64 inputs).
    """
    S, Tq, Hq, D = q.shape
    B, Hkv, P, _ = prefix_k.shape
    rep = Hq // Hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    # The scale goes on the (small) queries once instead of on every score matrix.
    qs = (q.to(acc_dtype) * scale).reshape(S, Tq, Hkv, rep, D)
    # With S == B * max_group every group is full (no group exceeds max_group), so samples
    # already form a dense [B, G] grid; otherwise scatter them into one. Either way one batched
    # matmul per prompt reads its prefix once for all of its samples.
    full = max_group is not None and S == B * max_group
    if full and Tq == 1:
        return _decode_full_groups(qs, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                   suffix_lens, sample_rows, max_group).to(q.dtype)
    if full:
        G = max_group
        dense = qs.reshape(B, G, Tq, Hkv, rep, D)
    else:
        counts = torch.bincount(sample_prompt, minlength=B)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(S, device=dev) - starts[sample_prompt]
        G = int(counts.max()) if max_group is None else max_group
        dense = qs.new_zeros(B, G, Tq, Hkv, rep, D).index_put((sample_prompt, slot), qs)
    qd = dense.permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, G * Tq * rep, D)
    s_p = qd @ prefix_k.to(acc_dtype).transpose(-1, -2)
    p_masked = torch.arange(P, device=dev)[None, :] >= prefix_lens[:, None]
    s_p = s_p.masked_fill(p_masked[:, None, None, :], float("-inf"))
    # The running maxima only stabilise exp(); the result does not depend on them, so they
    # carry no gradient (this also keeps fully masked rows free of NaN gradients).
    m_p = s_p.amax(-1, keepdim=True).detach()
    e_p = torch.exp(s_p - m_p)
    # One regrouping to per-sample layout for the whole partial state [acc | sum | max].
    state = torch.cat([e_p @ prefix_v.to(acc_dtype), e_p.sum(-1, keepdim=True), m_p], dim=-1)
    state = state.reshape(B, Hkv, G, Tq, rep, D + 2).permute(0, 2, 1, 3, 4, 5)
    state = state.reshape(S, Hkv, Tq, rep, D + 2) if full else state[sample_prompt, slot]
    state = state.reshape(S, Hkv, Tq * rep, D + 2)
    acc_p, l_p, m_p = state[..., :D], state[..., D:D + 1], state[..., D + 1:]

    ks = suffix_k.index_select(0, sample_rows).to(acc_dtype)
    vs = suffix_v.index_select(0, sample_rows).to(acc_dtype)
    T = ks.shape[2]
    qq = qs.permute(0, 2, 1, 3, 4).reshape(S, Hkv, Tq * rep, D)
    s_s = qq @ ks.transpose(-1, -2)
    key_index = torch.arange(T, device=dev)
    if Tq == 1:
        hidden_keys = (key_index[None, :] >= suffix_lens[:, None])[:, None, None, :]
    else:
        q_pos = suffix_lens[:, None] - Tq + torch.arange(Tq, device=dev)[None, :]
        hidden_keys = key_index[None, None, :] > q_pos[:, :, None]
        hidden_keys = hidden_keys[:, :, None, :].expand(S, Tq, rep, T).reshape(S, 1, Tq * rep, T)
    s_s = s_s.masked_fill(hidden_keys, float("-inf"))
    m = torch.maximum(m_p, s_s.amax(-1, keepdim=True).detach())
    e_s = torch.exp(s_s - m)
    w_p = torch.exp(m_p - m)
    out = (acc_p * w_p + e_s @ vs) / (l_p * w_p + e_s.sum(-1, keepdim=True))
    out = out.reshape(S, Hkv, Tq, rep, D).permute(0, 2, 1, 3, 4).reshape(S, Tq, Hq, D)
    return out.to(q.dtype)


def _decode_full_groups(qs, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                        sample_rows, G: int) -> torch.Tensor:
    """Decode step (one query per sample) with every group full: the prefix and suffix scores
    of a group sit side by side in one [G * rep, P + T] block per (prompt, kv head), so a
    single softmax replaces the two partial ones and their merge (half the ops of the general
    path; this runs once per layer and step). ``qs`` is [S, 1, Hkv, rep, D], scaled."""
    S, _, Hkv, rep, D = qs.shape
    B, _, P, _ = prefix_k.shape
    dev = qs.device
    acc_dtype = qs.dtype
    qd = qs.reshape(B, G, Hkv, rep, D).transpose(1, 2).reshape(B, Hkv, G * rep, D)
    s_p = qd @ prefix_k.to(acc_dtype).transpose(-1, -2)
    s_p = s_p.masked_fill((torch.arange(P, device=dev)[None, :] >= prefix_lens[:, None])
                          [:, None, None, :], float("-inf"))
    ks = suffix_k.index_select(0, sample_rows).to(acc_dtype)
    vs = suffix_v.index_select(0, sample_rows).to(acc_dtype)
    T = ks.shape[2]
    s_s = qs.reshape(S, Hkv, rep, D) @ ks.transpose(-1, -2)
    s_s = s_s.masked_fill((torch.arange(T, device=dev)[None, :] >= suffix_lens[:, None])
                          [:, None, None, :], float("-inf"))
    s_s = s_s.reshape(B, G, Hkv, rep, T).transpose(1, 2).reshape(B, Hkv, G * rep, T)
    probs = torch.softmax(torch.cat([s_p, s_s], dim=-1), dim=-1)
    out_p = probs[..., :P] @ prefix_v.to(acc_dtype)
    p_s = probs[..., P:].reshape(B, Hkv, G, rep, T).transpose(1, 2).reshape(S, Hkv, rep, T)
    out = out_p.reshape(B, Hkv, G, rep, D).transpose(1, 2).reshape(S, Hkv, rep, D) + p_s @ vs
    return out.reshape(S, 1, Hkv * rep, D)


def attention_reference(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    sample_prompt: torch.Tensor,
    sample_rows: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain attention over each sample's own concatenated [prefix; suffix] K/V (the oracle).

    Loops over samples and materialises the concatenation, so it is slow and exact; tests run
    it in float64.
    """
    S, Tq, Hq, D = q.shape
    Hkv = prefix_k.shape[1]
    rep = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if sample_rows is None:
        sample_rows = torch.arange(S, device=q.device)
    outs = []
    for s in range(S):
        b = int(sample_prompt[s])
        pl, sl, row = int(prefix_lens[b]), int(suffix_lens[s]), int(sample_rows[s])
        k = torch.cat([prefix_k[b, :, :pl], suffix_k[row, :, :sl]], dim=1)
        v = torch.cat([prefix_v[b, :, :pl], suffix_v[row, :, :sl]], dim=1)
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        qh = q[s].transpose(0, 1)
        scores = (qh @ k.transpose(-1, -2)) * scale
        key_pos = torch.arange(pl + sl, device=q.device)
        q_pos = pl + sl - Tq + torch.arange(Tq, device=q.device)
        scores = scores.masked_fill(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        outs.append((torch.softmax(scores, dim=-1) @ v).transpose(0, 1))
    return torch.stack(outs)
