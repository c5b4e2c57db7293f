"""RBA's RL step (Stage 2 of ../shared/RBA.md) as a train task, for the SpeechLM and in text mode.

For each batch of B prompts: G rollouts each from the policy through the rollout engine (the
prompt prefilled once), the teacher scoring all G on its own prompt's shared prefix (the
transcript for the SpeechLM), rewards and advantages (``rba_core.rl``), then ``inner_epochs``
passes over ``minibatches`` slices of the same rollouts, each one trainer step through the
shared-prefix training forward and the fused clipped policy loss.

The trainer stays task-agnostic: the epoch's batches are *update units*, and the rollout of a
prompt batch happens lazily when its first unit is drawn, so it always samples the policy as it
is then. Old log-probs come from the rollout itself (at temperature 1; otherwise one no-grad
scoring pass at the sampling temperature), so ``inner_epochs = 1`` costs no extra forward.

    step = RLStep(policy_llm, teacher_llm, tokenizer, RBAConfig())
    experience = step.rollout(prompts, seeds)            # no grad
    loss, metrics = step.loss(prompts, experience)       # differentiable
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from rba_core.errors import ConfigError
from rba_core.models.lora import lora_disabled
from rba_core.rl import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    RewardSpec,
    combine_advantages,
    combine_rewards,
    group_advantages,
    policy_loss,
    token_advantages,
)
from rba_core.rollout import RolloutEngine, SamplingConfig, shared_prefix_hidden
from rba_core.rollout.engine import FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING
from rba_core.seeding import stable_seed
from rba_core.train.config import check_at_least, check_choice, check_finite, invalid
from rba_core.tasks.speech import (
    EpochBatches, SpeechTaskConfig, describe_augment, fsdp_layers, load_augmenter, load_dataset,
    load_speechlm,
)

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_KINDS = ("grpo", "rloo")
ADVANTAGE_SCALES = ("group", "batch", "none")
TOKEN_BASELINES = ("none", "group")
KL_ESTIMATORS = ("k1", "k2", "k3")
# The rewards that read the teacher's log-probs of the policy's token ids; the others score
# decoded text (or call a function) and never touch the teacher.
TEACHER_REWARDS = ("dense", "teacher_likelihood")


@dataclass
class RewardWeights:
    """Weight of each reward (0 = off). ``dense``: per token log p_T - log pi_old (on-policy
    reverse KL to the teacher, the default); ``teacher_likelihood``: mean log p_T of the
    response; ``chrf`` / ``bleu`` / ``exact_match`` / ``token_f1``: against the row's
    synthesized reference; ``external``: the callable named in ``rba.external_reward``."""

    dense: float = 1.0
    teacher_likelihood: float = 0.0
    chrf: float = 0.0
    bleu: float = 0.0
    exact_match: float = 0.0
    token_f1: float = 0.0
    external: float = 0.0


@dataclass
class RBAConfig:
    """The ``rba`` section of a train config. Defaults follow on-policy distillation practice
    (dense reward, discount 0, no group normalisation of that term) with GRPO/DAPO's clipped
    surrogate (eps 0.2 / 0.28, dapo token normalisation) and no reference KL."""

    group_size: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 48
    rewards: RewardWeights = field(default_factory=RewardWeights)
    external_reward: str | None = None
    reference_key: str = "response"
    advantage: str = "grpo"
    advantage_scale: str = "group"
    gamma: float = 0.0
    token_baseline: str = "none"
    loss_type: str = "dapo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    kl_estimator: str = "k3"
    target_kl: float = 0.0
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    inner_epochs: int = 1
    minibatches: int = 1
    eval_every: int = 0
    eval_rows: int = 8

    def validate(self, prefix: str = "rba") -> None:
        for key in ("group_size", "kl_horizon", "inner_epochs", "minibatches", "eval_rows"):
            check_at_least(f"{prefix}.{key}", getattr(self, key), 1)
        check_at_least(f"{prefix}.eval_every", self.eval_every, 0)
        check_at_least(f"{prefix}.top_k", self.top_k, 0)
        for key, choices in (("advantage", ADVANTAGE_KINDS), ("loss_type", LOSS_TYPES),
                             ("advantage_scale", ADVANTAGE_SCALES),
                             ("token_baseline", TOKEN_BASELINES),
                             ("kl_estimator", KL_ESTIMATORS)):
            check_choice(f"{prefix}.{key}", getattr(self, key), choices)
        check_finite(f"{prefix}.temperature", self.temperature, 0.0, low_open=True,
                     allowed="a number > 0 (greedy rollouts would make every group identical)")
        check_finite(f"{prefix}.top_p", self.top_p, 0.0, 1.0, low_open=True,
                     allowed="a number in (0, 1]")
        check_finite(f"{prefix}.gamma", self.gamma, 0.0, 1.0, allowed="a number in [0, 1]")
        check_finite(f"{prefix}.eps_low", self.eps_low, 0.0, 1.0, high_open=True,
                     allowed="a number in [0, 1) (the ratio floor is 1 - eps_low)")
        for key, meaning in (("eps_high", "the ratio ceiling is 1 + eps_high"),
                             ("beta", "0 switches the reference KL off"),
                             ("target_kl", "0 = a fixed beta; > 0 adapts beta towards it"),
                             ("entropy_coef", "0 = off")):
            check_finite(f"{prefix}.{key}", getattr(self, key), 0.0,
                         allowed=f"a number >= 0 ({meaning})")
        if self.target_kl > 0 and self.beta == 0:
            invalid(f"{prefix}.beta", f"> 0 when {prefix}.target_kl is set (the controller "
                    "adapts beta from it)", self.beta)
        weights = {f.name: getattr(self.rewards, f.name) for f in fields(self.rewards)}
        for name, weight in weights.items():
            check_finite(f"{prefix}.rewards.{name}", weight, allowed="a finite number (0 = off)")
        if not any(weights.values()):
            raise ConfigError(f"{prefix}.rewards: every weight is 0; switch on at least one "
                              f"reward (e.g. {prefix}.rewards.dense=1.0)")
        sequence_on = any(w for n, w in weights.items() if n != "dense")
        if (sequence_on or self.token_baseline == "group") and self.group_size < 2:
            invalid(f"{prefix}.group_size", ">= 2 with a group baseline (a sequence reward, or "
                    f"{prefix}.token_baseline=group): one sample has no group to compare with",
                    self.group_size)
        if self.rewards.external and not self.external_reward:
            raise ConfigError(f"{prefix}.rewards.external is on but {prefix}.external_reward "
                              "is not set; name the callable as 'module:function'")
        self.reward_specs()  # imports the external callable: a typo fails now, not mid-run

    def teacher_rewards(self) -> list[str]:
        """The rewards switched on that score the policy's token ids under the teacher."""
        return [name for name in TEACHER_REWARDS if getattr(self.rewards, name)]

    def reward_specs(self) -> list[RewardSpec]:
        specs = []
        for f in fields(self.rewards):
            weight = getattr(self.rewards, f.name)
            if weight:
                specs.append(RewardSpec(
                    f.name, float(weight), reference_key=self.reference_key,
                    function=self.external_reward if f.name == "external" else None))
        return specs

    def sampling(self, stop_ids: Sequence[int]) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens,
                              stop_ids=tuple(int(t) for t in stop_ids))


