"""policy_loss against a plain float64 computation (full logits, log_softmax, PPO clip, KL)."""
import pytest
import torch

from rba_core.errors import ConfigError
from rba_core.rl import policy_loss

N, T, D, V = 4, 6, 16, 97
LENGTHS = (6, 5, 3, 0)  # a row without tokens: grpo still counts it as a sequence
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_inputs(per_row_advantages=False, temperature=1.0):
    hidden = torch.randn(N, T, D)
    weight = torch.randn(V, D) / D ** 0.5
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    tokens = torch.randint(0, V, (N, T)).masked_fill(~mask, -100)
    # At the loss's temperature, so the forced ratios below are the ones the loss sees.
    logp = reference_logp(hidden.double(), weight.double(), tokens, temperature)
    old = logp + 0.3 * torch.randn(N, T, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(N, T, dtype=torch.float64)
    adv = torch.randn(N) if per_row_advantages else torch.randn(N, T)
    # Force both clipped branches to occur: a ratio far above 1 + eps_high where A > 0 and far
    # below 1 - eps_low where A < 0 (rows 0 and 1 share one advantage when it is per row).
    if per_row_advantages:
        adv[0], adv[1] = 1.0, -1.0
        old[0, 0], old[1, 0] = logp[0, 0] - 1.0, logp[1, 0] + 1.0
    else:
        adv[0, 0], adv[0, 1] = 1.0, -1.0
        old[0, 0], old[0, 1] = logp[0, 0] - 1.0, logp[0, 1] + 1.0
    return hidden, weight, tokens, mask, adv, old.float(), ref.float()


def reference_logp(hidden, weight, tokens, temperature):
    logp_all = (hidden @ weight.T / temperature).log_softmax(-1)
    return logp_all.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)


