"""Rewards for RBA's RL step, each a named function, switched on and weighted by RewardSpec.

Two kinds: token rewards [B, G, T] (the dense behaviour reward) and sequence rewards [B, G]
(teacher likelihood, the text metrics, an external reward model). combine_rewards sums each
kind separately, weighted, because they feed different advantage estimators (per-token
reward-to-go versus group-relative).

    specs = [RewardSpec("dense"), RewardSpec("chrf", weight=0.5)]
    rewards = combine_rewards(specs, experience, responses)   # responses[b][g]: decoded text
    rewards.token, rewards.sequence, rewards.components["chrf"]

Text rewards read the reference from experience.metadata[b][spec.reference_key] (default
"response", the manifest's teacher answer y*); a list of strings is several references.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rba_core.errors import ConfigError

from . import text_metrics
from .types import Experience


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (log-probs may arrive in bfloat16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dense_behavior_reward(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Per-token r_t = log p_T(y_t) - log pi_old(y_t), 0 at padding.

    Its expectation under the sampling policy is minus the reverse KL to the teacher, so
    maximising it is on-policy distillation. old_logprobs must come from the policy that
    sampled, at the sampling temperature.
    """
    if teacher_logprobs.shape != old_logprobs.shape or teacher_logprobs.shape != mask.shape:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)}, old_logprobs "
                         f"{tuple(old_logprobs.shape)} and mask {tuple(mask.shape)} must have "
                         "one shape")
    dtype = _float_dtype(teacher_logprobs, old_logprobs)
    return _masked(teacher_logprobs.to(dtype) - old_logprobs.to(dtype), mask.bool())


def sequence_teacher_likelihood(teacher_logprobs: torch.Tensor, mask: torch.Tensor
                                ) -> torch.Tensor:
    """Mean teacher log-prob over each sequence's real tokens [..., T] -> [...]; 0 if empty."""
    if teacher_logprobs.shape != mask.shape:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    mask = mask.bool()
    total = _masked(teacher_logprobs.to(_float_dtype(teacher_logprobs)), mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


@dataclass(frozen=True)
class ExternalReward:
    """A user's reward function behind checks, so a bad score fails loudly, not silently.

    fn(rows, responses, group) gets one entry per response, flat over the batch: rows[i] is
    the data row of response i's prompt, responses[i] its text, group[i] its prompt's index
    (responses with one group index are samples of one prompt). It returns one finite float
    per response.
    """
    target: str
    fn: Callable[[list[Mapping[str, Any]], list[str], list[int]], Sequence[float]]

    def __call__(self, rows: list[Mapping[str, Any]], responses: list[str],
                 group: list[int]) -> list[float]:
        try:
            scores = self.fn(rows, responses, group)
        except Exception as exc:
            raise ConfigError(f"external reward {self.target!r} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().reshape(-1).tolist()
        try:
            scores = list(scores)
        except TypeError:
            raise ConfigError(f"external reward {self.target!r} must return a sequence of "
                              f"{len(responses)} floats, got {type(scores).__name__}") from None
        if len(scores) != len(responses):
            raise ConfigError(f"external reward {self.target!r} returned {len(scores)} scores "
                              f"for {len(responses)} responses; return one per response")
        values = []
        for row, score in enumerate(scores):
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise ConfigError(f"external reward {self.target!r} returned {score!r} for row "
                                  f"{row}; scores must be numbers") from None
            if not math.isfinite(value):
                raise ConfigError(f"external reward {self.target!r} returned {value} for row "
                                  f"{row} (group {group[row]}); scores must be finite")
            values.append(value)
        return values


def load_external_reward(target: str) -> ExternalReward:
    """Import "package.module:function" (or "module:Class.method") as an ExternalReward."""
    module_name, sep, attr_path = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"external reward must be named 'module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"external reward {target!r}: cannot import module {module_name!r} "
                          f"({type(exc).__name__}: {exc}); check the name and that it is on "
                          "PYTHONPATH") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"external reward {target!r}: {module_name!r} has no attribute "
                              f"{attr_path!r}") from None
    if not callable(obj):
        raise ConfigError(f"external reward {target!r} is a {type(obj).__name__}, not a "
                          "callable")
    return ExternalReward(target, obj)


# name -> "token" or "sequence": which of combine_rewards' outputs the reward adds to.
_KINDS = {
    "dense": "token",
    "teacher_likelihood": "sequence",
    "chrf": "sequence",
    "bleu": "sequence",
    "exact_match": "sequence",
    "token_f1": "sequence",
    "external": "sequence",
}
REWARD_NAMES = tuple(_KINDS)

_TEXT_METRICS: dict[str, Callable[[str, str | Sequence[str]], float]] = {
    "chrf": text_metrics.chrf,
    "bleu": text_metrics.bleu,
    "exact_match": text_metrics.exact_match,
    "token_f1": text_metrics.token_f1,
}