def other_tokenizer_error(config: RBAConfig, detail: str, *, key: str = "model.teacher",
                          prefix: str = "rba") -> ConfigError:
    """The refusal of a teacher that cannot score the policy's token ids (``detail`` says why),
    with the fixes that fit ``config``'s rewards. A teacher with another tokenizer is refused
    even when only text rewards are on: they score against the references in the data, so the
    run does not need it, and the held-out checks (``eval_every``) would score the policy's
    ids under it. Its place is synthesis (``rba synth --teacher DIR`` writes plain text)."""
    readers = config.teacher_rewards()
    if readers:
        on = " and ".join(f"{prefix}.rewards.{name}" for name in readers)
        off = " ".join(f"{prefix}.rewards.{name}=0" for name in readers)
        return ConfigError(
            f"{key}: {detail}; with {on} on, the teacher scores the policy's token ids, so "
            "the teacher and the policy must share one tokenizer. Fix: name a teacher with the "
            f"policy LLM's tokenizer (its model family), leave {key} unset (the policy's own "
            f"LLM reads the transcript), or set {off} and train on a text reward against the "
            f"references that teacher wrote with `rba synth --teacher DIR` (e.g. "
            f"{prefix}.rewards.chrf=1.0), with {key} unset")
    return ConfigError(
        f"{key}: {detail}; no reward on reads the teacher (the rewards on score the "
        "decoded text, against the data's references), so this run does not need it, and one "
        "with another tokenizer cannot score the policy's answers in the held-out checks. "
        f"Fix: leave {key} unset (a teacher with another tokenizer belongs in `rba synth "
        "--teacher DIR`), or name one with the policy LLM's tokenizer")


