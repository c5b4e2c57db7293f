"""fused_linear_logprobs: Triton kernels (under TRITON_INTERPRET=1) and the PyTorch fallback
against a float64 oracle, forward and backward, on fresh random inputs.

Sizes are deliberately not multiples of the blocks: N=37 rows against BLOCK_N=16, V=203 against
BLOCK_V=64, D=48 against BLOCK_D=32.
"""
import pytest
import torch

from rba_core.kernels import backends, fused_linear_logprobs
from rba_core.kernels.backends import BackendError
from rba_core.kernels import linear_logprobs_reference as reference
from rba_core.kernels import linear_logprobs_triton as triton_backend

N, D, V = 37, 48, 203
BLOCKS = {"block_n": 16, "block_v": 64, "block_d": 32}
# Error bound relative to the largest reference magnitude. bfloat16 results (gradients) are
# rounded to 8 mantissa bits, and the backward's dz tile is bf16 before the GEMMs.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5}
# The weight and bias gradients sum over every row in float32: over 300 seeds of the ragged-batch
# test the worst was 2.8e-5 of the largest gradient (2e-5 failed about 1 run in 75).
BWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def assert_close(actual, expected, tol, name):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def make_inputs(dtype, n=N, with_bias=True):
    hidden = torch.randn(n, D).to(dtype)
    weight = (torch.randn(V, D) / D**0.5 * 2).to(dtype)
    bias = torch.randn(V).to(dtype) if with_bias else None
    ids = torch.randint(0, V, (n,))
    return hidden, weight, bias, ids


def as64(t):
    return None if t is None else t.double()