@dataclass(frozen=True)
class RewardSpec:
    """One reward switched on: its name, weight, and where its inputs come from.

    reference_key: the metadata field holding the reference(s) of a text reward.
    function: "module:function" of an "external" reward, imported (and checked) here so a
    typo fails when the config is read, not mid-training.
    """
    name: str
    weight: float = 1.0
    reference_key: str = "response"
    function: str | None = None
    external: ExternalReward | None = field(default=None, init=False, repr=False,
                                            compare=False)

    def __post_init__(self) -> None:
        if self.name not in _KINDS:
            raise ConfigError(f"unknown reward {self.name!r}; known rewards: "
                              f"{', '.join(REWARD_NAMES)}")
        if (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                or not math.isfinite(self.weight)):
            raise ConfigError(f"reward {self.name!r}: weight must be a finite number, got "
                              f"{self.weight!r}")
        if self.name == "external":
            if self.function is None:
                raise ConfigError("reward 'external' needs function='module:function' (the "
                                  "callable that scores the responses)")
            # Frozen for hashing and comparison; the loaded callable is a cache of `function`.
            object.__setattr__(self, "external", load_external_reward(self.function))
        elif self.function is not None:
            raise ConfigError(f"reward {self.name!r} takes no function=; only 'external' does")

    @property
    def kind(self) -> str:
        """"token" for per-token rewards [B, G, T], "sequence" for [B, G]."""
        return _KINDS[self.name]

    @property
    def label(self) -> str:
        """The key of this reward in Rewards.components."""
        return f"external:{self.function}" if self.name == "external" else self.name


@dataclass
class Rewards:
    """combine_rewards' result: weighted sums per kind (None when no reward of that kind is
    on) and each reward's unweighted per-sequence value [B, G] for logging (for a token
    reward, its mean over the sequence's real tokens)."""
    sequence: torch.Tensor | None
    token: torch.Tensor | None
    components: dict[str, torch.Tensor]


def _check_responses(responses: Sequence[Sequence[str]] | None, shape: tuple[int, int],
                     name: str) -> Sequence[Sequence[str]]:
    batch, group = shape
    if responses is None:
        raise ConfigError(f"reward {name!r} scores response text; pass responses= (the decoded "
                          f"responses, {batch} lists of {group} strings)")
    if len(responses) != batch or any(len(texts) != group for texts in responses):
        raise ValueError(f"responses must be {batch} lists of {group} strings (one per sample "
                         "of each prompt)")
    return responses


def _text_reward(spec: RewardSpec, experience: Experience,
                 responses: Sequence[Sequence[str]]) -> torch.Tensor:
    metric = _TEXT_METRICS[spec.name]
    scores = []
    for b, (row, texts) in enumerate(zip(experience.metadata, responses)):
        if spec.reference_key not in row:
            raise ConfigError(f"reward {spec.name!r} needs the reference in metadata field "
                              f"{spec.reference_key!r}, which row {b} lacks (it has "
                              f"{sorted(row)}); set RewardSpec(reference_key=...)")
        scores.append([metric(text, row[spec.reference_key]) for text in texts])
    return torch.tensor(scores, dtype=torch.float32, device=experience.tokens.device)


def _external_reward(spec: RewardSpec, experience: Experience,
                     responses: Sequence[Sequence[str]]) -> torch.Tensor:
    batch, group = experience.group_shape
    flat = experience.flatten()
    scores = spec.external(flat.metadata, [text for texts in responses for text in texts],
                           flat.group_index.tolist())
    return torch.tensor(scores, dtype=torch.float32,
                        device=experience.tokens.device).reshape(batch, group)


def _needs(experience: Experience, attribute: str, name: str) -> torch.Tensor:
    value = getattr(experience, attribute)
    if value is None:
        raise ConfigError(f"reward {name!r} needs experience.{attribute}; score the rollouts "
                          "with the teacher first")
    return value


def combine_rewards(specs: Sequence[RewardSpec], experience: Experience,
                    responses: Sequence[Sequence[str]] | None = None) -> Rewards:
    """Weighted sum of the rewards in specs: sequence rewards [B, G], token rewards [B, G, T].

    responses[b][g] is sample g of prompt b as text, needed by the text and external rewards.
    """
    if not specs:
        raise ConfigError(f"no reward is switched on; add at least one RewardSpec (known: "
                          f"{', '.join(REWARD_NAMES)})")
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"rewards {duplicates} are listed more than once; give each one "
                          "RewardSpec and set its weight instead")
    mask = experience.mask
    shape = experience.group_shape
    sequence: torch.Tensor | None = None
    token: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name == "dense":
            values = dense_behavior_reward(_needs(experience, "teacher_logprobs", spec.name),
                                           experience.old_logprobs, mask)
            components[spec.label] = values.sum(-1) / mask.sum(-1).clamp(min=1)
            token = spec.weight * values if token is None else token + spec.weight * values
            continue
        if spec.name == "teacher_likelihood":
            values = sequence_teacher_likelihood(
                _needs(experience, "teacher_logprobs", spec.name), mask)
        elif spec.name == "external":
            values = _external_reward(spec, experience,
                                      _check_responses(responses, shape, spec.name))
        else:
            values = _text_reward(spec, experience, _check_responses(responses, shape, spec.name))
        components[spec.label] = values
        sequence = spec.weight * values if sequence is None else sequence + spec.weight * values
    return Rewards(sequence=sequence, token=token, components=components)
