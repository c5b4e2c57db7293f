"""Fused linear distillation loss: a student LM head against a teacher LM head, no [N, V] logits.

    from rba_core.kernels import fused_linear_distill_loss

    loss = fused_linear_distill_loss(student_hidden, student_lm_head.weight,
                                     teacher_hidden, teacher_lm_head.weight,
                                     mask, kind="forward_kl", temperature=2.0)
    loss.backward()   # gradients reach student_hidden and the student weight only

The teacher is a constant: its tensors are detached, so a teacher whose parameters still have
requires_grad=True gets no gradient and keeps no graph alive.

On the native CPU backend with reduction "mean" or "sum" (every kind), when a gradient is
needed, the loss is a scalar, so the C++ op computes the student's gradients in the forward pass
itself, one chunk of rows at a time (_DistillFusedLoss): eager PyTorch's GEMM count, no
recompute. The autograd backward only scales the stored gradients.
"""
from __future__ import annotations

import torch

from rba_core.kernels import linear_distill_reference as _reference
from rba_core.kernels._checks import (check_choice, check_float_tensor, check_mask,
                                      check_positive, check_same_device)
from rba_core.kernels.backends import backend_module, resolve_backend

KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, kind,
                  jsd_beta, temperature, reduction) -> torch.Tensor | None:
    """Validates the tensors and options (the backend is resolved apart); returns the mask as
    bool (or None)."""
    named = {"student_hidden": student_hidden, "student_weight": student_weight,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    for name, t in named.items():
        check_float_tensor(name, t, _FLOAT_DTYPES)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_positive("temperature", temperature)
    if kind == "jsd" and (isinstance(jsd_beta, bool) or not isinstance(jsd_beta, (int, float))
                          or not 0.0 < jsd_beta < 1.0):
        raise ValueError(f"jsd_beta={jsd_beta!r} must lie strictly between 0 and 1 for "
                         "kind='jsd' (0 or 1 makes the divergence identically zero)")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} and teacher_weight "
                         f"{tuple(teacher_weight.shape)} must both be LM heads [V, D]")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: student_weight has V={student_weight.shape[0]} rows, "
            f"teacher_weight V={teacher_weight.shape[0]}; distillation compares distributions "
            "over one shared vocabulary, so both LM heads must have the same V (pad or slice "
            "the teacher's head to the student's tokenizer)")
    if student_weight.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary (V = 0)")
    if student_hidden.dim() not in (2, 3) or teacher_hidden.dim() != student_hidden.dim():
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must both be [N, D] or [B, T, D]")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must cover the same tokens (equal "
                         "leading dimensions)")
    for who, hidden, weight in (("student", student_hidden, student_weight),
                                ("teacher", teacher_hidden, teacher_weight)):
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{who}_hidden width {hidden.shape[-1]} != {who}_weight width "
                             f"{weight.shape[1]}; the weight is [V, D] as nn.Linear stores it")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        listing = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"dtype mix ({listing}): all four tensors must share one dtype; cast "
                        "the teacher's, e.g. teacher_hidden.to(student_hidden.dtype)")
    check_same_device(**named)
    return check_mask(mask, student_hidden.shape[:-1], student_hidden.device)


class _DistillRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, backend, temperature, kind,
                jsd_beta):
        loss_rows, s_lse, t_lse = backend.distill_forward(
            s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta)
        ctx.save_for_backward(s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse)
        ctx.backend, ctx.temperature, ctx.kind, ctx.jsd_beta = backend, temperature, kind, jsd_beta
        return loss_rows.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_rows):
        s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse = ctx.saved_tensors
        grad_h, grad_w = ctx.backend.distill_backward(
            s_hidden, s_weight, t_hidden, t_weight, ctx.temperature, ctx.kind, ctx.jsd_beta,
            s_lse, t_lse, grad_rows.to(torch.float32).contiguous(), ctx.needs_input_grad[1])
        if not ctx.needs_input_grad[0]:
            grad_h = None
        return grad_h, grad_w, None, None, None, None, None, None


