"""Fused linear distillation loss: Triton (interpreter) and PyTorch backends vs a float64 oracle.

The oracle is `linear_distill_reference.distill_forward` run in float64, and its gradients come
from autograd, independent of the hand-written derivatives in the backends.
"""
from __future__ import annotations

import functools

import pytest
import torch

from rba_core.kernels import fused_linear_distill_loss
from rba_core.kernels import backends
from rba_core.kernels import linear_distill_reference as ref
from rba_core.kernels import linear_distill_triton as tri
from rba_core.kernels import native
from rba_core.kernels.backends import BackendError

N, DS, DT, V = 29, 40, 24, 157
# Small tiles so every dimension has a ragged last block (29 rows, 157 columns, 40/24 wide).
BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 32}
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
KIND_IDS = ["fkl", "rkl", "jsd0.1", "jsd0.5", "jsd0.9"]


def _backend(name: str):
    if name == "triton":
        return (functools.partial(tri.distill_forward, blocks=BLOCKS),
                functools.partial(tri.distill_backward, blocks=BLOCKS))
    # chunk_rows=7 makes the fallback walk several ragged row chunks.
    return (functools.partial(ref.distill_forward, chunk_rows=7),
            functools.partial(ref.distill_backward, chunk_rows=7))


def _inputs(dtype, n=N, ds=DS, dt=DT, v=V):
    # Weight scale keeps logits around unit size so both distributions are far from uniform
    # and far from one-hot, which is where a wrong derivative shows.
    sh = torch.randn(n, ds).to(dtype)
    sw = (0.25 * torch.randn(v, ds)).to(dtype)
    th = torch.randn(n, dt).to(dtype)
    tw = (0.3 * torch.randn(v, dt)).to(dtype)
    return sh, sw, th, tw


def _oracle(sh, sw, th, tw, temperature, kind, beta, grad_rows):
    s64 = sh.double().requires_grad_(True)
    w64 = sw.double().requires_grad_(True)
    loss, s_lse, t_lse = ref.distill_forward(s64, w64, th.double(), tw.double(), temperature,
                                             kind, beta)
    (loss * grad_rows.double()).sum().backward()
    return loss.detach(), s_lse.detach(), t_lse.detach(), s64.grad, w64.grad


def _close(actual, expected, dtype, name):
    actual = actual.double()
    scale = expected.abs().max().item() + 1e-12
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale + 1e-7, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backend_matches_float64_oracle(backend, kind, beta, dtype):
    fwd, bwd = _backend(backend)
    temperature = 1.7
    sh, sw, th, tw = _inputs(dtype)
    grad_rows = torch.rand(N) + 0.5
    loss, s_lse, t_lse = fwd(sh, sw, th, tw, temperature, kind, beta)
    o_loss, o_slse, o_tlse, o_gh, o_gw = _oracle(sh, sw, th, tw, temperature, kind, beta,
                                                 grad_rows)
    assert loss.dtype == s_lse.dtype == t_lse.dtype == torch.float32
    # Row losses and lses are accumulated in fp32 from exactly the same (rounded) inputs, so
    # they are tight in both dtypes.
    _close(loss, o_loss, torch.float32, "loss")
    _close(s_lse, o_slse, torch.float32, "s_lse")
    _close(t_lse, o_tlse, torch.float32, "t_lse")
    gh, gw = bwd(sh, sw, th, tw, temperature, kind, beta, s_lse, t_lse, grad_rows, True)
    assert gh.dtype == dtype and gh.shape == sh.shape
    assert gw.dtype == dtype and gw.shape == sw.shape
    _close(gh, o_gh, dtype, "grad_hidden")
    _close(gw, o_gw, dtype, "grad_weight")