def check_teacher(config: RBAConfig, policy_llm: nn.Module, teacher_llm: nn.Module,
                  tokenizer: Any = None, teacher_tokenizer: Any = None, *,
                  key: str = "model.teacher") -> None:
    """Refuse a teacher that does not map every token to the policy's id: compared by the
    tokenizers' vocabularies when both are given (a vocabulary of the same size with other
    tokens is caught too), and always by the LM heads' rows."""
    if tokenizer is not None and teacher_tokenizer is not None \
            and not tokenizer.same_vocabulary(teacher_tokenizer):
        raise other_tokenizer_error(
            config, f"the teacher's tokenizer ({teacher_tokenizer.vocab_size} tokens) does not "
            f"map tokens to the same ids as the policy's ({tokenizer.vocab_size} tokens)",
            key=key)
    rows, policy_rows = teacher_llm.lm_head_weight.shape[0], policy_llm.lm_head_weight.shape[0]
    if rows != policy_rows:
        raise other_tokenizer_error(
            config, f"the teacher's vocabulary has {rows} rows and the policy's {policy_rows}",
            key=key)


class RLPrompts(Protocol):
    """A batch of B prompts as the RL step sees it, whatever the modality.

    ``policy(indices)`` gives each chosen prompt as the policy reads it (token ids ``[P]`` or
    input embeddings ``[P, hidden]``), recomputed under the current weights and with autograd
    when grad is enabled (a SpeechLM's prompt embeddings come from the trainable adapter);
    ``teacher`` holds the teacher's prompt token ids; ``rows`` one metadata dict per prompt
    (the reference answer under ``rba.reference_key``, ids, ...)."""

    rows: list[dict[str, Any]]
    teacher: list[torch.Tensor]

    def policy(self, indices: Sequence[int]) -> list[torch.Tensor]: ...