def reference(hidden, weight, tokens, mask, adv, old, ref, *, beta, kl_estimator, loss_type,
              temperature=1.0, entropy_coef=0.0, normalizer=None, max_length=T):
    """Loss and float64 per-token intermediates, every step written out."""
    h, w = hidden.double(), weight.double()
    logp_all = (h @ w.T / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    a = (adv[:, None].expand(N, T) if adv.dim() == 1 else adv).double()
    ratio = torch.exp(logp - old.double())
    per = -torch.minimum(ratio * a, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a)
    kl = None
    if ref is not None:
        d = ref.double() - logp
        kl = {"k1": -d, "k2": 0.5 * d ** 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
        per = per + beta * kl
    per = per - entropy_coef * entropy
    m = mask.double()
    if loss_type == "grpo":
        loss = ((per * m).sum(1) / m.sum(1).clamp(min=1)).sum() / (normalizer or N)
    elif loss_type == "dapo":
        loss = (per * m).sum() / (normalizer or m.sum().clamp(min=1))
    else:
        loss = (per * m).sum() / ((normalizer or N) * max_length)
    return loss, ratio, a, kl, entropy


def leaves(hidden, weight):
    return hidden.clone().requires_grad_(), weight.clone().requires_grad_()


def check_against_reference(inputs, *, backend="auto", **options):
    hidden, weight, tokens, mask, adv, old, ref = inputs
    h, w = leaves(hidden, weight)
    loss, metrics = policy_loss(h, w, tokens, mask, adv, old, ref, eps_low=EPS_LOW,
                                eps_high=EPS_HIGH, backend=backend, **options)
    loss.backward()
    h64, w64 = leaves(hidden.double(), weight.double())
    kl_options = {k: v for k, v in options.items() if k != "return_entropy"}
    kl_options.setdefault("kl_estimator", "k3")
    want, ratio, a, kl, entropy = reference(h64, w64, tokens, mask, adv, old, ref, **kl_options)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)

    active = mask.sum()
    low = (mask & (ratio < 1 - EPS_LOW) & (a < 0)).sum() / active
    high = (mask & (ratio > 1 + EPS_HIGH) & (a > 0)).sum() / active
    assert low > 0 and high > 0, "the inputs must exercise both clipped branches"
    torch.testing.assert_close(metrics["clip_fraction_low"].double(), low.double())
    torch.testing.assert_close(metrics["clip_fraction_high"].double(), high.double())
    torch.testing.assert_close(metrics["clip_fraction"].double(), (low + high).double())
    real = ratio[mask]
    for name, value in (("ratio_min", real.min()), ("ratio_max", real.max()),
                        ("ratio_mean", real.mean())):
        torch.testing.assert_close(metrics[name].double(), value.detach(), rtol=1e-5, atol=1e-6)
    assert int(metrics["active_tokens"]) == sum(LENGTHS)
    if ref is None:
        assert "ref_kl_mean" not in metrics
    else:
        torch.testing.assert_close(metrics["ref_kl_mean"].double(), kl[mask].mean().detach(),
                                   rtol=1e-5, atol=1e-6)
    if options.get("entropy_coef", 0) > 0 or options.get("return_entropy"):
        torch.testing.assert_close(metrics["entropy_mean"].double(),
                                   entropy[mask].mean().detach(), rtol=1e-5, atol=1e-6)
    else:
        assert "entropy_mean" not in metrics
    assert all(not value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_matches_float64_reference(loss_type, beta):
    inputs = make_inputs()
    if beta == 0.0:
        inputs = (*inputs[:-1], None)
    check_against_reference(inputs, beta=beta, loss_type=loss_type)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2"])
def test_k1_k2_estimators(kl_estimator):
    check_against_reference(make_inputs(), beta=0.3, kl_estimator=kl_estimator,
                            loss_type="dapo")


def test_per_row_advantages_temperature_and_entropy_bonus():
    inputs = make_inputs(per_row_advantages=True, temperature=0.7)
    check_against_reference(inputs, beta=0.05, loss_type="grpo", temperature=0.7,
                            entropy_coef=0.01)


def test_plain_torch_backend_and_entropy_metric_only():
    check_against_reference(make_inputs(), beta=0.1, loss_type="dr_grpo", backend="torch",
                            return_entropy=True)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_normalizer_makes_shards_add_up_to_the_whole(loss_type):
    hidden, weight, tokens, mask, adv, old, ref = make_inputs()
    options = dict(beta=0.1, eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_type=loss_type,
                   entropy_coef=0.02, max_length=T + 2)
    h, w = leaves(hidden, weight)
    whole, _ = policy_loss(h, w, tokens, mask, adv, old, ref, **options)
    whole.backward()
    normalizer = float(mask.sum()) if loss_type == "dapo" else float(N)
    hs, ws = leaves(hidden, weight)
    total = 0.0
    for part in (slice(0, 1), slice(1, N)):
        loss, _ = policy_loss(hs[part], ws, tokens[part], mask[part], adv[part], old[part],
                              ref[part], normalizer=normalizer, **options)
        total = total + loss
    total.backward()
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws.grad, w.grad, rtol=1e-5, atol=1e-6)
    # Without the normaliser each shard divides by its own count and the sum is not the loss.
    unnormalised = sum(policy_loss(hidden[p], weight, tokens[p], mask[p], adv[p], old[p], ref[p],
                                   **options)[0] for p in (slice(0, 1), slice(1, N)))
    assert not torch.allclose(unnormalised, whole.detach())


def test_no_active_token_gives_zero_loss_and_finite_metrics():
    hidden, weight, tokens, _, adv, old, ref = make_inputs()
    mask = torch.zeros(N, T, dtype=torch.bool)
    h, w = leaves(hidden, weight)
    loss, metrics = policy_loss(h, w, tokens.clamp(min=0), mask, adv, old, ref, beta=0.1,
                                eps_low=0.2, eps_high=0.2, loss_type="dapo", entropy_coef=0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(h.grad) == 0
    assert all(bool(torch.isfinite(v)) for v in metrics.values())
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0


@pytest.mark.parametrize("bad, name", [
    (dict(eps_low=1.0), "eps_low"), (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_high=-0.01), "eps_high"), (dict(eps_high=float("nan")), "eps_high"),
    (dict(beta=-1.0), "beta"), (dict(loss_type="bnpo"), "loss_type"),
    (dict(kl_estimator="k4"), "kl_estimator"), (dict(normalizer=0.0), "normalizer"),
    (dict(entropy_coef=-0.1), "entropy_coef"), (dict(max_length=0), "max_length"),
])
def test_bad_settings_raise_config_error_naming_the_parameter(bad, name):
    hidden, weight, tokens, mask, adv, old, ref = make_inputs()
    options = dict(beta=0.1, eps_low=0.2, eps_high=0.2) | bad
    with pytest.raises(ConfigError, match=name):
        policy_loss(hidden, weight, tokens, mask, adv, old, ref, **options)


def test_beta_without_reference_is_refused():
    hidden, weight, tokens, mask, adv, old, _ = make_inputs()
    with pytest.raises(ConfigError, match="ref_logprobs"):
        policy_loss(hidden, weight, tokens, mask, adv, old, None, beta=0.1, eps_low=0.2,
                    eps_high=0.2)
