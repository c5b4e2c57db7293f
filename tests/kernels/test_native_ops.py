"""The native C++ CPU ops (csrc/, loaded by kernels/native.py) against float64 references.

The references are the plain definitions, written here with autograd, so they share no code
with any backend. Tile sizes are shrunk so that every op crosses several row chunks and
vocabulary blocks, none of which divide the problem size.
"""
import importlib.util
import warnings

import pytest
import torch

from rba_core.kernels import native

ROWS_CHUNK, VOCAB_BLOCK = 16, 96


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request):
    """Both the single-worker path and several workers sharing the tiles and grad buffers."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _small_tiles():
    # Fails loudly rather than skipping: CI installs the package with the extension built.
    assert native.available(), native.unavailable_reason()
    with native.tile_sizes(ROWS_CHUNK, VOCAB_BLOCK):
        yield


def test_extension_is_built_and_used():
    assert native.available()
    if importlib.util.find_spec("rba_core._C") is not None:
        assert native.source() == "prebuilt"
    else:
        assert native.source() == "jit"
    assert native.unavailable_reason() is None
    assert native._ops().get_tile_sizes() == (ROWS_CHUNK, VOCAB_BLOCK)


def test_tile_sizes_context_restores():
    with native.tile_sizes(3, 7):
        assert native._ops().get_tile_sizes() == (3, 7)
    assert native._ops().get_tile_sizes() == (ROWS_CHUNK, VOCAB_BLOCK)


def _token_inputs(dtype, n=53, d=24, vocab=389, bias=True):
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(vocab, d) / d**0.5 * 3).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    ids = torch.randint(0, vocab, (n,))
    ids[0], ids[1], ids[-1] = 0, vocab - 1, vocab - 1  # the first and last vocabulary entries
    return hidden, weight, b, ids


def _token_reference(hidden, weight, bias, ids, scale):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * scale
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, ids[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return h, w, b, logp, torch.logsumexp(z, -1), entropy


# (forward tolerance, gradient tolerance): bf16 gradients are rounded to bf16 on return.
TOLS = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1e-2), torch.float64: (1e-10, 1e-10)}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias,with_entropy", [(True, True), (False, False), (False, True)])
def test_token_scores_match_float64_reference(dtype, with_bias, with_entropy, threads):
    hidden, weight, bias, ids = _token_inputs(dtype, bias=with_bias)
    scale = 0.83
    fwd_tol, grad_tol = TOLS[dtype]
    logp, lse, entropy = native.token_scores_forward(hidden, weight, bias, ids, scale, with_entropy)
    h, w, b, ref_logp, ref_lse, ref_entropy = _token_reference(hidden, weight, bias, ids, scale)
    # Outputs accumulate in float32, or float64 for float64 inputs.
    assert logp.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(logp, ref_logp.detach(), fwd_tol, "logp")
    _close(lse, ref_lse.detach(), fwd_tol, "lse")
    if with_entropy:
        _close(entropy, ref_entropy.detach(), fwd_tol, "entropy")
    else:
        assert entropy is None

    grad_logp = torch.randn(len(ids), dtype=logp.dtype)
    grad_entropy = torch.randn(len(ids), dtype=logp.dtype) if with_entropy else None
    objective = (ref_logp * grad_logp.double()).sum()
    if with_entropy:
        objective = objective + (ref_entropy * grad_entropy.double()).sum()
    objective.backward()
    gh, gw, gb = native.token_scores_backward(
        hidden, weight, bias, ids, scale, lse, entropy, grad_logp, grad_entropy, True
    )
    assert gh.dtype == dtype and gw.dtype == dtype
    _close(gh, h.grad, grad_tol, "grad_hidden")
    _close(gw, w.grad, grad_tol, "grad_weight")
    if with_bias:
        _close(gb, b.grad, grad_tol, "grad_bias")
    else:
        assert gb is None

    gh_only, no_w, no_b = native.token_scores_backward(
        hidden, weight, bias, ids, scale, lse, entropy, grad_logp, grad_entropy, False
    )
    assert no_w is None and no_b is None
    _close(gh_only, h.grad, grad_tol, "grad_hidden without weight grad")

    # The autograd path's pair: the forward keeps its last row chunk's last blocks of logits
    # (several tiles here, the last chunk and block ragged) and the backward starts from them.
    *kept_out, kept = native.token_scores_forward_keep(hidden, weight, bias, ids, scale,
                                                       with_entropy)
    assert kept.shape == (3, ROWS_CHUNK, VOCAB_BLOCK)
    for got, want in zip(kept_out, (logp, lse, entropy)):
        assert (got is None and want is None) or torch.equal(got, want)
    gh_k, gw_k, gb_k = native.token_scores_backward_kept(
        hidden, weight, bias, ids, scale, lse, entropy, grad_logp, grad_entropy, True, kept
    )
    _close(gh_k, h.grad, grad_tol, "grad_hidden from kept logits")
    _close(gw_k, w.grad, grad_tol, "grad_weight from kept logits")
    if with_bias:
        _close(gb_k, b.grad, grad_tol, "grad_bias from kept logits")


def test_token_scores_independent_of_tiling():
    hidden, weight, bias, ids = _token_inputs(torch.float32)
    small = native.token_scores_forward(hidden, weight, bias, ids, 1.0, True)
    with native.tile_sizes(1000, 100000):  # one tile covers everything
        whole = native.token_scores_forward(hidden, weight, bias, ids, 1.0, True)
    for a, b in zip(small, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_token_scores_second_backward_recomputes():
    # The first backward overwrites the kept logits, so a retained graph's second one must not
    # reuse them.
    from rba_core.kernels import fused_linear_logprobs

    hidden, weight, _, ids = _token_inputs(torch.float32)
    h = hidden.requires_grad_()
    loss = fused_linear_logprobs(h, weight, ids, backend="native").sum()
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-6)


def _distill_inputs(dtype, n=45, ds=20, dt=28, vocab=301):
    return (
        torch.randn(n, ds).to(dtype),
        (torch.randn(vocab, ds) / ds**0.5 * 2).to(dtype),
        torch.randn(n, dt).to(dtype),
        (torch.randn(vocab, dt) / dt**0.5 * 2).to(dtype),
    )


def _distill_reference(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, beta):
    h = s_hidden.double().requires_grad_()
    w = s_weight.double().requires_grad_()
    log_ps = torch.log_softmax(h @ w.T / temperature, -1)
    log_pt = torch.log_softmax(t_hidden.double() @ t_weight.double().T / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if kind == "forward_kl":
        rows = (pt * (log_pt - log_ps)).sum(-1)
    elif kind == "reverse_kl":
        rows = (ps * (log_ps - log_pt)).sum(-1)
    else:
        log_m = torch.log(beta * pt + (1 - beta) * ps)
        rows = beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)
    s_lse = torch.logsumexp(h @ w.T / temperature, -1)
    t_lse = torch.logsumexp(t_hidden.double() @ t_weight.double().T / temperature, -1)
    return h, w, rows, s_lse, t_lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_matches_float64_reference(dtype, kind, threads):
    inputs = _distill_inputs(dtype)
    temperature, beta = 1.7, 0.3
    fwd_tol, grad_tol = TOLS[dtype]
    loss, s_lse, t_lse = native.distill_forward(*inputs, temperature, kind, beta)
    h, w, ref_rows, ref_s_lse, ref_t_lse = _distill_reference(*inputs, temperature, kind, beta)
    _close(loss, ref_rows.detach(), fwd_tol, f"{kind} loss")
    _close(s_lse, ref_s_lse.detach(), fwd_tol, "s_lse")
    _close(t_lse, ref_t_lse.detach(), fwd_tol, "t_lse")

    grad_rows = torch.randn(len(loss), dtype=loss.dtype)
    (ref_rows * grad_rows.double()).sum().backward()
    gh, gw = native.distill_backward(
        *inputs, temperature, kind, beta, s_lse, t_lse, grad_rows, True
    )
    assert gh.dtype == dtype and gw.dtype == dtype
    _close(gh, h.grad, grad_tol, f"{kind} grad_s_hidden")
    _close(gw, w.grad, grad_tol, f"{kind} grad_s_weight")
    gh_only, none_w = native.distill_backward(
        *inputs, temperature, kind, beta, s_lse, t_lse, grad_rows, False
    )
    assert none_w is None
    _close(gh_only, h.grad, grad_tol, f"{kind} grad_s_hidden without weight grad")


def test_peaked_rows_where_most_probabilities_underflow():
    """Logits spread over a few hundred, so most float32 exponentials fall below the smallest
    normal float: the row passes' exp saturates there instead of underflowing, which must not
    show in any output (nor give inf or NaN, e.g. log M of JSD where both distributions vanish).
    Float32 logits this large carry errors of about 1e-5 of the outputs' scale (the PyTorch
    fallback's too; reverse KL's gradient P_S (g - loss) cancels terms of a few hundred), so
    the bound is 5e-4: saturation gone wrong would be off by O(1)."""
    tol = 5e-4
    hidden, weight, bias, ids = _token_inputs(torch.float32)
    weight = weight * 40
    logp, lse, entropy = native.token_scores_forward(hidden, weight, bias, ids, 1.0, True)
    h, w, b, ref_logp, ref_lse, ref_entropy = _token_reference(hidden, weight, bias, ids, 1.0)
    for got, want, what in ((logp, ref_logp, "logp"), (lse, ref_lse, "lse"),
                            (entropy, ref_entropy, "entropy")):
        _close(got, want.detach(), tol, what)
    grad_logp, grad_entropy = torch.randn(len(ids)), torch.randn(len(ids))
    ((ref_logp * grad_logp.double()).sum() + (ref_entropy * grad_entropy.double()).sum()).backward()
    gh, gw, gb = native.token_scores_backward(hidden, weight, bias, ids, 1.0, lse, entropy,
                                              grad_logp, grad_entropy, True)
    for got, want, what in ((gh, h.grad, "grad_hidden"), (gw, w.grad, "grad_weight"),
                            (gb, b.grad, "grad_bias")):
        _close(got, want, tol, what)

    s_hidden, s_weight, t_hidden, t_weight = _distill_inputs(torch.float32)
    inputs = (s_hidden, s_weight * 10, t_hidden, t_weight * 10)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss, s_lse, t_lse = native.distill_forward(*inputs, 0.5, kind, 0.5)
        h, w, ref_rows, _, _ = _distill_reference(*inputs, 0.5, kind, 0.5)
        _close(loss, ref_rows.detach(), tol, f"{kind} loss")
        grad_rows = torch.rand(len(loss)) + 0.5
        (ref_rows * grad_rows.double()).sum().backward()
        gh, gw = native.distill_backward(*inputs, 0.5, kind, 0.5, s_lse, t_lse, grad_rows, True)
        _close(gh, h.grad, tol, f"{kind} grad_s_hidden")
        _close(gw, w.grad, tol, f"{kind} grad_s_weight")


def test_distill_of_identical_distributions_is_zero():
    s_hidden, s_weight, _, _ = _distill_inputs(torch.float32)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss, _, _ = native.distill_forward(s_hidden, s_weight, s_hidden, s_weight, 1.0, kind, 0.5)
        assert loss.abs().max().item() < 1e-5, kind


def _token_call(**override):
    hidden, weight, bias, ids = _token_inputs(torch.float32, n=8, d=6, vocab=40)
    args = dict(hidden=hidden, weight=weight, bias=bias, ids=ids, scale=1.0, with_entropy=True)
    args.update(override)
    return native.token_scores_forward(**args)


@pytest.mark.parametrize(
    "override,error,pattern",
    [
        (dict(weight=torch.randn(40, 7)), ValueError, "disagree on the hidden size"),
        (dict(ids=torch.full((8,), 40)), ValueError, r"ids must lie in \[0, 40\)"),
        (dict(ids=torch.full((8,), -1)), ValueError, r"ids must lie in \[0, 40\)"),
        (dict(ids=torch.zeros(7, dtype=torch.long)), ValueError, r"ids must have shape \[8\]"),
        (dict(ids=torch.zeros(8, dtype=torch.int32)), TypeError, "ids must be Long"),
        (dict(weight=torch.randn(40, 6).bfloat16()), TypeError, "share a dtype"),
        (dict(hidden=torch.randn(6, 8).t()), ValueError, "hidden must be contiguous"),
        (dict(hidden=torch.randn(2, 8, 6)), ValueError, "hidden must be 2-D"),
        (dict(bias=torch.randn(41)), ValueError, r"bias must have shape \[40\]"),
        (dict(hidden=torch.ones(8, 6, dtype=torch.int32), weight=torch.ones(40, 6, dtype=torch.int32)),
         TypeError, "float32, bfloat16, float16 or float64"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
    ],
)
def test_token_scores_bad_input(override, error, pattern):
    with pytest.raises(error, match=pattern):
        _token_call(**override)


def test_token_scores_backward_bad_input():
    hidden, weight, bias, ids = _token_inputs(torch.float32, n=8, d=6, vocab=40)
    logp, lse, entropy = native.token_scores_forward(hidden, weight, bias, ids, 1.0, False)
    grad = torch.ones(8)
    with pytest.raises(ValueError, match="without the entropy saved"):
        native.token_scores_backward(hidden, weight, bias, ids, 1.0, lse, None, grad, grad, True)
    with pytest.raises(TypeError, match="grad_logp must be Float"):
        native.token_scores_backward(
            hidden, weight, bias, ids, 1.0, lse, None, grad.double(), None, True
        )
    with pytest.raises(ValueError, match=r"lse must have shape \[8\]"):
        native.token_scores_backward(hidden, weight, bias, ids, 1.0, lse[:5], None, grad, None, True)


@pytest.mark.parametrize(
    "index,value,kind,beta,temperature,error,pattern",
    [
        (1, torch.randn(50, 20), "jsd", 0.5, 1.0, ValueError, "share a vocabulary"),
        (2, torch.randn(7, 28), "jsd", 0.5, 1.0, ValueError, "same tokens"),
        (3, torch.randn(301, 27), "jsd", 0.5, 1.0, ValueError, "teacher hidden size"),
        (None, None, "kl", 0.5, 1.0, ValueError, "kind must be"),
        (None, None, "jsd", 1.0, 1.0, ValueError, "jsd_beta must lie strictly between"),
        (None, None, "forward_kl", 0.5, 0.0, ValueError, "temperature must be"),
        (1, torch.randn(301, 20).bfloat16(), "jsd", 0.5, 1.0, TypeError, "share a dtype"),
    ],
)
def test_distill_bad_input(index, value, kind, beta, temperature, error, pattern):
    inputs = list(_distill_inputs(torch.float32))
    if index is not None:
        inputs[index] = value
    with pytest.raises(error, match=pattern):
        native.distill_forward(*inputs, temperature, kind, beta)


def test_unavailable_warns_once_and_refuses_calls(monkeypatch):
    saved = dict(native._state)
    monkeypatch.setattr(native, "_try_prebuilt", lambda: (None, "prebuilt missing (test)"))
    monkeypatch.setattr(native, "_csrc_dir", lambda: None)
    native._state.update(loaded=False, module=None, source=None, reason=None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not native.available()
            assert not native.available()
            assert native.source() is None
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "prebuilt missing (test)" in messages[0]
        assert "not a source checkout" in messages[0]
        assert "PyTorch fallback" in messages[0]
        with pytest.raises(RuntimeError, match="unavailable"):
            native.token_scores_forward(*_token_inputs(torch.float32), 1.0, False)
    finally:
        native._state.clear()
        native._state.update(saved)


def test_env_switch_disables_native(monkeypatch):
    saved = dict(native._state)
    monkeypatch.setenv("RBA_NATIVE", "0")
    native._state.update(loaded=False, module=None, source=None, reason=None)
    try:
        with pytest.warns(RuntimeWarning, match="disabled by RBA_NATIVE=0"):
            assert not native.available()
    finally:
        native._state.clear()
        native._state.update(saved)