@pytest.mark.parametrize("kind,beta", KINDS[:3], ids=KIND_IDS[:3])
def test_public_masked_ragged_batch_matches_oracle(kind, beta):
    b, t = 3, 11
    lengths = torch.tensor([11, 4, 8])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    sh = torch.randn(b, t, DS)
    th = torch.randn(b, t, DT)
    sw = 0.25 * torch.randn(V, DS)
    tw = 0.3 * torch.randn(V, DT)
    s_leaf, w_leaf = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    per_token = fused_linear_distill_loss(s_leaf, w_leaf, th, tw, mask, kind=kind, jsd_beta=beta,
                                          temperature=0.9, reduction="none", backend="triton")
    weights = torch.rand(b, t)
    (per_token * weights).sum().backward()

    s64 = sh.double().requires_grad_(True)
    w64 = sw.double().requires_grad_(True)
    rows, _, _ = ref.distill_forward(s64.reshape(-1, DS), w64, th.double().reshape(-1, DT),
                                     tw.double(), 0.9, kind, beta)
    expected = rows.reshape(b, t) * mask
    (expected * weights.double()).sum().backward()

    assert per_token.shape == (b, t) and per_token.dtype == torch.float32
    assert torch.all(per_token[~mask] == 0)
    _close(per_token, expected.detach(), torch.float32, "per_token")
    _close(s_leaf.grad, s64.grad, torch.float32, "grad_hidden")
    assert torch.all(s_leaf.grad[~mask] == 0)
    _close(w_leaf.grad, w64.grad, torch.float32, "grad_weight")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_rows_are_never_computed(backend):
    b, t = 2, 9
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 3:] = False
    sh, th = torch.randn(b, t, DS), torch.randn(b, t, DT)
    sw, tw = 0.25 * torch.randn(V, DS), 0.3 * torch.randn(V, DT)
    poisoned_s, poisoned_t = sh.clone(), th.clone()
    poisoned_s[~mask] = float("nan")
    poisoned_t[~mask] = float("inf")
    clean = fused_linear_distill_loss(sh, sw, th, tw, mask, kind="jsd", backend=backend)
    leaf = poisoned_s.requires_grad_(True)
    dirty = fused_linear_distill_loss(leaf, sw, poisoned_t, tw, mask, kind="jsd",
                                      backend=backend)
    dirty.backward()
    assert torch.isfinite(dirty) and torch.allclose(dirty, clean, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(leaf.grad).all() and torch.all(leaf.grad[~mask] == 0)


@pytest.mark.parametrize("kind,dtype", [("forward_kl", torch.float32),
                                        ("reverse_kl", torch.float32),
                                        ("jsd", torch.float32), ("jsd", torch.bfloat16)],
                         ids=["fkl-f32", "rkl-f32", "jsd-f32", "jsd-bf16"])
def test_triton_overwrites_poisoned_outputs(kind, dtype):
    n, v = 21, 75
    sh, sw, th, tw = _inputs(dtype, n=n, v=v)
    out = tuple(torch.full((n,), float("nan")) for _ in range(3))
    result = tri.distill_forward(sh, sw, th, tw, 1.3, kind, 0.4, out=out, blocks=BLOCKS)
    expected = ref.distill_forward(sh.double(), sw.double(), th.double(), tw.double(), 1.3,
                                   kind, 0.4)
    for name, got, buf, want in zip(("loss", "s_lse", "t_lse"), result, out, expected):
        assert got.data_ptr() == buf.data_ptr()
        assert torch.isfinite(got).all(), name
        _close(got, want, torch.float32, name)
    out_grads = (torch.full_like(sh, float("nan")), torch.full_like(sw, float("nan")))
    grad_rows = torch.rand(n)
    gh, gw = tri.distill_backward(sh, sw, th, tw, 1.3, kind, 0.4, result[1], result[2],
                                  grad_rows, True, out=out_grads, blocks=BLOCKS)
    assert gh.data_ptr() == out_grads[0].data_ptr() and gw.data_ptr() == out_grads[1].data_ptr()
    want_gh, want_gw = ref.distill_backward(sh.double(), sw.double(), th.double(), tw.double(),
                                            1.3, kind, 0.4, expected[1], expected[2],
                                            grad_rows.double(), True)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    _close(gh, want_gh, dtype, "grad_hidden")
    _close(gw, want_gw, dtype, "grad_weight")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_is_non_negative_and_zero_for_identical_models(kind, backend):
    sh, sw, th, tw = _inputs(torch.float32, n=13, dt=DS)
    per_token = fused_linear_distill_loss(sh, sw, th, tw, kind=kind, reduction="none",
                                          backend=backend)
    assert torch.all(per_token >= 0) and per_token.max() > 1e-3
    leaf = sh.clone().requires_grad_(True)
    same = fused_linear_distill_loss(leaf, sw, sh, sw, kind=kind, reduction="none",
                                     backend=backend)
    same.sum().backward()
    assert torch.all(same >= 0) and same.max() < 1e-5
    assert leaf.grad.abs().max() < 1e-5


def test_reductions_temperature_scaling_and_frozen_weight():
    mask = torch.rand(4, 6) > 0.3
    mask[0, 0] = True
    sh, th = torch.randn(4, 6, DS), torch.randn(4, 6, DT)
    sw, tw = 0.25 * torch.randn(V, DS), 0.3 * torch.randn(V, DT)
    kwargs = dict(kind="reverse_kl", temperature=3.0, backend="triton")
    per_token = fused_linear_distill_loss(sh, sw, th, tw, mask, reduction="none", **kwargs)
    total = fused_linear_distill_loss(sh, sw, th, tw, mask, reduction="sum", **kwargs)
    mean = fused_linear_distill_loss(sh, sw, th, tw, mask, reduction="mean", **kwargs)
    scaled = fused_linear_distill_loss(sh, sw, th, tw, mask, reduction="mean",
                                       scale_by_temperature_squared=True, **kwargs)
    assert torch.allclose(total, per_token.sum(), rtol=1e-6)
    assert torch.allclose(mean, total / mask.sum(), rtol=1e-6)
    assert torch.allclose(scaled, 9.0 * mean, rtol=1e-6)
    leaf = sh.clone().requires_grad_(True)
    fused_linear_distill_loss(leaf, sw.requires_grad_(False), th, tw, mask, **kwargs).backward()
    assert leaf.grad is not None and sw.grad is None


def test_teacher_tensors_are_detached():
    sh, sw, th, tw = _inputs(torch.float32, n=10)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    th.requires_grad_(True)
    tw.requires_grad_(True)
    fused_linear_distill_loss(sh, sw, th, tw, backend="triton").backward()
    assert th.grad is None and tw.grad is None
    assert sh.grad is not None and sw.grad is not None and sw.grad.abs().max() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_masked_gives_zero_loss_and_zero_grads(backend):
    sh, sw, th, tw = _inputs(torch.float32, n=6)
    mask = torch.zeros(6, dtype=torch.bool)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    loss = fused_linear_distill_loss(sh, sw, th, tw, mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(sh.grad == 0) and torch.all(sw.grad == 0)


def test_auto_on_cpu_without_native_uses_the_torch_fallback(monkeypatch):
    monkeypatch.setattr(backends, "native_module", lambda: None)
    sh, sw, th, tw = _inputs(torch.float32, n=8)
    with pytest.raises(BackendError, match="backend='native'"):
        fused_linear_distill_loss(sh, sw, th, tw, backend="native")
    auto = fused_linear_distill_loss(sh, sw, th, tw, kind="jsd")
    forced = fused_linear_distill_loss(sh, sw, th, tw, kind="jsd", backend="torch")
    assert torch.equal(auto, forced)


def test_auto_on_cpu_prefers_the_native_op_when_built(monkeypatch):
    calls = []

    class FakeNative:
        @staticmethod
        def distill_forward(*args):
            calls.append("forward")
            return ref.distill_forward(*args)

    monkeypatch.setattr(backends, "native_module", lambda: FakeNative)
    sh, sw, th, tw = _inputs(torch.float32, n=8)
    with torch.no_grad():
        auto = fused_linear_distill_loss(sh, sw, th, tw, kind="jsd")
    assert calls == ["forward"]
    assert torch.equal(auto, fused_linear_distill_loss(sh, sw, th, tw, kind="jsd",
                                                       backend="torch"))


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)], ids=["rkl", "jsd"])
def test_native_backend_through_the_public_function(kind, beta):
    sh, sw, th, tw = _inputs(torch.float32, n=2 * 9)
    sh, th = sh.reshape(2, 9, DS), th.reshape(2, 9, DT)
    mask = torch.rand(2, 9) > 0.3
    if not native.available():
        with pytest.raises(BackendError, match="not usable"):
            fused_linear_distill_loss(sh, sw, th, tw, mask, kind=kind, backend="native")
        return
    s_leaf, w_leaf = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    loss = fused_linear_distill_loss(s_leaf, w_leaf, th, tw, mask, kind=kind, jsd_beta=beta,
                                     temperature=1.4, reduction="sum", backend="native")
    loss.backward()
    keep = mask.reshape(-1)
    s64, w64 = sh.double().requires_grad_(True), sw.double().requires_grad_(True)
    rows, _, _ = ref.distill_forward(s64.reshape(-1, DS)[keep], w64,
                                     th.double().reshape(-1, DT)[keep], tw.double(), 1.4, kind,
                                     beta)
    rows.sum().backward()
    _close(loss.reshape(1), rows.sum().detach().reshape(1), torch.float32, "loss")
    _close(s_leaf.grad, s64.grad, torch.float32, "grad_hidden")
    _close(w_leaf.grad, w64.grad, torch.float32, "grad_weight")


