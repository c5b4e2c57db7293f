"""KL estimators against their float64 formulas; the KL controllers' update rule."""
import pytest
import torch

from rba_core.errors import ConfigError
from rba_core.rl import AdaptiveKLController, FixedKLController, kl_estimate


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_match_float64_formulas(estimator):
    logp = -torch.rand(3, 7) * 4
    ref = logp + torch.randn(3, 7)
    ref[0, 0] = logp[0, 0] + 1e-6  # near agreement, where exp(d) - d - 1 cancels
    mask = torch.rand(3, 7) > 0.3
    d = ref.double() - logp.double()
    want = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[estimator]
    torch.testing.assert_close(kl_estimate(logp.double(), ref.double(), estimator), want)
    got = kl_estimate(logp, ref, estimator, mask)
    torch.testing.assert_close(got.double(), torch.where(mask, want, 0.0), rtol=1e-5, atol=1e-6)
    if estimator != "k1":
        assert bool((got >= 0).all())


def test_unknown_estimator_is_refused():
    with pytest.raises(ConfigError, match="k1"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k5")


def test_adaptive_controller_follows_hand_computed_sequence():
    ctl = AdaptiveKLController(init_beta=0.1, target_kl=6.0, horizon=10_000)
    # kl = 12: error 1.0 clipped to 0.2; beta *= 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.update(12.0, 256) == pytest.approx(0.100512, rel=1e-12)
    # kl on target: no change
    assert ctl.update(6.0, 256) == pytest.approx(0.100512, rel=1e-12)
    # kl = 3: error -0.5 clipped to -0.2; beta *= 1 - 0.2 * 512 / 10000 = 0.98976
    assert ctl.update(3.0, 512) == pytest.approx(0.09948275712, rel=1e-12)
    # kl = 6.6: error 0.1 inside the clip; beta *= 1 + 0.1 * 1000 / 10000 = 1.01
    assert ctl.update(6.6, 1000) == pytest.approx(0.1004775846912, rel=1e-12)
    assert ctl.beta == pytest.approx(0.1004775846912, rel=1e-12)


def test_adaptive_state_round_trip_resumes_the_same_stream():
    ctl = AdaptiveKLController(0.05, 0.1, 100)
    ctl.update(0.3, 10)
    resumed = AdaptiveKLController(0.05, 0.1, 100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.beta == ctl.beta != 0.05
    assert resumed.update(0.02, 7) == ctl.update(0.02, 7)


def test_fixed_controller_keeps_its_configured_beta():
    ctl = FixedKLController(0.04)
    assert ctl.update(100.0, 512) == 0.04
    ctl.load_state_dict({"kind": "fixed", "beta": 0.5})
    assert ctl.beta == 0.04
    with pytest.raises(ConfigError, match="'adaptive'"):
        ctl.load_state_dict(AdaptiveKLController(0.1, 1.0, 10).state_dict())
    with pytest.raises(ConfigError, match="'fixed'"):
        AdaptiveKLController(0.1, 1.0, 10).load_state_dict(ctl.state_dict())


@pytest.mark.parametrize("args, name", [
    ((0.0, 1.0, 10), "init_beta"), ((0.1, -1.0, 10), "target_kl"), ((0.1, 1.0, 0), "horizon"),
])
def test_bad_controller_settings(args, name):
    with pytest.raises(ConfigError, match=name):
        AdaptiveKLController(*args)
    with pytest.raises(ConfigError, match="beta"):
        FixedKLController(-0.1)


def test_non_finite_kl_is_refused():
    with pytest.raises(ValueError, match="current_kl"):
        AdaptiveKLController(0.1, 1.0, 10).update(float("nan"), 4)
