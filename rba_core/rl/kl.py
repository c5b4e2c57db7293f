"""KL(pi_theta || pi_ref) estimators on sampled tokens, and the controllers of its coefficient.

With d = ref_logp - logp for a token sampled from pi_theta (Schulman, "Approximating KL
divergence", 2020): k1 = -d (unbiased, high variance, can be negative), k2 = d^2 / 2 (biased,
low variance), k3 = exp(d) - d - 1 (unbiased and >= 0; TRL's GRPO default). The same formulas
as the fused policy loss, which applies them per token inside the kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rba_core.errors import ConfigError
from rba_core.kernels.policy_loss_reference import KL_ESTIMATORS


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    d = ref_logprobs - logprobs
    # expm1(d) - d is exp(d) - d - 1 without the cancellation near d = 0, where the policy
    # and the reference agree and the estimate is tiny.
    return torch.expm1(d) - d


# Keyed by the kernel's list, so an estimator added there fails here at import, not silently.
_ESTIMATORS = {name: globals()[f"kl_{name}"] for name in KL_ESTIMATORS}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL estimate with the named estimator; 0 where mask is False."""
    if estimator not in _ESTIMATORS:
        raise ConfigError(f"kl_estimator={estimator!r} is not supported; use one of "
                          f"{KL_ESTIMATORS}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have one shape")
    kl = _ESTIMATORS[estimator](logprobs, ref_logprobs)
    if mask is None:
        return kl
    return torch.where(mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def _check_number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass
class FixedKLController:
    """A constant KL coefficient, with the adaptive controller's interface.

    The coefficient is configuration, not state: load_state_dict checks the kind and keeps the
    configured beta, so changing beta on resume takes effect.
    """
    beta: float

    def __post_init__(self) -> None:
        self.beta = _check_number("beta", self.beta, positive=False)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "fixed")


@dataclass
class AdaptiveKLController:
    """Proportional control of beta toward a target KL (Ziegler et al. 2019, as TRL's PPO).

    update(kl, n): err = clip(kl / target_kl - 1, -0.2, 0.2); beta *= 1 + err * n / horizon,
    where n is the number of samples (or steps) the KL was measured over. beta is the state
    that goes into checkpoints.
    """
    init_beta: float
    target_kl: float
    horizon: float

    def __post_init__(self) -> None:
        self.init_beta = _check_number("init_beta", self.init_beta, positive=True)
        self.target_kl = _check_number("target_kl", self.target_kl, positive=True)
        self.horizon = _check_number("horizon", self.horizon, positive=True)
        self.beta = self.init_beta

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt beta to the KL just measured; returns the new beta."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}; the policy has "
                             "diverged from the reference or the KL was computed on no tokens")
        _check_number("n_steps", n_steps, positive=True)
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "adaptive")
        self.beta = _check_number("beta", state.get("beta"), positive=True)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"the checkpoint holds a {found!r} KL controller but the config asks "
                          f"for a {kind!r} one; use the checkpoint's kind or start a new run")