def _bad_cases():
    sh, sw, th, tw = _inputs(torch.float32, n=5)
    good = dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw)
    return [
        ("vocab", dict(good, teacher_weight=tw[:-1]), {}, ValueError, "vocabulary mismatch"),
        ("mask_shape", good, dict(mask=torch.ones(6, dtype=torch.bool)), ValueError, "mask"),
        ("mask_float", good, dict(mask=torch.ones(5)), TypeError, "mask"),
        ("kind", good, dict(kind="kl"), ValueError, "kind"),
        ("beta0", good, dict(kind="jsd", jsd_beta=0.0), ValueError, "jsd_beta"),
        ("beta1", good, dict(kind="jsd", jsd_beta=1.0), ValueError, "jsd_beta"),
        ("temp0", good, dict(temperature=0.0), ValueError, "temperature"),
        ("temp_nan", good, dict(temperature=float("nan")), ValueError, "temperature"),
        ("reduction", good, dict(reduction="avg"), ValueError, "reduction"),
        ("backend", good, dict(backend="cuda"), ValueError, "backend"),
        ("dtype_mix", dict(good, teacher_hidden=th.bfloat16(), teacher_weight=tw.bfloat16()), {},
         TypeError, "dtype mix"),
        ("int_hidden", dict(good, student_hidden=sh.long()), {}, TypeError, "student_hidden"),
        ("student_width", dict(good, student_weight=sw[:, :-1]), {}, ValueError,
         "student_hidden width"),
        ("teacher_width", dict(good, teacher_hidden=th[:, :-1]), {}, ValueError,
         "teacher_hidden width"),
        ("tokens", dict(good, teacher_hidden=th[:-1]), {}, ValueError, "same tokens"),
        ("rank", dict(good, student_hidden=sh[0]), {}, ValueError, r"\[N, D\]"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(case):
    _, tensors, options, error, pattern = case
    with pytest.raises(error, match=pattern):
        fused_linear_distill_loss(**tensors, **options)


def _fused_oracle(sh, sw, th, tw, mask, kind, beta, temperature, reduction, t2, grad_output):
    """Loss and student grads of grad_output * reduced loss, float64 autograd via the reference."""
    s64, w64 = sh.double().requires_grad_(True), sw.double().requires_grad_(True)
    keep = mask.reshape(-1)
    rows, _, _ = ref.distill_forward(s64.reshape(-1, sh.shape[-1])[keep], w64,
                                     th.double().reshape(-1, th.shape[-1])[keep], tw.double(),
                                     temperature, kind, beta)
    loss = rows.sum() * (temperature ** 2 if t2 else 1.0)
    if reduction == "mean":
        loss = loss / max(int(keep.sum()), 1)
    (grad_output * loss).backward()
    return loss.detach(), s64.grad, w64.grad


@pytest.mark.parametrize("reduction,t2", [("mean", True), ("sum", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
def test_native_fused_scalar_loss_matches_oracle(kind, beta, dtype, reduction, t2):
    """reduction mean/sum on the native op computes the gradients in the forward (every kind);
    5-row chunks over 23 counted tokens (ragged last chunk), bf16 weights converted in 64-entry
    vocabulary blocks (157 = 2 * 64 + 29, ragged), grad_output 1.7, masked [B, T] input."""
    sh, sw, th, tw = _inputs(dtype, n=3 * 11)
    sh, th = sh.reshape(3, 11, DS), th.reshape(3, 11, DT)
    mask = torch.arange(11)[None, :] < torch.tensor([11, 4, 8])[:, None]
    s_leaf, w_leaf = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    with native.tile_sizes(5, 64):
        loss = fused_linear_distill_loss(s_leaf, w_leaf, th, tw, mask, kind=kind, jsd_beta=beta,
                                         temperature=1.3, reduction=reduction,
                                         scale_by_temperature_squared=t2, backend="native")
    (1.7 * loss).backward()
    want, grad_h, grad_w = _fused_oracle(sh, sw, th, tw, mask, kind, beta, 1.3, reduction, t2,
                                         1.7)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    _close(loss.reshape(1), want.reshape(1), dtype, "loss")
    assert s_leaf.grad.dtype == dtype and w_leaf.grad.dtype == dtype
    _close(s_leaf.grad, grad_h, dtype, "grad_hidden")
    assert torch.all(s_leaf.grad[~mask] == 0)
    _close(w_leaf.grad, grad_w, dtype, "grad_weight")


def test_native_fused_loss_skips_the_recompute_backward(monkeypatch):
    def recompute(*args, **kwargs):
        raise AssertionError("the recompute backward ran for a scalar loss")

    monkeypatch.setattr(native, "distill_backward", recompute)
    sh, sw, th, tw = _inputs(torch.float32, n=12)
    sh.requires_grad_(True)
    fused_linear_distill_loss(sh, sw, th, tw, kind="jsd", backend="native").backward()
    assert sh.grad is not None and sh.grad.abs().max() > 0


def test_native_fused_loss_used_twice_retained_graph_and_frozen_weight():
    sh, sw, th, tw = _inputs(torch.float32, n=2 * 9)
    sh, th = sh.reshape(2, 9, DS), th.reshape(2, 9, DT)
    mask = torch.rand(2, 9) > 0.3
    mask[0, 0] = True
    s_leaf, w_leaf = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    kwargs = dict(kind="reverse_kl", temperature=0.7, backend="native")
    with native.tile_sizes(5, 64):
        loss = fused_linear_distill_loss(s_leaf, w_leaf, th, tw, mask, **kwargs)
    _, grad_h, grad_w = _fused_oracle(sh, sw, th, tw, mask, "reverse_kl", 0.5, 0.7, "mean",
                                      False, 1.0)
    # One node, grad_output 3 (the loss enters twice); then a second backward through the
    # retained graph, which recomputes because the stored gradients were handed over.
    (loss + 2 * loss).backward(retain_graph=True)
    _close(s_leaf.grad, 3 * grad_h, torch.float32, "grad_hidden")
    _close(w_leaf.grad, 3 * grad_w, torch.float32, "grad_weight")
    (0.5 * loss).backward()
    _close(s_leaf.grad, 3.5 * grad_h, torch.float32, "grad_hidden (again)")
    _close(w_leaf.grad, 3.5 * grad_w, torch.float32, "grad_weight (again)")
    frozen_leaf = sh.clone().requires_grad_(True)
    frozen_w = sw.clone()
    fused_linear_distill_loss(frozen_leaf, frozen_w, th, tw, mask, **kwargs).backward()
    assert frozen_w.grad is None
    _close(frozen_leaf.grad, grad_h, torch.float32, "grad_hidden (frozen weight)")