@dataclass
class TextPrompts:
    """Text mode: the policy reads token ids (its own chat prompt); nothing trainable feeds
    the prompt, so ``policy`` returns the same ids each time."""

    ids: list[torch.Tensor]
    teacher: list[torch.Tensor]
    rows: list[dict[str, Any]]

    def policy(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return [self.ids[i] for i in indices]


class ReferenceWeights:
    """pi_ref: the trainable tensors as they were when RL started, swapped in for the
    reference scoring. Only the trainable part is copied (the adapter, LoRA), never the
    frozen model."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.saved = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, ref in zip(self.params, self.saved):
                p.copy_(ref)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, now in zip(self.params, current):
                    p.copy_(now)

    def state_dict(self) -> dict[str, Any]:
        return {"saved": [t.cpu() for t in self.saved]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["saved"]
        if len(saved) != len(self.params) or any(
                tuple(s.shape) != tuple(p.shape) for s, p in zip(saved, self.params)):
            raise ConfigError("the checkpoint's reference weights do not match this model's "
                              "trainable tensors; resume with the config the run started with")
        self.saved = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(saved, self.params)]


@dataclass
class RolloutStats:
    """What a rollout measured, for the step's metrics."""

    rollout_s: float
    scoring_s: float
    tokens: int
    metrics: dict[str, float]


class RLStep:
    """One RL step's parts over a policy LLM, its teacher and the config; knows nothing of
    audio (prompts arrive as ``RLPrompts``).

    ``teacher_llm`` may be the policy LLM itself (the default teacher: LoRA is switched off
    while it scores). ``reference`` is needed when ``beta > 0``: ``ReferenceWeights`` (the
    trainable tensors at the start, swapped in to score: a SpeechLM's adapter), or, in text
    mode, a frozen copy of the policy LLM that scores the same token-id prompts.
    ``decode`` turns token ids into text for text rewards and loop detection. Another
    teacher must share the policy's tokenizer (``check_teacher``); pass ``tokenizer`` and
    ``teacher_tokenizer`` to compare their vocabularies, not only the LM heads' sizes.
    """

    def __init__(self, policy_llm: nn.Module, teacher_llm: nn.Module, config: RBAConfig, *,
                 stop_ids: Sequence[int], decode: Callable[[list[int]], str],
                 reference: "ReferenceWeights | nn.Module | None" = None,
                 tokenizer: Any = None, teacher_tokenizer: Any = None) -> None:
        config.validate()
        if teacher_llm is not policy_llm:
            check_teacher(config, policy_llm, teacher_llm, tokenizer, teacher_tokenizer)
        if config.beta > 0 and reference is None:
            raise ValueError("RLStep: beta > 0 needs reference= (ReferenceWeights of the "
                             "trainable tensors at the start of RL)")
        self.policy = policy_llm
        self.teacher = teacher_llm
        self.config = config
        self.sampling = config.sampling(stop_ids)
        self.decode = decode
        self.reference = reference
        self.specs = config.reward_specs()
        # Only the dense and teacher-likelihood rewards read the teacher's scores; a run
        # without them (e.g. GRPO on a task reward) skips that pass.
        self.needs_teacher = bool(config.teacher_rewards())
        # When the decoder's own weights train (a full fine-tune), every update makes the
        # engine's packed decode copy stale: drop it after each rollout instead of holding a
        # second copy of the weights through the update.
        self.release_packed = any(p.requires_grad for name, p in policy_llm.named_parameters()
                                  if "lora" not in name)
        self.kl = (AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon)
                   if config.target_kl > 0 else FixedKLController(config.beta))
        self.policy_engine = RolloutEngine(policy_llm, max_prompt_len=1 << 16,
                                           max_new_tokens=config.max_new_tokens)
        self.teacher_engine = (self.policy_engine if teacher_llm is policy_llm else
                               RolloutEngine(teacher_llm, max_prompt_len=1 << 16,
                                             max_new_tokens=config.max_new_tokens))

    # ------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def rollout(self, prompts: RLPrompts, seeds: Sequence[int]) -> tuple[Experience, RolloutStats]:
        """G samples of every prompt, scored by the teacher (and the reference), with rewards
        and advantages: everything the updates on this batch need."""
        cfg = self.config
        B, G = len(prompts.rows), cfg.group_size
        start = time.perf_counter()
        was_training = self.policy.training
        self.policy.eval()
        try:
            rows = prompts.policy(range(B))
            batch = self.policy_engine.generate(rows, G, self.sampling, seeds=list(seeds))
        finally:
            self.policy.train(was_training)
            if self.release_packed:
                self.policy_engine.release_packed_weights()
        rollout_s = time.perf_counter() - start

        start = time.perf_counter()
        teacher_logp = None
        if self.needs_teacher:
            scoring = lora_disabled(self.teacher) if self.teacher is self.policy else \
                contextlib.nullcontext()
            with scoring:
                teacher_logp = self.teacher_engine.score(prompts.teacher, batch.tokens,
                                                         batch.lengths).logprobs
        mask = batch.mask
        old = batch.logprobs
        if cfg.temperature != 1.0:
            # The rollout's log-probs are the untempered model's; the surrogate's ratio is
            # taken at the sampling temperature, so its old side must be too.
            old = self._policy_logprobs(prompts, batch.tokens, batch.lengths, cfg.temperature)
        ref = None
        if self.kl.beta > 0:
            if isinstance(self.reference, nn.Module):
                ref = self._policy_logprobs(prompts, batch.tokens, batch.lengths,
                                            cfg.temperature, model=self.reference)
            else:
                with self.reference.active():
                    ref = self._policy_logprobs(prompts, batch.tokens, batch.lengths,
                                                cfg.temperature)
        scoring_s = time.perf_counter() - start

        texts = [[self.decode(ids) for ids in group] for group in batch.sequences()]
        experience = Experience(
            tokens=batch.tokens, mask=mask, old_logprobs=old, ref_logprobs=ref,
            teacher_logprobs=teacher_logp, lengths=batch.lengths,
            finish_reasons=batch.finish_reasons, metadata=list(prompts.rows))
        # The dense reward is the reverse KL to the teacher at the *untempered* policy.
        rewards = combine_rewards(self.specs, replace(experience, old_logprobs=batch.logprobs),
                                  texts)
        sequence_adv = None
        if rewards.sequence is not None:
            sequence_adv = group_advantages(rewards.sequence, kind=cfg.advantage,
                                            scale=cfg.advantage_scale)
        token_adv = None
        if rewards.token is not None:
            token_adv = token_advantages(rewards.token, mask, gamma=cfg.gamma,
                                         baseline=cfg.token_baseline)
        experience.sequence_rewards = rewards.sequence
        experience.token_rewards = rewards.token
        experience.advantages = combine_advantages(sequence_adv, token_adv, mask)
        metrics = self._rollout_metrics(batch.logprobs, teacher_logp, mask, batch.lengths,
                                        batch.finish_reasons, texts, rewards.components)
        tokens = int(batch.lengths.sum())
        return experience, RolloutStats(rollout_s, scoring_s, tokens, metrics)

    def _policy_logprobs(self, prompts: RLPrompts, tokens: torch.Tensor, lengths: torch.Tensor,
                         temperature: float, model: nn.Module | None = None) -> torch.Tensor:
        from rba_core.rollout import shared_prefix_logprobs

        rows = prompts.policy(range(tokens.shape[0]))
        return shared_prefix_logprobs(model if model is not None else self.policy, rows,
                                      tokens, lengths, temperature=temperature).logprobs

    def _rollout_metrics(self, policy_logp: torch.Tensor, teacher_logp: torch.Tensor | None,
                         mask: torch.Tensor, lengths: torch.Tensor, reasons: list[list[str]],
                         texts: list[list[str]], components: dict[str, torch.Tensor]
                         ) -> dict[str, float]:
        from rba_core.synth.text import repetition_reason

        active = mask.sum().clamp(min=1)
        flat_reasons = [r for group in reasons for r in group]
        flat_texts = [t for group in texts for t in group]
        n = max(len(flat_reasons), 1)
        metrics = {
            "response_length": float(lengths.float().mean()),
            "stopped_share": sum(r in (FINISH_STOP, FINISH_STOP_STRING)
                                 for r in flat_reasons) / n,
            "truncated_share": sum(r == FINISH_LENGTH for r in flat_reasons) / n,
            "looping_share": sum(repetition_reason(t) is not None for t in flat_texts) / n,
        }
        if teacher_logp is not None:
            metrics["teacher_reverse_kl"] = float(((policy_logp - teacher_logp) * mask).sum()
                                                  / active)
        for label, values in components.items():
            metrics[f"reward_{label}"] = float(values.float().mean())
        return metrics

    # ---------------------------------------------------------------------------- update
    def minibatch_prompts(self, num_prompts: int, minibatch: int) -> list[int]:
        """The prompt indices of minibatch ``minibatch`` (whole groups: a shared prefix)."""
        per = -(-num_prompts // self.config.minibatches)
        return list(range(minibatch * per, min(num_prompts, (minibatch + 1) * per)))

    def loss(self, prompts: RLPrompts, experience: Experience,
             indices: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped surrogate (+ beta * reference KL) on prompts ``indices`` (all when
        None) of ``experience``, through the shared-prefix training forward: local mean over
        this minibatch, as ``loss_type`` defines it (the trainer's ``batch_weight`` makes it
        the global one across micro-batches and ranks)."""
        cfg = self.config
        B, G, T = experience.tokens.shape
        idx = list(range(B)) if indices is None else list(indices)
        pick = torch.as_tensor(idx, dtype=torch.long, device=experience.tokens.device)
        tokens, lengths = experience.tokens[pick], experience.lengths[pick]
        hidden = shared_prefix_hidden(self.policy, prompts.policy(idx), tokens, lengths)
        n = len(idx) * G

        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[pick].reshape(n, T)

        weight = self.policy.lm_head_weight
        loss, stats = policy_loss(
            hidden.reshape(n, T, -1), weight.to(hidden.dtype), tokens.reshape(n, T),
            flat(experience.mask), flat(experience.advantages), flat(experience.old_logprobs),
            flat(experience.ref_logprobs), beta=self.kl.beta, kl_estimator=cfg.kl_estimator,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_type=cfg.loss_type,
            temperature=cfg.temperature, entropy_coef=cfg.entropy_coef, return_entropy=True,
            max_length=cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else None)
        metrics = {key: float(value) for key, value in stats.items()}
        metrics["beta"] = self.kl.beta
        return loss, metrics

    def batch_weight(self, experience: Experience, indices: Sequence[int]) -> float:
        """What this minibatch's loss is a mean over: active tokens for dapo, sequences for
        grpo and dr_grpo. The trainer weights micro-batches and ranks by it."""
        pick = torch.as_tensor(list(indices), dtype=torch.long, device=experience.mask.device)
        if self.config.loss_type == "dapo":
            return float(experience.mask[pick].sum())
        return float(len(indices) * experience.tokens.shape[1])

    def after_update(self, ref_kl: float | None) -> None:
        """Let an adaptive KL controller see the measured reference KL of the last step."""
        if ref_kl is not None and isinstance(self.kl, AdaptiveKLController):
            self.kl.update(ref_kl, 1)

    def state_dict(self) -> dict[str, Any]:
        state = {"kl": self.kl.state_dict()}
        if isinstance(self.reference, ReferenceWeights):
            state["reference"] = self.reference.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])
        if isinstance(self.reference, ReferenceWeights):
            self.reference.load_state_dict(state["reference"])


@dataclass
class UpdateUnit:
    """One trainer step's share of a rollout: prompt batch ``batch_index`` of the epoch, its
    experience, and which minibatch of which inner epoch this step trains on."""

    batch_index: int
    prompts: RLPrompts | None
    experience: Experience | None
    indices: list[int]
    stats: RolloutStats | None


class RolloutUnits:
    """One rank's update units of one epoch: ``inner_epochs * minibatches`` units per prompt
    batch, the batch rolled out (with the policy as it is then) when its first unit is drawn.
    ``iter_from(n)`` resumes at unit n; a resume inside a batch's units reuses the experience
    the task checkpointed rather than sampling again with newer weights."""

    def __init__(self, task: "RLTask", prompt_batches: Any, epoch: int, seed: int) -> None:
        self.task = task
        self.prompt_batches = prompt_batches
        self.epoch = epoch
        self.seed = seed
        self.per_batch = task.step.config.inner_epochs * task.step.config.minibatches

    def __len__(self) -> int:
        return len(self.prompt_batches) * self.per_batch

    def __iter__(self) -> Iterator[UpdateUnit]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[UpdateUnit]:
        first_batch, first_unit = divmod(start, self.per_batch)
        source = self.prompt_batches.iter_from(first_batch)
        for j, raw in enumerate(source, start=first_batch):
            prompts = None if raw is None else self.task.prompts(raw)
            key = (self.epoch, j)
            experience, stats = None, None
            if prompts is not None:
                if first_unit and j == first_batch and self.task.saved_key == key:
                    experience = self.task.saved_experience
                else:
                    seeds = [stable_seed(self.seed, self.epoch, row.get("id", i))
                             for i, row in enumerate(prompts.rows)]
                    experience, stats = self.task.step.rollout(prompts, seeds)
                self.task.remember(key, experience)
            for unit in range(first_unit if j == first_batch else 0, self.per_batch):
                minibatch = unit % self.task.step.config.minibatches
                indices = ([] if prompts is None else
                           self.task.step.minibatch_prompts(len(prompts.rows), minibatch))
                yield UpdateUnit(j, prompts, experience, indices, stats if unit == 0 else None)
            first_unit = 0


class RLTask(ABC):
    """The RL step as a ``TrainTask``: subclasses say how a raw batch becomes ``RLPrompts``
    (``prompts``) and where raw batches come from (``prompt_batches``)."""

    step: RLStep

    def __init__(self, step: RLStep, trainable: Sequence[nn.Parameter]) -> None:
        self.step = step
        self.trainable = list(trainable)
        self.saved_key: tuple[int, int] | None = None
        self.saved_experience: Experience | None = None

    @abstractmethod
    def prompts(self, raw: Any) -> RLPrompts:
        """A raw batch (a ``SpeechBatch``, a list of rows, ...) as the RL step's prompts."""

    @abstractmethod
    def prompt_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> Any:
        """This rank's raw batches of one epoch, with ``len()`` and ``iter_from(n)``."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.trainable

    def train_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> RolloutUnits:
        return RolloutUnits(self, self.prompt_batches(epoch, rank, world_size, seed), epoch, seed)

    def remember(self, key: tuple[int, int], experience: Experience | None) -> None:
        self.saved_key, self.saved_experience = key, experience

    def batch_weight(self, unit: UpdateUnit) -> float:
        if unit.experience is None:
            return 0.0
        return self.step.batch_weight(unit.experience, unit.indices)

    def loss(self, unit: UpdateUnit) -> tuple[torch.Tensor, dict[str, float]]:
        if unit.experience is None or not unit.indices:
            # Nothing of this rank's share loaded: a zero loss keeps ranks stepping together.
            zero = sum(p.sum() for p in self.trainable) * 0.0
            return zero, {"empty_batches": 1.0}
        start = time.perf_counter()
        loss, metrics = self.step.loss(unit.prompts, unit.experience, unit.indices)
        metrics["update_s"] = time.perf_counter() - start
        if unit.stats is not None:
            s = unit.stats
            metrics.update(s.metrics)
            metrics["rollout_s"] = s.rollout_s
            metrics["scoring_s"] = s.scoring_s
            metrics["rollout_tokens_per_s"] = s.tokens / max(s.rollout_s, 1e-9)
        return loss, metrics

    def on_step_end(self, step: int, record: dict[str, Any]) -> dict[str, float] | None:
        """After each optimizer step: the adaptive KL controller sees the step's measured
        reference KL (a skipped step teaches it nothing)."""
        if not record.get("skipped"):
            self.step.after_update(record.get("ref_kl_mean"))
        return None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step.state_dict(), "saved_key": self.saved_key}
        if self.saved_experience is not None:
            state["experience"] = _experience_to_state(self.saved_experience)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step.load_state_dict(state["step"])
        self.saved_key = tuple(state["saved_key"]) if state["saved_key"] is not None else None
        self.saved_experience = (_experience_from_state(state["experience"])
                                 if "experience" in state else None)


def _experience_to_state(experience: Experience) -> dict[str, Any]:
    return {f.name: getattr(experience, f.name) for f in fields(experience)}


def _experience_from_state(state: dict[str, Any]) -> Experience:
    return Experience(**state)


class _RowBatches:
    """Text mode's prompt batches of one epoch: rows shuffled by (seed, epoch), cut into global
    batches of ``batch_size * world_size`` and sharded per rank (the speech tasks' layout)."""

    def __init__(self, rows: Sequence[dict[str, Any]], batch_size: int, *, seed: int,
                 epoch: int, rank: int, world_size: int) -> None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(
            stable_seed(seed, epoch) & 0x7FFFFFFF)).tolist()
        width = batch_size * world_size
        self.batches = [[rows[i] for i in order[k: k + width]][rank::world_size]
                        for k in range(0, len(order) - width + 1, width)]

    def __len__(self) -> int:
        return len(self.batches)

    def iter_from(self, start: int) -> Iterator[list[dict[str, Any]]]:
        yield from self.batches[start:]


class TextRLTask(RLTask):
    """Text mode: RBA's step on a plain ``LlamaForCausalLM`` reading text prompts (its chat
    template around each row's ``prompt`` and ``instruction``); the policy may be fully
    fine-tuned or carry LoRA. Rows are dicts as in a ``rba synth`` manifest."""

    def __init__(self, step: RLStep, tokenizer: Any, rows: Sequence[dict[str, Any]], *,
                 batch_size: int, trainable: Sequence[nn.Parameter]) -> None:
        from rba_core.data.prompts import teacher_messages, teacher_prompt_ids

        super().__init__(step, trainable)
        if not rows:
            raise ConfigError("text RL task: no rows to train on")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.ids = {id(row): torch.as_tensor(teacher_prompt_ids(tokenizer, teacher_messages(row)),
                                             dtype=torch.long) for row in self.rows}

    def prompts(self, raw: list[dict[str, Any]]) -> TextPrompts:
        ids = [self.ids[id(row)] for row in raw]
        return TextPrompts(ids=ids, teacher=ids, rows=list(raw))

    def prompt_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> _RowBatches:
        return _RowBatches(self.rows, self.batch_size, seed=seed, epoch=epoch, rank=rank,
                           world_size=world_size)


@dataclass
class SpeechPrompts:
    """A ``SpeechBatch`` as RL prompts: the policy hears the clip spliced into its chat prompt
    (embeddings from the trainable adapter, recomputed per call), the teacher reads the
    transcript chat. A frozen encoder's frames are computed once and serve every pass over
    the batch (rollout, old / reference scoring, each minibatch update)."""

    speechlm: Any
    batch: Any
    teacher: list[torch.Tensor]
    rows: list[dict[str, Any]]
    frames: tuple[torch.Tensor, torch.Tensor] | None = None

    def _frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        if self.speechlm.train_encoder:
            return self.speechlm.encode(b.features, b.frame_lengths)
        if self.frames is None:
            with torch.no_grad():
                self.frames = self.speechlm.encode(b.features, b.frame_lengths)
        return self.frames

    def policy(self, indices: Sequence[int]) -> list[torch.Tensor]:
        idx = list(indices)
        b = self.batch
        frames, lengths = self._frames()
        pick = torch.as_tensor(idx, dtype=torch.long, device=frames.device)
        return self.speechlm.frame_prompt_rows(
            frames[pick], lengths[pick], [b.prompt_before[i] for i in idx],
            [b.prompt_after[i] for i in idx])


class SpeechRLTask(RLTask):
    """RBA proper: the SpeechLM, hearing the speech, learns to behave as its teacher does
    reading the transcript. ``heldout`` (a ``SpeechDataset``) is answered greedily every
    ``rba.eval_every`` steps and scored as evaluation scores it. ``augment`` (``data.augment``)
    applies to the train batches only, never to the held-out clips."""

    task = "rba"

    def __init__(self, speechlm: Any, dataset: Any, step: RLStep, *, batch_size: int,
                 heldout: Any = None, augment: Any = None) -> None:
        if len(dataset) == 0:
            raise ConfigError(f"{dataset.root}: no usable rows in split {dataset.split!r} "
                              f"(skipped: {dict(dataset.skipped) or 'none'})")
        super().__init__(step, speechlm.trainable_parameters())
        self.speechlm = speechlm
        self.dataset = dataset
        self.batch_size = batch_size
        self.heldout = heldout
        self.augment = augment

    def prompts(self, raw: Any) -> SpeechPrompts:
        batch = raw.to(self.speechlm.device)
        teacher = [torch.as_tensor(p, dtype=torch.long) for p in batch.teacher_prompt_ids]
        return SpeechPrompts(self.speechlm, batch, teacher, list(batch.rows))

    def prompt_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> Any:
        return EpochBatches(self.dataset, self.batch_size, seed=seed, epoch=epoch, rank=rank,
                            world_size=world_size, augment=self.augment)

    def fsdp_modules(self) -> list[nn.Module]:
        return fsdp_layers(self.speechlm)

    def skipped_samples(self) -> list[tuple[str, str]]:
        """The dataset's left-out rows so far (see ``SpeechTask.skipped_samples``)."""
        return list(self.dataset.skipped_rows)

    def describe(self) -> dict[str, Any]:
        """Counts worth printing at the start of a run."""
        return {"task": self.task, "data": str(self.dataset.root), "rows": len(self.dataset),
                "skipped_rows": dict(self.dataset.skipped),
                "heldout_rows": len(self.heldout) if self.heldout is not None else 0,
                "trainable_parameters": sum(p.numel() for p in self.trainable),
                "parameters": sum(p.numel() for p in self.speechlm.parameters()),
                "group_size": self.step.config.group_size,
                "augment": describe_augment(self.augment)}

    def export(self, folder: Any) -> None:
        """What inference loads: the adapter (and its LoRA)."""
        self.speechlm.save_trainable(folder)

    def on_step_end(self, step: int, record: dict[str, Any]) -> dict[str, float] | None:
        super().on_step_end(step, record)
        every = self.step.config.eval_every
        if every and self.heldout is not None and step % every == 0:
            return self.evaluate()
        return None

    def evaluate(self) -> dict[str, float]:
        """Greedy answers to the first ``rba.eval_rows`` held-out clips, scored by the same
        code as evaluation (teacher log-prob, teacher gap, chrF)."""
        from rba_core.eval.answers import evaluate_answers

        rows = list(range(min(self.step.config.eval_rows, len(self.heldout))))
        report = evaluate_answers(self.speechlm, self.step.teacher, self.heldout, indices=rows,
                                  max_new_tokens=self.step.config.max_new_tokens)
        return {f"eval_{key}": value for key, value in report.summary().items()}


def build_rl_step(speechlm: Any, config: RBAConfig, teacher: nn.Module | None = None,
                  teacher_tokenizer: Any = None) -> RLStep:
    """The RL step of a SpeechLM: the teacher is its own LLM (LoRA off) unless given (with
    its tokenizer, checked against the SpeechLM's); the reference is a copy of its trainable
    tensors now, kept only when beta > 0."""
    tokenizer = speechlm.tokenizer
    reference = ReferenceWeights(speechlm.trainable_parameters()) if config.beta > 0 else None
    return RLStep(speechlm.llm, teacher if teacher is not None else speechlm.llm, config,
                  stop_ids=tokenizer.stop_ids,
                  decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip(),
                  reference=reference, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)


@dataclass
class RBATaskConfig(SpeechTaskConfig):
    """``task=rba``: the speech tasks' sections plus ``rba`` (the RL step's settings).
    ``data.batch_size`` is the number of spoken prompts per rank and step; each gets
    ``rba.group_size`` rollouts. The held-out split of ``data.dir`` (when it has one) is what
    ``rba.eval_every`` answers."""

    TASKS: ClassVar[tuple[str, ...]] = ("rba",)

    task: str = "rba"
    rba: RBAConfig = field(default_factory=RBAConfig)

    def validate(self) -> None:
        super().validate()
        self.rba.validate()


def build_rba_task(config: RBATaskConfig, device: torch.device) -> SpeechRLTask:
    """The SpeechLM, its teacher (``model.teacher``, or its own LLM with LoRA off), the train
    split and (for the periodic checks) the held-out split that ``config`` names. A teacher
    whose tokenizer differs from the LLM's is refused from the tokenizer files, before any
    model loads."""
    if config.model.teacher is not None:
        _check_teacher_tokenizer(config)
    # Before the models load: a missing augmentation package fails at once.
    augment = load_augmenter(config.data)
    speechlm = load_speechlm(config.model, device)
    teacher = teacher_tokenizer = None
    if config.model.teacher is not None:
        teacher, teacher_tokenizer = speechlm.load_teacher(config.model.teacher)
    dataset = load_dataset(config.data, speechlm, teacher_tokenizer=teacher_tokenizer)
    heldout = None
    if config.rba.eval_every:
        heldout = load_dataset(replace(config.data, split="heldout"), speechlm,
                               teacher_tokenizer=teacher_tokenizer)
        if len(heldout) == 0:
            raise ConfigError(f"rba.eval_every={config.rba.eval_every} answers the held-out "
                              f"split of {config.data.dir}, which has no rows; synthesize with "
                              "--heldout-fraction or set rba.eval_every=0")
    speechlm.train()
    return SpeechRLTask(speechlm, dataset,
                        build_rl_step(speechlm, config.rba, teacher, teacher_tokenizer),
                        batch_size=config.data.batch_size, heldout=heldout,
                        augment=augment)


def _check_teacher_tokenizer(config: RBATaskConfig) -> None:
    """``model.teacher``'s tokenizer against ``model.llm``'s, read from their folders: a
    mismatch is a config error worth seconds, not one found after the models load."""
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.weights.prepare import DEFAULT_LLM, resolve_model_dir

    llm = Tokenizer.from_pretrained(resolve_model_dir(config.model.llm, DEFAULT_LLM,
                                                      "model.llm"))
    teacher = Tokenizer.from_pretrained(config.model.teacher)
    if not llm.same_vocabulary(teacher):
        raise other_tokenizer_error(
            config.rba, f"{config.model.teacher}'s tokenizer ({teacher.vocab_size} tokens) "
            f"does not map tokens to the same ids as model.llm's ({llm.vocab_size} tokens)")
