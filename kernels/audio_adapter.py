"""The audio adapter: encoder frames -> LLM-width embeddings (the Ultravox-style projector).

Per sample, frames [T, E] are stacked k at a time (the tail zero-padded to a multiple of k) into
rows [ceil(T/k), k*E], then

    RMSNorm(k*E) -> Linear(k*E -> H_in) -> activation -> Linear(H -> llm_dim) -> RMSNorm(llm_dim)

with H_in = 2H for SwiGLU (Ultravox's convention: the first half is x, the second the gate,
out = silu(gate) * x) and H_in = H for GELU and ReLU.

`AudioAdapter` is the plain PyTorch module (and, in float64, the test oracle). It computes every
stacked row, including those that lie in the padding, and zeroes them afterwards.
`FusedAudioAdapter` has the same constructor and state-dict names; from per-sample lengths it
packs only the valid stacked rows and runs the Triton kernels on them (CUDA tensors) or the same
packed computation in PyTorch (CPU tensors), scattering into a zero-initialised output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rba_core.kernels.backends import resolve_backend

ACTIVATIONS = ("swiglu", "gelu", "relu")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class AudioAdapterConfig:
    """Shape and options of the adapter.

    encoder_dim: width E of the encoder frames.
    llm_dim: width of the LLM embeddings the adapter produces.
    hidden_dim: width H after the activation; linear_1 outputs 2H for SwiGLU, H otherwise.
        None means llm_dim. (An Ultravox checkpoint whose `hidden_size` is h uses
        hidden_dim = h // 2 with SwiGLU, since there `hidden_size` is linear_1's output width.)
    stack_factor: k, the number of consecutive frames stacked into one row.
    activation: "swiglu", "gelu" (exact, erf-based) or "relu".
    norm_eps: epsilon of both RMSNorms.
    norm_init: initial value of both RMSNorm weights (Ultravox uses 0.4).
    bias: whether linear_1 and linear_2 have biases (Ultravox's have none: bias=False loads
        an Ultravox projector's state dict).
    """

    encoder_dim: int
    llm_dim: int
    hidden_dim: int | None = None
    stack_factor: int = 8
    activation: str = "swiglu"
    norm_eps: float = 1e-6
    norm_init: float = 0.4
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("encoder_dim", "llm_dim", "stack_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"AudioAdapterConfig.{name} must be an integer >= 1, got {value!r}"
                )
        if self.hidden_dim is None:
            self.hidden_dim = self.llm_dim
        if (isinstance(self.hidden_dim, bool) or not isinstance(self.hidden_dim, int)
                or self.hidden_dim < 1):
            raise ValueError(
                f"AudioAdapterConfig.hidden_dim must be an integer >= 1 or None (= llm_dim), "
                f"got {self.hidden_dim!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"AudioAdapterConfig.activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"AudioAdapterConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def stacked_dim(self) -> int:
        return self.encoder_dim * self.stack_factor

    @property
    def linear_1_out(self) -> int:
        return 2 * self.hidden_dim if self.activation == "swiglu" else self.hidden_dim


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in at least float32 (as Llama does)."""

    def __init__(self, dim: int, eps: float, init: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), float(init), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def activate(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        x, gate = u.chunk(2, dim=-1)
        return F.silu(gate) * x
    if activation == "gelu":
        return F.gelu(u)
    return F.relu(u)


def _check_inputs(
    frames: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None, encoder_dim: int,
    param: torch.Tensor,
) -> torch.Tensor:
    """Validate frames [B, T, E] and lengths; return lengths as int64 on frames' device."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(
            f"frames must be a tensor [batch, time, encoder_dim], got {shape}; add a batch "
            f"dimension with frames.unsqueeze(0) for a single sample"
        )
    if frames.shape[-1] != encoder_dim:
        raise ValueError(
            f"frames has width {frames.shape[-1]} but the adapter's encoder_dim is "
            f"{encoder_dim}: pass frames [batch, time, {encoder_dim}] or build the adapter "
            f"with encoder_dim={frames.shape[-1]}"
        )
    if not frames.is_floating_point():
        raise ValueError(f"frames must be a floating-point tensor, got {frames.dtype}")
    if frames.dtype != param.dtype:
        raise ValueError(
            f"frames dtype {frames.dtype} differs from the adapter's parameters ({param.dtype}):"
            f" cast one of them, e.g. frames.to({param.dtype})"
        )
    if frames.device != param.device:
        raise ValueError(
            f"frames are on {frames.device} but the adapter's parameters on {param.device}: "
            f"move them to the same device"
        )
    batch, time = frames.shape[0], frames.shape[1]
    if lengths is None:
        return torch.full((batch,), time, dtype=torch.long, device=frames.device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be an integer tensor (frames per sample), got {lengths.dtype}; "
            f"use lengths.long()"
        )
    if lengths.shape != (batch,):
        raise ValueError(
            f"lengths must have shape [batch] = [{batch}] (one frame count per sample), got "
            f"{tuple(lengths.shape)}"
        )
    lengths = lengths.to(device=frames.device, dtype=torch.long)
    if batch:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0:
            raise ValueError(f"lengths must be >= 0, got a length of {low}")
        if high > time:
            raise ValueError(
                f"lengths must be <= the frames' time dimension ({time}), got a length of "
                f"{high}; pad frames to the longest sample or fix lengths"
            )
    return lengths


def _check_params(
    frames: torch.Tensor, k: int, activation: str, g1: torch.Tensor, w1: torch.Tensor,
    b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, g2: torch.Tensor,
) -> None:
    k1 = frames.shape[-1] * k
    if w2.dim() != 2:
        raise ValueError(f"linear_2 weight must be 2-D [llm_dim, hidden], got {tuple(w2.shape)}")
    d, h = w2.shape
    n1 = 2 * h if activation == "swiglu" else h
    expected = {
        "ln_pre weight": (g1, (k1,)), "linear_1 weight": (w1, (n1, k1)),
        "linear_1 bias": (b1, (n1,)), "linear_2 bias": (b2, (d,)), "ln_post weight": (g2, (d,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {shape} for frames of width "
                f"{frames.shape[-1]}, stack_factor {k}, activation {activation!r} and "
                f"linear_2 weight {tuple(w2.shape)}"
            )
        if tensor is not None and tensor.dtype != frames.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} differs from frames' {frames.dtype}")


class AudioAdapter(nn.Module):
    """Unfused reference: stacks, projects and normalises every row, then zeroes padded rows.

    forward(frames [B, T, E], lengths [B] or None) -> (embeddings [B, ceil(T/k), llm_dim],
    out_lengths [B] = ceil(lengths / k)). Frames at or beyond a sample's length are treated as
    zeros; output rows at or beyond out_lengths are exactly zero.
    """

    def __init__(self, config: AudioAdapterConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.ln_pre = RMSNorm(c.stacked_dim, c.norm_eps, c.norm_init, device=device, dtype=dtype)
        self.linear_1 = nn.Linear(c.stacked_dim, c.linear_1_out, bias=c.bias, device=device,
                                  dtype=dtype)
        self.linear_2 = nn.Linear(c.hidden_dim, c.llm_dim, bias=c.bias, device=device, dtype=dtype)
        self.ln_post = RMSNorm(c.llm_dim, c.norm_eps, c.norm_init, device=device, dtype=dtype)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        k = self.config.stack_factor
        return torch.div(lengths + (k - 1), k, rounding_mode="floor")

    def forward(
        self, frames: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        lengths = _check_inputs(frames, lengths, c.encoder_dim, self.ln_pre.weight)
        batch, time, _ = frames.shape
        k = c.stack_factor
        t_out = math.ceil(time / k)
        valid = torch.arange(time, device=frames.device)[None, :] < lengths[:, None]
        x = torch.where(valid[..., None], frames, frames.new_zeros(()))
        x = F.pad(x, (0, 0, 0, t_out * k - time)).reshape(batch, t_out, k * c.encoder_dim)
        y = self.ln_pre(x)
        y = activate(self.linear_1(y), c.activation)
        y = self.ln_post(self.linear_2(y))
        out_lengths = self.output_lengths(lengths)
        keep = torch.arange(t_out, device=frames.device)[None, :] < out_lengths[:, None]
        return torch.where(keep[..., None], y, y.new_zeros(())), out_lengths


@dataclass
class PackPlan:
    """Where each valid stacked row lives. Offsets count elements of the contiguous tensors."""

    batch: int
    time: int
    t_out: int
    out_lengths: torch.Tensor  # [B] int64
    sample: torch.Tensor       # [M] int64: the row's sample b
    index: torch.Tensor        # [M] int64: the row's position r within the sample
    row_off: torch.Tensor      # [M] int64: (b*T + r*k) * E, start of the row in frames
    row_lim: torch.Tensor      # [M] int32: valid frames of the row * E
    out_off: torch.Tensor      # [M] int64: (b*T_out + r) * D, start of the row in the output
    out_lim: torch.Tensor      # [M] int32: D

    @property
    def rows(self) -> int:
        return int(self.sample.numel())


def pack_plan(
    lengths: torch.Tensor, time: int, stack_factor: int, encoder_dim: int, llm_dim: int,
) -> PackPlan:
    """Index the valid stacked rows (one host sync: the row count sizes the buffers)."""
    k = stack_factor
    t_out = math.ceil(time / k)
    out_lengths = torch.div(lengths + (k - 1), k, rounding_mode="floor")
    positions = torch.arange(t_out, device=lengths.device)
    sample, index = (positions[None, :] < out_lengths[:, None]).nonzero(as_tuple=True)
    valid_frames = torch.clamp(lengths[sample] - index * k, max=k)
    return PackPlan(
        batch=int(lengths.numel()), time=time, t_out=t_out, out_lengths=out_lengths,
        sample=sample, index=index,
        row_off=(sample * time + index * k) * encoder_dim,
        row_lim=(valid_frames * encoder_dim).to(torch.int32),
        out_off=(sample * t_out + index) * llm_dim,
        out_lim=torch.full_like(index, llm_dim, dtype=torch.int32),
    )


def _packed_torch(
    frames: torch.Tensor, plan: PackPlan, k: int, activation: str, eps: float,
    g1: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, g2: torch.Tensor,
) -> torch.Tensor:
    """The packed computation in PyTorch: gathers only the valid rows' frames."""
    batch, time, enc = frames.shape
    d = w2.shape[0]
    steps = torch.arange(k, device=frames.device)
    frame_index = (plan.sample * time + plan.index * k)[:, None] + steps[None, :]
    real = steps[None, :] < (plan.row_lim // enc)[:, None]
    # Tail positions may point past the tensor's end; they are masked, so clamp them in range.
    gathered = frames.reshape(batch * time, enc)[frame_index.clamp(max=batch * time - 1)]
    x = torch.where(real[..., None], gathered, gathered.new_zeros(())).reshape(-1, k * enc)
    y = F.linear(rms_norm(x, g1, eps), w1, b1)
    y = rms_norm(F.linear(activate(y, activation), w2, b2), g2, eps)
    out = frames.new_zeros(batch * plan.t_out, d)
    out = out.index_copy(0, plan.sample * plan.t_out + plan.index, y)
    return out.view(batch, plan.t_out, d)


def _empty(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the kernels fill; tests swap in a NaN-filled allocator to prove each
    element is written."""
    return torch.empty(tuple(shape), device=device, dtype=dtype)


class _TritonAdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, frames, g1, w1, b1, w2, b2, g2, plan, activation, eps):
        from rba_core.kernels import audio_adapter_triton as kt

        frames = frames.contiguous()
        m, d, h = plan.rows, w2.shape[0], w2.shape[1]
        out = frames.new_zeros(plan.batch, plan.t_out, d)
        ctx.plan, ctx.activation, ctx.eps = plan, activation, eps
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        if m == 0:
            ctx.save_for_backward(frames, g1, w1, w2, g2)
            return out
        dev = frames.device
        needs_grad = any(ctx.needs_input_grad[:7])
        a = _empty((m, h), dev, frames.dtype)
        u = _empty((m, w1.shape[0]), dev, torch.float32) if needs_grad else None
        r1 = _empty((m,), dev, torch.float32)
        kt.forward_stack_norm_linear1(frames, plan.row_off, plan.row_lim, g1, w1, b1,
                                      activation, eps, u, a, r1)
        v = _empty((m, d), dev, torch.float32)
        kt.matmul(a, w2.t(), b2, v)
        r2 = _empty((m,), dev, torch.float32)
        kt.postnorm_scatter(v, g2, eps, out, plan.out_off, r2)
        ctx.save_for_backward(frames, g1, w1, w2, g2, u, a, r1, v, r2)
        return out

    @staticmethod
    def backward(ctx, dout):
        from rba_core.kernels import audio_adapter_triton as kt

        plan = ctx.plan
        need = ctx.needs_input_grad
        if plan.rows == 0:
            frames, g1, w1, w2, g2 = ctx.saved_tensors
            zeros = [torch.zeros_like(t) if need[i] and t is not None else None
                     for i, t in enumerate((frames, g1, w1))]
            b1_grad = (w1.new_zeros(w1.shape[0]) if need[3] else None)
            rest = [w2.new_zeros(w2.shape) if need[4] else None,
                    w2.new_zeros(w2.shape[0]) if need[5] else None,
                    torch.zeros_like(g2) if need[6] else None]
            return (*zeros, b1_grad, *rest, None, None, None)
        frames, g1, w1, w2, g2, u, a, r1, v, r2 = ctx.saved_tensors
        dout = dout.contiguous()
        m, d = v.shape
        dev = frames.device
        grads = [None] * 10

        dv = _empty((m, d), dev, w2.dtype)
        kt.postnorm_backward(dout, plan.out_off, plan.out_lim, v, r2, g2, dv)
        if need[6]:
            grads[6] = _empty(g2.shape, dev, g2.dtype)
            kt.norm_weight_grad(v, dout, plan.out_off, plan.out_lim, r2, grads[6])
        if need[4] or need[5]:
            dw2 = _empty(w2.shape, dev, w2.dtype)
            db2 = _empty((d,), dev, w2.dtype) if need[5] else None
            kt.weight_grad(dv, a, dw2, db2)
            grads[4], grads[5] = (dw2 if need[4] else None), db2

        du = _empty((m, w1.shape[0]), dev, w1.dtype)
        kt.matmul(dv, w2, None, du, act_backward=ctx.activation, u=u)
        if need[2] or need[3]:
            dw1 = _empty(w1.shape, dev, w1.dtype)
            db1 = _empty((w1.shape[0],), dev, w1.dtype) if need[3] else None
            kt.weight_grad(du, frames, dw1, db1, gather=(plan.row_off, plan.row_lim, r1, g1))
            grads[2], grads[3] = (dw1 if need[2] else None), db1
        if need[0] or need[1]:
            dy = _empty((m, w1.shape[1]), dev, torch.float32)
            kt.matmul(du, w1, None, dy)
            if need[1]:
                grads[1] = _empty(g1.shape, dev, g1.dtype)
                kt.norm_weight_grad(dy, frames, plan.row_off, plan.row_lim, r1, grads[1])
            if need[0]:
                grads[0] = torch.zeros_like(frames)
                kt.prenorm_backward(dy, frames, plan.row_off, plan.row_lim, r1, g1, grads[0])
        return tuple(grads)


def fused_audio_adapter(
    frames: torch.Tensor,
    lengths: torch.Tensor | Sequence[int] | None,
    ln_pre_weight: torch.Tensor,
    linear_1_weight: torch.Tensor,
    linear_1_bias: torch.Tensor | None,
    linear_2_weight: torch.Tensor,
    linear_2_bias: torch.Tensor | None,
    ln_post_weight: torch.Tensor,
    *,
    stack_factor: int = 8,
    activation: str = "swiglu",
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter as a function of its weights; see `FusedAudioAdapter` for the semantics.

    backend: "auto" (Triton on CUDA tensors, the packed PyTorch path on CPU), "triton" (on CPU
    tensors this needs TRITON_INTERPRET=1 set before Triton is imported) or "torch".
    """
    if isinstance(stack_factor, bool) or not isinstance(stack_factor, int) or stack_factor < 1:
        raise ValueError(f"stack_factor must be an integer >= 1, got {stack_factor!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    # The encoder width the weights were built for: ln_pre normalises k * E features.
    encoder_dim = ln_pre_weight.shape[-1] // stack_factor
    lengths = _check_inputs(frames, lengths, encoder_dim, ln_pre_weight)
    _check_params(frames, stack_factor, activation, ln_pre_weight, linear_1_weight,
                  linear_1_bias, linear_2_weight, linear_2_bias, ln_post_weight)
    backend = resolve_backend(backend, frames.device, choices=("auto", "triton", "torch"),
                              triton_serves=frames.dtype in _TRITON_DTYPES)
    batch, time, enc = frames.shape
    plan = pack_plan(lengths, time, stack_factor, enc, linear_2_weight.shape[0])
    params = (ln_pre_weight, linear_1_weight, linear_1_bias, linear_2_weight, linear_2_bias,
              ln_post_weight)
    if backend == "torch":
        out = _packed_torch(frames, plan, stack_factor, activation, eps, *params)
        return out, plan.out_lengths
    if frames.dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' supports float32, bfloat16 and float16 frames, got "
            f"{frames.dtype}; use backend='torch'"
        )
    out = _TritonAdapterFunction.apply(frames, *params, plan, activation, float(eps))
    return out, plan.out_lengths


class FusedAudioAdapter(AudioAdapter):
    """Drop-in for `AudioAdapter` (same constructor, same state-dict names) that skips padding.

    forward(frames [B, T, E], lengths [B] or None, backend="auto") -> (embeddings
    [B, ceil(T/k), llm_dim], out_lengths [B]). Only the valid stacked rows (ceil(length / k)
    per sample) are computed; the stacking is index arithmetic inside the first kernel's loads;
    rows beyond out_lengths are exactly zero. backend as in `fused_audio_adapter`.
    """

    def forward(
        self, frames: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        _check_inputs(frames, None, c.encoder_dim, self.ln_pre.weight)
        return fused_audio_adapter(
            frames, lengths, self.ln_pre.weight, self.linear_1.weight, self.linear_1.bias,
            self.linear_2.weight, self.linear_2.bias, self.ln_post.weight,
            stack_factor=c.stack_factor, activation=c.activation, eps=c.norm_eps,
            backend=backend,
        )
