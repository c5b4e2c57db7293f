"""fused_linear_policy_loss against an independent float64 implementation (autograd through
log_softmax), on the Triton path (interpreter), the native C++ path (gradients computed in the
forward, chunk by chunk) and the PyTorch path."""
import contextlib
import math

import pytest
import torch

from rba_core.kernels import fused_linear_policy_loss
from rba_core.kernels import native, policy_loss_reference, policy_loss_triton

B, T, D, V = 3, 11, 48, 203
EPS_LOW, EPS_HIGH = 0.2, 0.28
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def assert_close(actual, expected, tol, name):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def make_batch(dtype, with_ref=True):
    hidden = torch.randn(B, T, D).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D) / D**0.5 * 2).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T))
    lengths = torch.tensor([T, 7, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    with torch.no_grad():
        exact = torch.log_softmax(hidden.double() @ weight.double().T, -1)
        exact = exact.gather(-1, ids[..., None]).squeeze(-1)
    # Ratios spread over [0.5, 1.6]; the first tokens of sequence 0 (advantage > 0) leave the
    # trust region upwards and those of sequence 1 (advantage < 0) downwards, so both clipping
    # sides occur on every draw.
    ratio = torch.empty(B, T, dtype=torch.float64).uniform_(0.5, 1.6)
    ratio[0, :3] = 1.5
    ratio[1, :3] = 0.6
    old = (exact - ratio.log()).float()
    ref = (exact + 0.5 * torch.randn(B, T, dtype=torch.float64)).float() if with_ref else None
    advantages = torch.tensor([1.0, -1.0, 0.5]) * torch.rand(B).add(0.5)
    ids = ids.masked_fill(~mask, -100)
    return hidden, weight, ids, advantages, old, ref, mask


def oracle(hidden, weight, ids, advantages, old, ref, mask, *, beta, kl_estimator, loss_type,
           temperature=1.0, max_length=None, kl_ratio=False):
    """(loss, grads of hidden and weight, per-token stats) in float64 by plain autograd."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logsm = torch.log_softmax(h @ w.T / temperature, -1)
    logp = logsm.gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1)
    adv = advantages.double()
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old.double())
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * adv
    per_token = -torch.minimum(unclipped, clipped_obj)
    kl = None
    if ref is not None:
        d = ref.double() - logp
        kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
        per_token = per_token + beta * kl * (ratio if kl_ratio else 1.0)
    m = mask.double()
    per_token = per_token * m
    if loss_type == "grpo":
        loss = (per_token.sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = per_token.sum() / m.sum()
    else:
        loss = per_token.sum() / (B * (max_length or T))
    grads = torch.autograd.grad(loss, (h, w))
    entropy = -(logsm.exp() * logsm).sum(-1)
    stats = {"logprobs": logp * m, "ratio": torch.where(mask, ratio, 1.0),
             "kl": None if kl is None else kl * m, "clipped": (clipped_obj < unclipped) & mask,
             "entropy": entropy * m}
    return loss.detach(), grads, {k: None if v is None else v.detach() for k, v in stats.items()}


@contextlib.contextmanager
def chunked(backend):
    """On the native backend, 7-row chunks (the 22 valid tokens span 4, the last ragged) and
    bf16 weights converted in 64-entry vocabulary blocks (203 = 3 * 64 + 11, ragged)."""
    if backend != "native":
        yield
        return
    with native.tile_sizes(7, 64):
        yield


def check_against_oracle(dtype, backend, loss_type, kl_estimator, beta=0.1, with_ref=True,
                         per_token_advantages=False, temperature=1.0, kl_ratio=False):
    hidden, weight, ids, advantages, old, ref, mask = make_batch(dtype, with_ref)
    if per_token_advantages:
        advantages = advantages[:, None] + 0.3 * torch.randn(B, T)
    with chunked(backend):
        loss, stats = fused_linear_policy_loss(
            hidden, weight, ids, advantages, old, ref, mask, beta=beta,
            kl_estimator=kl_estimator, clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH,
            loss_type=loss_type, temperature=temperature, return_entropy=True, kl_ratio=kl_ratio,
            backend=backend)
    want_loss, want_grads, want = oracle(hidden, weight, ids, advantages, old, ref, mask,
                                         beta=beta, kl_estimator=kl_estimator,
                                         loss_type=loss_type, temperature=temperature,
                                         kl_ratio=kl_ratio)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, want_loss, TOL[dtype], "loss")
    grads = torch.autograd.grad(loss, (hidden, weight))
    for name, got, exp in zip(("hidden", "weight"), grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, exp, TOL[dtype], f"grad_{name}")
    for name in ("logprobs", "ratio", "entropy"):
        assert_close(getattr(stats, name), want[name], TOL[dtype], name)
    if with_ref:
        assert_close(stats.kl, want["kl"], TOL[dtype], "kl")
    else:
        assert stats.kl is None
    assert stats.clipped.dtype == torch.bool
    assert torch.equal(stats.clipped, want["clipped"])
    return stats


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_loss_types_and_kl_estimators_match_float64(backend, kl_estimator, loss_type):
    stats = check_against_oracle(torch.float32, backend, loss_type, kl_estimator)
    low = stats.clipped & (stats.ratio < 1 - EPS_LOW)
    high = stats.clipped & (stats.ratio > 1 + EPS_HIGH)
    assert low.any() and high.any(), "both clipping sides must be exercised"


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_bfloat16_per_token_advantages_and_temperature(backend):
    check_against_oracle(torch.bfloat16, backend, "grpo", "k3", per_token_advantages=True,
                         temperature=0.8)


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_beta_zero_without_reference(backend):
    check_against_oracle(torch.float32, backend, "dapo", "k3", beta=0.0, with_ref=False)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_kl_term_weighted_by_the_ratio(backend, kl_estimator):
    check_against_oracle(torch.float32, backend, "grpo", kl_estimator, beta=0.5, kl_ratio=True)


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_no_old_logprobs_is_on_policy(backend):
    """old_logprobs=None is old = logp held constant: the float64 oracle with old = exact logp."""
    hidden, weight, ids, advantages, _, ref, mask = make_batch(torch.float32)
    with torch.no_grad():
        logsm = torch.log_softmax(hidden.double() @ weight.double().T, -1)
        exact = logsm.gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1)
    with chunked(backend):
        loss, stats = fused_linear_policy_loss(hidden, weight, ids, advantages, None, ref, mask,
                                               beta=0.1, backend=backend)
    want_loss, want_grads, _ = oracle(hidden, weight, ids, advantages, exact, ref, mask,
                                      beta=0.1, kl_estimator="k3", loss_type="grpo")
    assert_close(loss, want_loss, TOL[torch.float32], "loss")
    for name, got, exp in zip(("hidden", "weight"), torch.autograd.grad(loss, (hidden, weight)),
                              want_grads):
        assert_close(got, exp, TOL[torch.float32], f"grad_{name}")
    assert torch.equal(stats.ratio, torch.ones_like(stats.ratio))
    assert not stats.clipped.any()


def test_per_sequence_advantages_equal_their_broadcast():
    hidden, weight, ids, advantages, old, ref, mask = make_batch(torch.float32)
    args = dict(beta=0.05, backend="torch")
    per_seq, _ = fused_linear_policy_loss(hidden, weight, ids, advantages, old, ref, mask, **args)
    per_tok, _ = fused_linear_policy_loss(hidden, weight, ids, advantages[:, None].expand(B, T),
                                          old, ref, mask, **args)
    assert torch.equal(per_seq, per_tok)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_flat_input_with_sequence_ids_equals_batched(loss_type):
    hidden, weight, ids, advantages, old, ref, mask = make_batch(torch.float32)
    args = dict(beta=0.1, loss_type=loss_type, backend="triton")
    batched, _ = fused_linear_policy_loss(hidden, weight, ids, advantages, old, ref, mask,
                                          **args)
    # Sequences in shuffled token order with arbitrary labels.
    order = torch.randperm(B * T)
    labels = torch.tensor([7, 2, 40]).repeat_interleave(T)[order]
    flat = [t.reshape(B * T, *t.shape[2:])[order]
            for t in (hidden, ids, advantages[:, None].expand(B, T), old, ref, mask)]
    flat_loss, stats = fused_linear_policy_loss(
        flat[0], weight, flat[1], flat[2], flat[3], flat[4], flat[5], sequence_ids=labels,
        max_length=T, **args)
    assert stats.ratio.shape == (B * T,)
    assert math.isclose(flat_loss.item(), batched.item(), rel_tol=1e-5, abs_tol=1e-7)


def test_weight_gradient_only_when_weight_requires_grad():
    hidden, weight, ids, advantages, old, ref, mask = make_batch(torch.float32)
    frozen = weight.detach()
    loss, _ = fused_linear_policy_loss(hidden, frozen, ids, advantages, old, ref, mask, beta=0.1,
                                       backend="triton")
    loss.backward()
    assert frozen.grad is None and hidden.grad is not None
    assert (hidden.grad[~mask] == 0).all() and hidden.grad[mask].abs().sum() > 0
    loss, _ = fused_linear_policy_loss(hidden, weight, ids, advantages, old, ref, mask, beta=0.1,
                                       backend="triton")
    loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_native_loss_gradient_comes_from_the_forward(monkeypatch):
    """A plain loss.backward() on the native path must not run the recompute backward."""
    hidden, weight, ids, advantages, old, ref, mask = make_batch(torch.float32)

    def recompute(*args, **kwargs):
        raise AssertionError("the recompute backward ran for a plain loss")

    monkeypatch.setattr(native, "token_scores_backward", recompute)
    with chunked("native"):
        loss, _ = fused_linear_policy_loss(hidden, weight, ids, advantages, old, ref, mask,
                                           beta=0.1, clip_eps_low=EPS_LOW,
                                           clip_eps_high=EPS_HIGH, backend="native")
    loss.backward()
    _, want_grads, _ = oracle(hidden, weight, ids, advantages, old, ref, mask, beta=0.1,
                              kl_estimator="k3", loss_type="grpo")
    assert_close(hidden.grad, want_grads[0], TOL[torch.float32], "grad_hidden")
    assert_close(weight.grad, want_grads[1], TOL[torch.float32], "grad_weight")


def test_native_grad_output_loss_used_twice_and_retained_graph():
    hidden, weight, ids, advantages, old, ref, mask = make_batch(torch.float32)
    with chunked("native"):
        loss, _ = fused_linear_policy_loss(hidden, weight, ids, advantages, old, ref, mask,
                                           beta=0.1, kl_estimator="k2", loss_type="dapo",
                                           clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH,
                                           backend="native")
    _, want_grads, _ = oracle(hidden, weight, ids, advantages, old, ref, mask, beta=0.1,
                              kl_estimator="k2", loss_type="dapo")
    # The loss enters twice, so its node gets grad_output 2.5 + 1 once.
    (2.5 * loss + loss).backward(retain_graph=True)
    assert_close(hidden.grad, 3.5 * want_grads[0], TOL[torch.float32], "grad_hidden")
    assert_close(weight.grad, 3.5 * want_grads[1], TOL[torch.float32], "grad_weight")
    # A second backward through the retained graph recomputes (the stored grads are spent).
    (-0.5 * loss).backward()
    assert_close(hidden.grad, 3.0 * want_grads[0], TOL[torch.float32], "grad_hidden (again)")
    assert_close(weight.grad, 3.0 * want_grads[1], TOL[torch.float32], "grad_weight (again)")


@pytest.mark.parametrize("objective", ["loss+entropy+logprobs", "logprobs_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_stats_on_the_graph_with_bias_match_float64(objective, dtype):
    """An entropy bonus / log-prob term next to the loss (and a bias) on the native path,
    against the same function run in float64 on the PyTorch path (the float64 oracle)."""
    hidden, weight, ids, advantages, old, ref, mask = make_batch(dtype)
    bias = (0.3 * torch.randn(V)).to(dtype).requires_grad_(True)

    def run(h, w, b, backend):
        with chunked(backend):
            loss, stats = fused_linear_policy_loss(
                h, w, ids, advantages, old, ref, mask, beta=0.1, bias=b, temperature=0.8,
                return_entropy=True, backend=backend)
        if objective == "logprobs_only":
            total = (stats.logprobs * torch.linspace(0.5, 1.5, T)).sum()
        else:
            total = 1.5 * loss - 0.05 * stats.entropy.sum() + 0.1 * stats.logprobs.sum()
        return loss, torch.autograd.grad(total, (h, w, b))

    loss, grads = run(hidden, weight, bias, "native")
    exact = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    want_loss, want_grads = run(*exact, "torch")
    assert_close(loss, want_loss, TOL[dtype], "loss")
    for name, got, want, t in zip(("hidden", "weight", "bias"), grads, want_grads,
                                  (hidden, weight, bias)):
        assert got.dtype == t.dtype
        assert_close(got, want, TOL[dtype], f"grad_{name}")


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_triton_token_kernel_fills_poisoned_outputs(with_ref, kl_estimator):
    m = 2500  # three 1024-token blocks, the last one partial
    logp = -torch.rand(m) * 4
    old = logp + 0.4 * torch.randn(m)
    ref = logp + 0.4 * torch.randn(m) if with_ref else None
    adv = torch.randn(m)
    weights = torch.rand(m)
    valid = torch.rand(m) > 0.2
    out = tuple(torch.full((m,), float("nan")) for _ in range(4)) + (
        torch.full((m,), 7, dtype=torch.uint8),)
    options = dict(beta=0.3, kl_estimator=kl_estimator, clip_eps_low=EPS_LOW,
                   clip_eps_high=EPS_HIGH)
    got = policy_loss_triton.policy_token_terms(logp, old, ref, adv, weights, valid, out=out,
                                                **options)
    want = policy_loss_reference.policy_token_terms(
        logp.double(), old.double(), None if ref is None else ref.double(), adv.double(),
        weights.double(), valid, **options)
    for name, g, w, buffer in zip(("loss", "grad", "ratio", "kl", "clipped"), got, want, out):
        if w is None:
            assert g is None and torch.isnan(buffer).all()
            continue
        assert g.data_ptr() == buffer.data_ptr()
        if name == "clipped":
            assert torch.equal(g, w) and set(buffer.tolist()) <= {0, 1}
        else:
            assert torch.isfinite(g).all()
            assert_close(g, w, 1e-5, name)


def test_reference_token_gradient_matches_autograd():
    """The derivative the kernels return is d loss_t / d logp (checked by autograd)."""
    m = 400
    logp = (-torch.rand(m, dtype=torch.float64) * 3).requires_grad_(True)
    old = logp.detach() + 0.4 * torch.randn(m, dtype=torch.float64)
    ref = logp.detach() + 0.4 * torch.randn(m, dtype=torch.float64)
    adv, weights = torch.randn(m, dtype=torch.float64), torch.rand(m, dtype=torch.float64)
    valid = torch.rand(m) > 0.2
    for kl_estimator in ("k1", "k2", "k3"):
        loss_t, grad_t, *_ = policy_loss_reference.policy_token_terms(
            logp, old, ref, adv, weights, valid, beta=0.3, kl_estimator=kl_estimator,
            clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH)
        (auto,) = torch.autograd.grad(loss_t.sum(), logp)
        assert torch.allclose(grad_t, auto, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, ids, advantages, old, ref, mask = make_batch(torch.float32)
    flat_h, flat_ids, flat_old = hidden.reshape(B * T, D), ids.reshape(-1), old.reshape(-1)
    flat_adv, flat_mask = advantages.repeat_interleave(T), mask.reshape(-1)

    def call(*args, **kwargs):
        base = [hidden, weight, ids, advantages, old, ref, mask]
        base[: len(args)] = args
        return fused_linear_policy_loss(*base, **{"backend": "torch", **kwargs})

    cases = [
        (ValueError, "needs ref_logprobs", lambda: fused_linear_policy_loss(
            hidden, weight, ids, advantages, old, None, mask, beta=0.1)),
        (ValueError, "loss_type=", lambda: call(loss_type="ppo")),
        (ValueError, "kl_estimator=", lambda: call(kl_estimator="k4")),
        (ValueError, "beta must be", lambda: call(beta=-1.0)),
        (ValueError, "clip_eps_low must be < 1", lambda: call(clip_eps_low=1.0)),
        (ValueError, "clip_eps_high must be", lambda: call(clip_eps_high=-0.1)),
        (ValueError, "max_length must be", lambda: call(loss_type="dr_grpo", max_length=0)),
        (ValueError, "advantages must have", lambda: call(hidden, weight, ids, advantages[:2])),
        (ValueError, "old_logprobs must have", lambda: call(hidden, weight, ids, advantages,
                                                            old[:, :-1])),
        (ValueError, "ref_logprobs must have", lambda: call(hidden, weight, ids, advantages, old,
                                                            ref.T)),
        (ValueError, "outside the vocabulary", lambda: call(hidden, weight, ids.abs() + V)),
        (ValueError, "needs sequence_ids", lambda: fused_linear_policy_loss(
            flat_h, weight, flat_ids, flat_adv, flat_old, None, flat_mask, loss_type="grpo")),
        (ValueError, "needs max_length", lambda: fused_linear_policy_loss(
            flat_h, weight, flat_ids, flat_adv, flat_old, None, flat_mask, loss_type="dr_grpo",
            sequence_ids=torch.zeros(B * T, dtype=torch.long))),
        (ValueError, "sequence_ids is for flat", lambda: call(
            sequence_ids=torch.zeros(B, T, dtype=torch.long))),
        (TypeError, "same dtype", lambda: call(hidden.bfloat16())),
    ]
    for error, words, fn in cases:
        with pytest.raises(error, match=words):
            fn()