class _DistillFusedLoss(torch.autograd.Function):
    """grad_scale * sum(loss_rows) with the gradients computed in the forward (native CPU op).

    The stored gradients are handed over, scaled by grad_loss, on the first backward; a later
    backward through a retained graph recomputes them from the saved log-sum-exps.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, backend, temperature, kind,
                jsd_beta, grad_scale):
        loss_rows, s_lse, t_lse, grad_h, grad_w = backend.distill_fused(
            s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, grad_scale,
            ctx.needs_input_grad[1])
        ctx.save_for_backward(s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse)
        ctx.stored = (grad_h, grad_w)
        ctx.backend, ctx.temperature, ctx.kind, ctx.jsd_beta = backend, temperature, kind, jsd_beta
        ctx.grad_scale = grad_scale
        return loss_rows.to(torch.float32).sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_loss):
        # Handing the stored tensors over (not copies) keeps peak memory at the gradients'
        # size; so they serve one backward only.
        stored, ctx.stored = ctx.stored, None
        if stored is not None:
            grad_h, grad_w = stored
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
                grad_w = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype))
        else:
            s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse = ctx.saved_tensors
            grad_rows = (grad_loss.to(torch.float32) * ctx.grad_scale).expand(s_lse.shape)
            grad_h, grad_w = ctx.backend.distill_backward(
                s_hidden, s_weight, t_hidden, t_weight, ctx.temperature, ctx.kind,
                ctx.jsd_beta, s_lse, t_lse, grad_rows.contiguous(), ctx.needs_input_grad[1])
        if not ctx.needs_input_grad[0]:
            grad_h = None
        if not ctx.needs_input_grad[1]:
            grad_w = None
        return grad_h, grad_w, None, None, None, None, None, None, None


def _rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if keep is not None:
        flat = flat[keep]
    return flat.contiguous()


def fused_linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                              mask: torch.Tensor | None = None, *, kind: str = "forward_kl",
                              jsd_beta: float = 0.5, temperature: float = 2.0,
                              reduction: str = "mean",
                              scale_by_temperature_squared: bool = False,
                              backend: str = "auto") -> torch.Tensor:
    """Distillation loss between softmax(h_S W_S^T / T) and softmax(h_T W_T^T / T), fused.

    student_hidden [N, Ds] or [B, T, Ds], student_weight [V, Ds]; teacher_hidden [N, Dt] or
    [B, T, Dt], teacher_weight [V, Dt]: the widths may differ, the vocabulary V must match.
    mask (bool, the hidden states' leading shape): True marks tokens that count; the others
    are removed before any compute.

    kind: "forward_kl" KL(P_T||P_S), "reverse_kl" KL(P_S||P_T), or "jsd"
    beta KL(P_T||M) + (1-beta) KL(P_S||M) with M = beta P_T + (1-beta) P_S, 0 < jsd_beta < 1.
    reduction: "mean" over counted tokens (0 when none count), "sum", or "none" (float32 per
    token in the hidden states' leading shape, 0 at masked tokens).
    scale_by_temperature_squared multiplies by T**2, which keeps gradient magnitudes
    comparable across temperatures (Hinton et al.).
    backend: "auto" (Triton on CUDA, the native C++ op on CPU when built, else PyTorch),
    or force "triton", "native" or "torch".

    Gradients flow to student_hidden and student_weight only; the teacher is detached.
    """
    mask = _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                         kind, jsd_beta, temperature, reduction)
    impl = backend_module(resolve_backend(backend, student_hidden.device),
                          triton="rba_core.kernels.linear_distill_triton",
                          torch_fallback="rba_core.kernels.linear_distill_reference")
    keep = None if mask is None else mask.reshape(-1)
    s_rows = _rows(student_hidden, keep)
    t_rows = _rows(teacher_hidden.detach(), keep)
    if s_rows.shape[0] == 0:
        # Nothing counts: the PyTorch path returns the empty rows without launching anything.
        impl = _reference
    fused = (reduction != "none" and hasattr(impl, "distill_fused")
             and torch.is_grad_enabled()
             and (s_rows.requires_grad or student_weight.requires_grad))
    if fused:
        grad_scale = float(temperature) ** 2 if scale_by_temperature_squared else 1.0
        if reduction == "mean":
            grad_scale /= s_rows.shape[0]
        return _DistillFusedLoss.apply(s_rows, student_weight.contiguous(), t_rows,
                                       teacher_weight.detach().contiguous(), impl,
                                       float(temperature), kind, float(jsd_beta), grad_scale)
    loss_rows = _DistillRows.apply(s_rows, student_weight.contiguous(), t_rows,
                                   teacher_weight.detach().contiguous(), impl,
                                   float(temperature), kind, float(jsd_beta))
    if scale_by_temperature_squared:
        loss_rows = loss_rows * float(temperature) ** 2
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.sum() / max(loss_rows.shape[0], 1)
    lead = student_hidden.shape[:-1]
    if keep is None:
        return loss_rows.reshape(lead)
    full = loss_rows.new_zeros(keep.shape[0]).masked_scatter(keep, loss_rows)
    return full.reshape(lead)
