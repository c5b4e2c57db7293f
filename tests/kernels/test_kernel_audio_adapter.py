"""The fused audio adapter against the unfused module run in float64.

Tiny shapes (E=24, H=40, llm_dim=36) keep Triton's interpreter fast; T and the lengths are
chosen so that tails are not multiples of k and no dimension is a multiple of a block.
"""
import math

import pytest
import torch

from rba_core.kernels import audio_adapter as aa
from rba_core.kernels import audio_adapter_triton as kt
from rba_core.kernels.audio_adapter import (
    AudioAdapter,
    AudioAdapterConfig,
    FusedAudioAdapter,
    fused_audio_adapter,
)

E, H, D = 24, 40, 36
PARAM_NAMES = ["ln_pre.weight", "linear_1.weight", "linear_1.bias", "linear_2.weight",
               "linear_2.bias", "ln_post.weight"]
# Relative Frobenius error allowed against float64, given the same (dtype-rounded) weights.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _config(activation="swiglu", k=3, bias=True):
    return AudioAdapterConfig(encoder_dim=E, llm_dim=D, hidden_dim=H, stack_factor=k,
                              activation=activation, bias=bias)


def _pair(config, dtype):
    """A fused adapter in `dtype` with random weights, and the reference holding exactly the
    same (rounded) weights in float64."""
    fused = FusedAudioAdapter(config)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "ln_" in name:
                p.copy_(0.4 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    fused = fused.to(dtype)
    ref = AudioAdapter(config).double()
    ref.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    return fused, ref


def _frames(batch, time, lengths, dtype):
    """Random frames whose padding (beyond each length) is NaN: any read of it shows up."""
    x = torch.randn(batch, time, E).to(dtype)
    pad = torch.arange(time)[None, :] >= torch.as_tensor(lengths)[:, None]
    return x.masked_fill(pad[..., None], float("nan"))


def _rel(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _check_against_reference(fused, ref, frames, lengths, dtype, backend, frames_grad=True):
    k = fused.config.stack_factor
    x_fused = frames.clone().requires_grad_(frames_grad)
    x_ref = frames.double().requires_grad_(frames_grad)
    out, out_lengths = fused(x_fused, lengths, backend=backend)
    expected, expected_lengths = ref(x_ref, lengths)

    t_out = math.ceil(frames.shape[1] / k)
    assert out.shape == (frames.shape[0], t_out, D) and out.dtype == dtype
    assert out_lengths.tolist() == [math.ceil(n / k) for n in lengths]
    assert torch.equal(out_lengths, expected_lengths)
    padded = torch.arange(t_out)[None, :] >= out_lengths[:, None]
    assert torch.count_nonzero(out[padded]) == 0, "rows beyond out_lengths must be exactly zero"
    assert torch.isfinite(out).all()
    assert _rel(out, expected) < TOL[dtype]

    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    (out.double() * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert _rel(p.grad, ref_params[name].grad) < TOL[dtype], name
    if frames_grad:
        valid = torch.arange(frames.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
        assert torch.count_nonzero(x_fused.grad[~valid]) == 0, "padding frames get no gradient"
        assert _rel(x_fused.grad[valid], x_ref.grad[valid]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_triton_matches_float64_reference(activation, dtype):
    fused, ref = _pair(_config(activation, k=3), dtype)
    lengths = [13, 5, 1]
    frames = _frames(3, 13, lengths, dtype)
    _check_against_reference(fused, ref, frames, lengths, dtype, backend="triton")


def test_triton_float16_runs_the_same_kernels():
    fused, ref = _pair(_config("swiglu", k=3), torch.float16)
    lengths = [8, 13]
    frames = _frames(2, 13, lengths, torch.float16)
    _check_against_reference(fused, ref, frames, lengths, torch.float16, backend="triton")


def test_triton_stack_8_without_bias_frozen_frames_and_empty_sample():
    """Ultravox's layout (k=8, no biases); a zero-length sample, one exactly one row long, and
    frames that need no gradient (a frozen encoder)."""
    fused, ref = _pair(_config("swiglu", k=8, bias=False), torch.float32)
    assert sorted(fused.state_dict()) == ["linear_1.weight", "linear_2.weight",
                                          "ln_post.weight", "ln_pre.weight"]
    lengths = [21, 0, 8]
    frames = _frames(3, 21, lengths, torch.float32)
    _check_against_reference(fused, ref, frames, lengths, torch.float32, backend="triton",
                             frames_grad=False)


def test_triton_accepts_non_contiguous_frames():
    fused, ref = _pair(_config("gelu", k=3), torch.float32)
    lengths = [7, 10]
    frames = _frames(2, 10, lengths, torch.float32).transpose(0, 1).contiguous().transpose(0, 1)
    assert not frames.is_contiguous()
    _check_against_reference(fused, ref, frames, lengths, torch.float32, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_packed_torch_path_matches_reference(backend):
    fused, ref = _pair(_config("swiglu", k=3), torch.float32)
    lengths = [13, 5, 1]
    frames = _frames(3, 13, lengths, torch.float32)
    _check_against_reference(fused, ref, frames, lengths, torch.float32, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_lengths_zero_gives_zeros_and_zero_gradients(backend):
    fused, _ = _pair(_config("relu", k=3), torch.float32)
    frames = torch.randn(2, 5, E, requires_grad=True)
    out, out_lengths = fused(frames, torch.tensor([0, 0]), backend=backend)
    assert out.shape == (2, 2, D) and torch.count_nonzero(out) == 0
    assert out_lengths.tolist() == [0, 0]
    out.sum().backward()
    assert torch.count_nonzero(frames.grad) == 0
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_kernels_write_every_element_of_poisoned_buffers(activation, monkeypatch):
    """Every intermediate and gradient buffer starts as NaN; after forward and backward none
    may hold a NaN, and the results must still match the reference."""
    allocated = []

    def poisoned(shape, device, dtype):
        buf = torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)
        allocated.append(buf)
        return buf

    monkeypatch.setattr(aa, "_empty", poisoned)
    fused, ref = _pair(_config(activation, k=3), torch.float32)
    lengths = [11, 4, 9]
    frames = _frames(3, 11, lengths, torch.float32)
    _check_against_reference(fused, ref, frames, lengths, torch.float32, backend="triton")
    # a, u, r1, v, r2 in the forward; dv, dg2, dw2, db2, du, dw1, db1, dy, dg1 in the backward.
    assert len(allocated) == 14
    for buf in allocated:
        assert not torch.isnan(buf).any(), tuple(buf.shape)


def test_output_scatter_leaves_padded_rows_untouched():
    """The post-norm kernel writes exactly the valid rows of the output and nothing else."""
    lengths = torch.tensor([7, 2, 0, 9])
    plan = aa.pack_plan(lengths, time=9, stack_factor=4, encoder_dim=E, llm_dim=D)
    v = torch.randn(plan.rows, D)
    g2 = torch.rand(D) + 0.5
    out = torch.full((4, plan.t_out, D), float("nan"))
    r2 = torch.full((plan.rows,), float("nan"))
    kt.postnorm_scatter(v, g2, 1e-6, out, plan.out_off, r2)
    valid = torch.arange(plan.t_out)[None, :] < plan.out_lengths[:, None]
    assert plan.out_lengths.tolist() == [2, 1, 0, 3] and plan.rows == 6
    assert torch.isnan(out[~valid]).all()
    expected = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * g2
    assert _rel(out[valid], expected) < 1e-6
    assert _rel(r2, torch.rsqrt(v.pow(2).mean(-1) + 1e-6)) < 1e-6


def test_state_dict_interchange():
    config = _config("swiglu", k=3)
    ref = AudioAdapter(config)
    fused = FusedAudioAdapter(config)
    assert list(ref.state_dict()) == list(fused.state_dict()) == PARAM_NAMES
    for norm in (ref.ln_pre.weight, ref.ln_post.weight):
        assert torch.all(norm == 0.4)
    assert ref.linear_1.weight.shape == (2 * H, 3 * E)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused.load_state_dict(ref.state_dict(), strict=True)
    back = AudioAdapter(config)
    back.load_state_dict(fused.state_dict(), strict=True)
    lengths = [13, 5, 1]
    frames = torch.randn(3, 13, E)
    expected, _ = ref(frames, lengths)
    assert torch.allclose(fused(frames, lengths)[0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(back(frames, lengths)[0], expected)


def test_config_defaults():
    config = AudioAdapterConfig(encoder_dim=E, llm_dim=D)
    assert (config.hidden_dim, config.stack_factor, config.activation) == (D, 8, "swiglu")
    assert (config.norm_eps, config.norm_init) == (1e-6, 0.4)
    assert AudioAdapter(config).linear_1.weight.shape == (2 * D, 8 * E)
    gelu = AudioAdapter(AudioAdapterConfig(encoder_dim=E, llm_dim=D, activation="gelu"))
    assert gelu.linear_1.weight.shape == (D, 8 * E)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="tanh"), "activation must be one of swiglu, gelu, relu"),
        (dict(stack_factor=0), "stack_factor must be an integer >= 1"),
        (dict(stack_factor=-2), "stack_factor must be an integer >= 1"),
        (dict(hidden_dim=0), "hidden_dim must be an integer >= 1"),
        (dict(norm_eps=0.0), "norm_eps must be > 0"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    base = dict(encoder_dim=E, llm_dim=D)
    with pytest.raises(ValueError, match=match) as raised:
        AudioAdapterConfig(**{**base, **kwargs})
    # kernels/ is embedded without the rest of rba_core: no rba_core error types.
    assert type(raised.value) is ValueError


@pytest.mark.parametrize("module", [AudioAdapter, FusedAudioAdapter])
@pytest.mark.parametrize(
    "frames, lengths, match",
    [
        (torch.randn(2, 6, E + 1), None, r"width 25 but the adapter's encoder_dim is 24"),
        (torch.randn(6, E), None, r"frames must be a tensor \[batch, time, encoder_dim\]"),
        (torch.randn(2, 6, E), torch.tensor([6, 7]), r"lengths must be <= .* \(6\)"),
        (torch.randn(2, 6, E), torch.tensor([3, -1]), "lengths must be >= 0"),
        (torch.randn(2, 6, E), torch.tensor([6]), r"lengths must have shape \[batch\] = \[2\]"),
        (torch.randn(2, 6, E), torch.tensor([6.0, 2.0]), "lengths must be an integer tensor"),
        (torch.randn(2, 6, E).double(), None, "frames dtype torch.float64 differs"),
    ],
)
def test_bad_input_is_rejected(module, frames, lengths, match):
    adapter = module(_config("swiglu", k=3))
    with pytest.raises(ValueError, match=match):
        adapter(frames, lengths)


def test_bad_backend_and_weights_are_rejected():
    fused = FusedAudioAdapter(_config("relu", k=3))
    frames = torch.randn(1, 4, E)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch"):
        fused(frames, backend="cuda")
    weights = [p.detach() for p in fused.parameters()]
    with pytest.raises(ValueError, match=r"linear_1 weight has shape \(40, 72\), expected \(80, 72\)"):
        fused_audio_adapter(frames, None, *weights, stack_factor=3, activation="swiglu")
    with pytest.raises(ValueError, match="stack_factor must be an integer >= 1"):
        fused_audio_adapter(frames, None, *weights, stack_factor=0, activation="relu")


def test_compile_specs_cover_every_kernel():
    """compile_check compiles these specs for sm_80/sm_90; each kernel must appear, with a
    signature naming every argument and a value for every constexpr."""
    specs = kt.compile_specs()
    kernels = {name for name in dir(kt)
               if name.endswith("_kernel") and hasattr(getattr(kt, name), "arg_names")}
    assert {spec[0].__name__ for spec in specs} == kernels
    for kernel, signature, constexprs in specs:
        assert list(signature) == kernel.arg_names
        assert {n for n, t in signature.items() if t == "constexpr"} == set(constexprs)