def oracle_dz(hidden, weight, bias, ids, scale, grad_logp, grad_entropy):
    """d (sum g * logp + ge * entropy) / d (h @ W.T + b), by autograd on naive float64 code."""
    u = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double()))
    u.requires_grad_(True)
    logsm = torch.log_softmax(u * scale, dim=1)
    logp = logsm.gather(1, ids[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(1)
    (dz,) = torch.autograd.grad((grad_logp.double() * logp).sum()
                                + (grad_entropy.double() * entropy).sum(), u)
    return dz


def test_reference_backward_matches_autograd_of_naive_log_softmax():
    """The float64 oracle itself: hand-written chunked backward == autograd of log_softmax."""
    hidden, weight, bias, ids = make_inputs(torch.float64)
    scale = 0.8
    logp, lse, entropy = reference.token_scores_forward(hidden, weight, bias, ids, scale, True,
                                                        chunk_rows=5)
    z = (hidden @ weight.T + bias) * scale
    logsm = torch.log_softmax(z, 1)
    assert_close(logp, logsm.gather(1, ids[:, None]).squeeze(1), 1e-12, "logp")
    assert_close(lse, torch.logsumexp(z, 1), 1e-12, "lse")
    assert_close(entropy, -(logsm.exp() * logsm).sum(1), 1e-12, "entropy")

    g, ge = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    gh, gw, gb = reference.token_scores_backward(hidden, weight, bias, ids, scale, lse, entropy,
                                                 g, ge, True, chunk_rows=5)
    dz = oracle_dz(hidden, weight, bias, ids, scale, g, ge)
    assert_close(gh, dz @ weight, 1e-12, "grad_hidden")
    assert_close(gw, dz.T @ hidden, 1e-12, "grad_weight")
    assert_close(gb, dz.sum(0), 1e-12, "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "bias+entropy"])
def test_triton_forward_matches_float64_and_fills_poisoned_outputs(dtype, with_extras):
    hidden, weight, bias, ids = make_inputs(dtype, with_bias=with_extras)
    scale = 1.7
    out = tuple(torch.full((N,), float("nan")) for _ in range(3))
    logp, lse, entropy = triton_backend.token_scores_forward(
        hidden, weight, bias, ids, scale, with_extras, out=out if with_extras else out[:2] + (None,),
        **BLOCKS)
    assert logp.data_ptr() == out[0].data_ptr() and lse.data_ptr() == out[1].data_ptr()
    want = reference.token_scores_forward(as64(hidden), as64(weight), as64(bias), ids, scale,
                                          True)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    assert_close(logp, want[0], FWD_TOL[dtype], "logp")
    assert_close(lse, want[1], FWD_TOL[dtype], "lse")
    if with_extras:
        assert entropy.data_ptr() == out[2].data_ptr() and torch.isfinite(entropy).all()
        assert_close(entropy, want[2], FWD_TOL[dtype], "entropy")
    else:
        assert entropy is None and torch.isnan(out[2]).all()


def test_triton_forward_entropy_is_stable_for_large_logits():
    """Logits in the thousands: the entropy accumulator is kept relative to the running max."""
    hidden, weight, bias, ids = make_inputs(torch.float32)
    scale = 400.0
    _, _, entropy = triton_backend.token_scores_forward(hidden, weight, bias, ids, scale, True,
                                                        **BLOCKS)
    want = reference.token_scores_forward(as64(hidden), as64(weight), as64(bias), ids, scale,
                                          True)[2]
    assert torch.isfinite(entropy).all()
    assert (entropy.double() - want).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dz_kernel_fills_poisoned_buffer_with_the_exact_gradient(dtype):
    hidden, weight, bias, ids = make_inputs(dtype)
    scale = 0.9
    _, lse, entropy = reference.token_scores_forward(hidden, weight, bias, ids, scale, True)
    g, ge = torch.randn(N), torch.randn(N)
    dz = torch.full((N, V), float("nan"), dtype=dtype)
    triton_backend.launch_dz(hidden, weight, bias, ids, scale, lse, entropy, g, ge, dz, **BLOCKS)
    assert torch.isfinite(dz).all()
    assert_close(dz, oracle_dz(hidden, weight, bias, ids, scale, g, ge), BWD_TOL[dtype], "dz")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "bias+entropy"])
def test_triton_backward_matches_float64(dtype, with_extras):
    hidden, weight, bias, ids = make_inputs(dtype, with_bias=with_extras)
    scale = 1.3
    _, lse, entropy = triton_backend.token_scores_forward(hidden, weight, bias, ids, scale,
                                                          with_extras, **BLOCKS)
    g = torch.randn(N)
    ge = torch.randn(N) if with_extras else None
    # 15-row chunks: three chunks, the last one ragged.
    gh, gw, gb = triton_backend.token_scores_backward(hidden, weight, bias, ids, scale, lse,
                                                      entropy, g, ge, True, chunk_rows=15,
                                                      **BLOCKS)
    dz = oracle_dz(hidden, weight, bias, ids, scale, g, torch.zeros(N) if ge is None else ge)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close(gh, dz @ weight.double(), BWD_TOL[dtype], "grad_hidden")
    assert_close(gw, dz.T @ hidden.double(), BWD_TOL[dtype], "grad_weight")
    if with_extras:
        assert_close(gb, dz.sum(0), BWD_TOL[dtype], "grad_bias")
    else:
        assert gb is None
    _, no_weight_grad, _ = triton_backend.token_scores_backward(
        hidden, weight, bias, ids, scale, lse, entropy, g, ge, False, **BLOCKS)
    assert no_weight_grad is None


def naive_scores(hidden, weight, bias, ids, mask, scale):
    """float64 log-probs and entropy, zero where masked, differentiable (the public oracle)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logsm = torch.log_softmax(z * scale, -1)
    logp = logsm.gather(-1, ids.clamp(0, V - 1)[..., None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp * mask, entropy * mask


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_ragged_batch_forward_and_backward(backend, dtype):
    batch, time = 4, 9
    lengths = torch.randint(1, time + 1, (batch,))
    lengths[0] = time
    mask = torch.arange(time)[None, :] < lengths[:, None]
    ids = torch.randint(0, V, (batch, time)).masked_fill(~mask, -100)
    hidden = torch.randn(batch, time, D).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D) / D**0.5 * 2).to(dtype).requires_grad_(True)
    bias = torch.randn(V).to(dtype).requires_grad_(True)
    kwargs = {"logit_scale": 1.5, "temperature": 0.7}
    scores = fused_linear_logprobs(hidden, weight, ids, bias=bias, mask=mask,
                                   return_entropy=True, return_lse=True, backend=backend,
                                   **kwargs)
    assert scores.logprobs.shape == (batch, time) and scores.logprobs.dtype == torch.float32
    assert (scores.logprobs[~mask] == 0).all() and (scores.entropy[~mask] == 0).all()
    assert scores.lse.requires_grad is False

    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    want_logp, want_entropy = naive_scores(h64, w64, b64, ids, mask, 1.5 / 0.7)
    assert_close(scores.logprobs, want_logp, FWD_TOL[dtype], "logprobs")
    assert_close(scores.entropy, want_entropy, FWD_TOL[dtype], "entropy")

    coef_logp, coef_entropy = torch.randn(batch, time), torch.randn(batch, time)
    got = torch.autograd.grad((coef_logp * scores.logprobs).sum()
                              + (coef_entropy * scores.entropy).sum(), (hidden, weight, bias))
    want = torch.autograd.grad((coef_logp * want_logp).sum() + (coef_entropy * want_entropy).sum(),
                               (h64, w64, b64))
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype
        assert_close(g, w, BWD_TOL[dtype], f"grad_{name}")
    assert (got[0][~mask] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_op_entropy_only_gradient_and_flat_input(backend):
    hidden, weight, _, ids = make_inputs(torch.float32, with_bias=False)
    hidden.requires_grad_(True)
    scores = fused_linear_logprobs(hidden, weight, ids, return_entropy=True, backend=backend)
    assert scores.lse is None
    (grad,) = torch.autograd.grad(scores.entropy.sum(), hidden)
    h64 = hidden.detach().double().requires_grad_(True)
    _, entropy = naive_scores(h64, weight, None, ids, torch.ones(N), 1.0)
    (want,) = torch.autograd.grad(entropy.sum(), h64)
    assert_close(grad, want, BWD_TOL[torch.float32], "grad_hidden")


def test_no_grad_scoring_builds_no_graph_and_frozen_weight_gets_no_grad():
    hidden, weight, _, ids = make_inputs(torch.float32, with_bias=False)
    weight.requires_grad_(True)
    with torch.no_grad():
        scored = fused_linear_logprobs(hidden, weight, ids, backend="triton")
    assert scored.grad_fn is None and not scored.requires_grad

    frozen = weight.detach()
    hidden.requires_grad_(True)
    logp = fused_linear_logprobs(hidden, frozen, ids, backend="triton")
    assert logp.grad_fn is not None
    logp.sum().backward()
    assert hidden.grad is not None and frozen.grad is None
    assert torch.equal(scored, logp.detach())


def test_non_contiguous_inputs_are_copied_by_the_public_op():
    hidden, weight, _, ids = make_inputs(torch.float32, with_bias=False)
    wide = torch.randn(N, 2 * D)
    wide[:, ::2] = hidden
    got = fused_linear_logprobs(wide[:, ::2], weight.T.contiguous().T, ids, backend="torch")
    want = fused_linear_logprobs(hidden, weight, ids, backend="torch")
    assert torch.allclose(got, want)


def test_fallback_is_chunked_over_rows():
    """Chunk boundaries do not change the result (the fallback never needs [N, V])."""
    hidden, weight, bias, ids = make_inputs(torch.float32)
    whole = reference.token_scores_forward(hidden, weight, bias, ids, 1.0, True, chunk_rows=N)
    chunked = reference.token_scores_forward(hidden, weight, bias, ids, 1.0, True, chunk_rows=4)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)
    assert reference.default_chunk_rows(10**6, 49152) * 49152 * 4 <= reference.CHUNK_BYTES


def test_bad_inputs_raise_clear_errors(monkeypatch):
    hidden, weight, bias, ids = make_inputs(torch.float32)
    call = fused_linear_logprobs
    cases = [
        (ValueError, "last dimension", lambda: call(hidden[:, :-1], weight, ids)),
        (ValueError, "hidden must be", lambda: call(hidden[0], weight, ids[0])),
        (TypeError, "same dtype", lambda: call(hidden.bfloat16(), weight, ids)),
        (TypeError, "ids must be an integer", lambda: call(hidden, weight, ids.float())),
        (ValueError, "ids must have", lambda: call(hidden, weight, ids[:-1])),
        (ValueError, "outside the vocabulary", lambda: call(hidden, weight, ids.clamp(max=V - 2) + 1
                                                             + (ids == ids[0]) * V)),
        (ValueError, "outside the vocabulary", lambda: call(hidden, weight, ids - V)),
        (ValueError, "mask must have", lambda: call(hidden, weight, ids,
                                                    mask=torch.ones(N + 1, dtype=torch.bool))),
        (TypeError, "mask must be bool", lambda: call(hidden, weight, ids, mask=torch.ones(N))),
        (ValueError, "bias must have shape", lambda: call(hidden, weight, ids, bias=bias[:-1])),
        (ValueError, "temperature", lambda: call(hidden, weight, ids, temperature=0.0)),
        (ValueError, "backend=", lambda: call(hidden, weight, ids, backend="cuda")),
        (TypeError, "hidden must be a torch.Tensor", lambda: call(hidden.tolist(), weight, ids)),
        (TypeError, "Triton backend takes", lambda: call(hidden.double(), weight.double(), ids,
                                                         backend="triton")),
        (ValueError, "must be contiguous", lambda: reference.token_scores_forward(
            hidden.T.contiguous().T, weight, None, ids, 1.0, False)),
    ]
    for error, words, fn in cases:
        with pytest.raises(error, match=words):
            fn()
    # Padding ids under a False mask are fine: only kept tokens must be inside [0, V).
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    padded = ids.clone()
    padded[3] = -100
    assert call(hidden, weight, padded, mask=mask, backend="torch")[3] == 0
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        call(hidden, weight, ids, backend="triton")


def test_auto_backend_dispatch_on_cpu(monkeypatch):
    """CPU tensors go to the native op when it is available, else to the PyTorch fallback."""
    hidden, weight, _, ids = make_inputs(torch.float32, with_bias=False)
    calls = []

    class FakeNative:
        @staticmethod
        def token_scores_forward(*args):
            calls.append(args)
            return reference.token_scores_forward(*args)

    monkeypatch.setattr(backends, "native_module", lambda: FakeNative)
    with torch.no_grad():
        via_native = fused_linear_logprobs(hidden, weight, ids)
    assert len(calls) == 1 and torch.equal(via_native, fused_linear_logprobs(
        hidden, weight, ids, backend="torch"))
    monkeypatch.setattr(backends, "native_module", lambda: None)
    with torch.no_grad():
        fused_linear_logprobs(hidden, weight, ids)
    assert len(calls) == 1
    with pytest.raises(BackendError, match="not usable"):
        fused_linear_logprobs(hidden, weight, ids, backend="native")
