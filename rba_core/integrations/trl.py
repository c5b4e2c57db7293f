"""rba's fused losses inside TRL's trainers: one line to switch.

    from rba_core.integrations.trl import RbaGRPOTrainer      # was: from trl import GRPOTrainer
    trainer = RbaGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                             train_dataset=dataset)
    trainer.train()

RbaGRPOTrainer (trl.GRPOTrainer), RbaDistillationTrainer (trl.DistillationTrainer) and
RbaGKDTrainer (trl.experimental.gkd.GKDTrainer, loaded on first use) take the same arguments
and config as the TRL class they extend. What changes is the loss: rba's fused kernels
(fused_linear_policy_loss, fused_linear_distill_loss) take the backbone's last hidden states and
the LM head weight, so no [tokens x vocab] logits exist, forward or backward; for GRPO the old
and reference policies' log-probs come from fused_linear_logprobs too. Generation, rewards,
advantages, batching, logging and the optimizer stay TRL's. The losses equal TRL's own to float32
rounding (tests/integrations/test_trl.py), and the metrics TRL logs are logged the same way.

An option of TRL's that these kernels cannot honour raises UnsupportedOption when the trainer is
built, naming the option, instead of training on a silently different objective. TRL versions
outside TRL_VERSIONS are refused on import: the subclasses override TRL internals
(_compute_loss, _get_per_token_logps_and_entropies) whose contracts change between releases.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# setup.py's `trl` extra pins the same range.
TRL_VERSIONS = ">=1.16,<1.17"

try:
    import trl
except ImportError as exc:
    raise ImportError(f"rba_core.integrations.trl needs TRL {TRL_VERSIONS}: pip install "
                      "'rba[trl]'") from exc
if Version(trl.__version__) not in SpecifierSet(TRL_VERSIONS):
    raise ImportError(f"rba_core.integrations.trl supports TRL {TRL_VERSIONS}, found "
                      f"{trl.__version__}; install a supported one: pip install 'rba[trl]'")

from accelerate.utils import is_peft_model  # noqa: E402
from transformers import Trainer  # noqa: E402
from trl.models.utils import _ForwardRedirection  # noqa: E402
from trl.trainer.utils import nanmax, nanmin  # noqa: E402

from rba_core.kernels import (  # noqa: E402
    fused_linear_distill_loss, fused_linear_logprobs, fused_linear_policy_loss,
)

__all__ = ["TRL_VERSIONS", "RbaDistillationTrainer", "RbaGKDTrainer", "RbaGRPOTrainer",
           "UnsupportedOption"]


class UnsupportedOption(ValueError):
    """A TRL option the rba-backed trainer cannot honour; raised when the trainer is built."""


def _refuse_if(condition: bool, trainer: str, option: str, why: str) -> None:
    if condition:
        raise UnsupportedOption(f"{trainer} does not support {option}: {why}. Unset it, or use "
                                "TRL's own trainer for this run.")


def _bound_arguments(init: Callable, self: object, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The constructor's arguments by name, however the caller passed them."""
    return inspect.signature(init).bind(self, *args, **kwargs).arguments


# Config attributes TRL reads as a multiplier on the logits (Cohere, Granite, Falcon-H1, ...).
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _check_model(trainer: str, model: torch.nn.Module, role: str, *,
                 bias_ok: bool = True) -> None:
    """Refuses models whose logits are not hidden @ W.T (+ bias) as rba's kernels compute them."""
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    _refuse_if(softcap is not None, trainer, f"a {role} with final_logit_softcapping={softcap}",
               "rba's kernels compute plain logits (hidden @ W.T / temperature), no soft-capping")
    for name in _LOGIT_SCALES:
        value = getattr(config, name, None)
        _refuse_if(value is not None and value != 1, trainer, f"a {role} with {name}={value}",
                   "rba's kernels take no logit multiplier")
    head = model.get_output_embeddings()
    _refuse_if(not bias_ok and getattr(head, "bias", None) is not None, trainer,
               f"a {role} whose LM head has a bias", "fused_linear_distill_loss takes none")
    _refuse_if(is_peft_model(model)
               and any(cfg.is_prompt_learning for cfg in model.peft_config.values()), trainer,
               f"a prompt-learning PEFT adapter on the {role}",
               "the loss runs the backbone directly, which never prepends the virtual tokens; "
               "use a weight adapter such as LoRA")


def _check_distributed(trainer: str, built: Trainer) -> None:
    why = "rba's kernels read the LM head weight whole, and sharded parameters are not"
    _refuse_if(built.is_fsdp_enabled, trainer, "FSDP", why)
    plugin = built.args.deepspeed_plugin
    _refuse_if(built.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3,
               trainer, "DeepSpeed ZeRO-3", why)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside an unwrapped, possibly PEFT, model."""
    return model.get_base_model() if is_peft_model(model) else model


def _last_hidden(lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 keep: int | None = None) -> torch.Tensor:
    """The backbone's final hidden states at the positions that predict a next token (the last
    `keep` of them when given). The LM head is left to the kernel: the backbone's output is the
    widest tensor this ever holds."""
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state[:, :-1]
    return hidden if keep is None else hidden[:, -keep:]


def _head_precision(device: torch.device):
    """rba's kernels pick their own accumulation; an enclosing autocast would only recast the
    LM head's GEMMs on the PyTorch fallback."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(
        device.type) else nullcontext()


# ------------------------------------------------------------------------------- GRPO
# TRL's loss types by the kernel's normaliser: bnpo divides by the local token count (the kernel's
# dapo); TRL's dapo divides by the generation batch's global count, rescaled in _policy_loss.
_KERNEL_LOSS_TYPES = {"grpo": "grpo", "bnpo": "dapo", "dr_grpo": "dr_grpo", "dapo": "dapo"}


def _check_grpo_config(config: trl.GRPOConfig) -> None:
    name = "RbaGRPOTrainer"
    _refuse_if(config.loss_type not in _KERNEL_LOSS_TYPES, name,
               f"loss_type={config.loss_type!r}",
               f"rba's fused policy loss implements {tuple(_KERNEL_LOSS_TYPES)}")
    _refuse_if(config.importance_sampling_level != "token", name,
               f"importance_sampling_level={config.importance_sampling_level!r}",
               "the fused loss clips one ratio per token")
    _refuse_if(config.delta is not None, name, f"delta={config.delta}",
               "the fused loss has no two-sided clipping of the ratio")
    _refuse_if(config.top_entropy_quantile < 1.0, name,
               f"top_entropy_quantile={config.top_entropy_quantile}",
               "the fused loss has no entropy-quantile token mask")
    _refuse_if(config.use_adaptive_entropy, name, "use_adaptive_entropy=True",
               "only a fixed entropy_coef is supported")
    _refuse_if(config.off_policy_mask_threshold is not None, name,
               f"off_policy_mask_threshold={config.off_policy_mask_threshold}",
               "the fused loss has no per-sequence off-policy mask on its policy term")
    _refuse_if(config.use_vllm and config.vllm_importance_sampling_correction, name,
               "use_vllm=True with vllm_importance_sampling_correction=True",
               "the fused loss has no per-token importance weight on its policy term "
               "(set vllm_importance_sampling_correction=False to generate with vLLM)")
    _refuse_if(config.use_liger_kernel, name, "use_liger_kernel=True",
               "Liger's kernels and rba's are separate backends, not tested together")


class RbaGRPOTrainer(trl.GRPOTrainer):
    """trl.GRPOTrainer whose loss, old and reference log-probs are rba's fused kernels.

    Same constructor and GRPOConfig. Honoured: loss_type grpo, bnpo, dr_grpo and dapo; epsilon /
    epsilon_high; beta (k3 KL to the reference) and use_bias_correction_kl; temperature;
    num_iterations and steps_per_generation (old log-probs, or ratio 1 when TRL skips them); a
    fixed entropy_coef; tool masks; PEFT weight adapters (LoRA; the reference is the adapter
    switched off, as in TRL). Logged as TRL logs them: kl, entropy,
    clip_ratio/{low_mean, low_min, high_mean, high_max, region_mean}, and policy_loss /
    entropy_coef with an entropy bonus. Refused with UnsupportedOption: the other loss types,
    sequence-level importance sampling, delta, top_entropy_quantile < 1, adaptive entropy,
    off_policy_mask_threshold, vLLM importance-sampling correction, use_liger_kernel, MoE
    router auxiliary losses, vision-language models, soft-capped or scaled logits, FSDP and
    DeepSpeed ZeRO-3.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = _bound_arguments(trl.GRPOTrainer.__init__, self, args, kwargs).get("args")
        if config is not None:
            _check_grpo_config(config)
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        _refuse_if(self._is_vlm, name, "vision-language models",
                   "the loss runs the text backbone alone")
        _refuse_if(self.aux_loss_enabled, name,
                   f"a MoE router auxiliary loss (router_aux_loss_coef="
                   f"{self.router_aux_loss_coef})", "the backbone's router logits are not kept")
        _check_model(name, self.model, "model")
        _check_distributed(name, self)
        self._forward_redirection = _ForwardRedirection()

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **multimodal_inputs):
        """TRL's old / reference policy scoring, by fused_linear_logprobs on the backbone's
        hidden states. Vision-language models and aux losses are refused at construction, so
        the multimodal inputs TRL passes are all None."""
        lm = _causal_lm(self.accelerator.unwrap_model(model))
        head = lm.get_output_embeddings()
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            attention = attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                hidden = _last_hidden(lm, ids, attention, logits_to_keep)
            with _head_precision(hidden.device):
                scores = fused_linear_logprobs(
                    hidden.to(head.weight.dtype), head.weight, ids[:, -logits_to_keep:],
                    bias=head.bias, mask=attention[:, -logits_to_keep:].bool(),
                    temperature=self.temperature, return_entropy=compute_entropy)
            if compute_entropy:
                logps.append(scores.logprobs)
                entropies.append(scores.entropy)
            else:
                logps.append(scores)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _compute_loss(self, model, inputs):
        # Through the wrapper's forward, so DDP prepares its gradient reduction; the metrics'
        # collectives run after it returns.
        unwrapped = self.accelerator.unwrap_model(model)
        loss, policy_loss, ratio, kl, entropy, mask = self._forward_redirection(
            model, unwrapped, self._policy_loss, unwrapped, inputs)
        mode = "train" if self.model.training else "eval"
        if self._entropy_bonus_enabled:
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_policy_metrics(mode, mask, inputs["advantages"], ratio, kl, entropy)
        return loss

    def _policy_loss(self, unwrapped, inputs):
        """(loss as TRL's _compute_loss returns it, the policy term before accumulation scaling,
        ratio, kl or None, entropy, the loss mask), from the hidden states and the LM head."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else (
            completion_mask * inputs["tool_mask"])
        lm = _causal_lm(unwrapped)
        head = lm.get_output_embeddings()
        with self.accelerator.autocast():
            hidden = _last_hidden(lm, input_ids, attention_mask, completion_ids.size(1))
        with _head_precision(hidden.device):
            loss, stats = fused_linear_policy_loss(
                hidden.to(head.weight.dtype), head.weight, completion_ids, inputs["advantages"],
                inputs.get("old_per_token_logps"),
                inputs["ref_per_token_logps"] if self.beta != 0.0 else None, mask.bool(),
                beta=self.beta, kl_estimator="k3", kl_ratio=self.args.use_bias_correction_kl,
                clip_eps_low=self.epsilon_low, clip_eps_high=self.epsilon_high,
                loss_type=_KERNEL_LOSS_TYPES[self.loss_type],
                max_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
                temperature=self.temperature, bias=head.bias, return_entropy=True)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":
            # TRL's normaliser: the generation batch's active tokens, per process and per
            # accumulation window; the kernel divided by the local count.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / (
                self.accelerator.num_processes)
            if mode == "train":
                normalizer = (normalizer * self.current_gradient_accumulation_steps
                              / self.args.steps_per_generation)
            loss = loss * mask.sum().clamp(min=1) / normalizer
            policy_loss = loss.detach()
        else:
            policy_loss = loss.detach()
            loss = loss / accumulation
        entropy = stats.entropy
        if self._entropy_bonus_enabled:
            # TRL's bonus: the mean entropy over the active tokens, whatever the loss type.
            bonus = (entropy * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
            loss = loss - self.entropy_coef * bonus
        return loss, policy_loss, stats.ratio, stats.kl, entropy.detach(), mask

    def _log_policy_metrics(self, mode: str, mask: torch.Tensor, advantages: torch.Tensor,
                            ratio: torch.Tensor, kl: torch.Tensor | None,
                            entropy: torch.Tensor) -> None:
        """The metrics trl.GRPOTrainer._compute_loss logs, computed the same way."""
        metrics = self._metrics[mode]

        def masked_seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            local = torch.stack([(x * mask).sum(), mask.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            # TRL logs the KL term as the loss weighs it.
            weighted = kl * ratio if self.args.use_bias_correction_kl else kl
            metrics["kl"].append(global_masked_mean(weighted))
        metrics["entropy"].append(global_masked_mean(entropy))
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        metrics["clip_ratio/low_min"].append(
            nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
        metrics["clip_ratio/high_max"].append(
            nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())


# ------------------------------------------------------------------------------- distillation
def _divergence(beta: float) -> dict[str, Any]:
    """fused_linear_distill_loss's kind for TRL's beta: 0 the forward KL(teacher || student),
    1 the reverse KL(student || teacher), in between the generalized JSD whose mixture is
    beta * teacher + (1 - beta) * student (rba's jsd_beta is TRL's beta)."""
    if beta == 0.0:
        return {"kind": "forward_kl"}
    if beta == 1.0:
        return {"kind": "reverse_kl"}
    return {"kind": "jsd", "jsd_beta": float(beta)}


def _distill_sum(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, mask: torch.Tensor,
                beta: float, temperature: float) -> torch.Tensor:
    """The divergence summed over the masked-in tokens, in the student head's dtype (a teacher of
    another dtype is cast, its head copied once per call)."""
    dtype = student_weight.dtype
    with _head_precision(student_hidden.device):
        return fused_linear_distill_loss(
            student_hidden.to(dtype), student_weight, teacher_hidden.to(dtype),
            teacher_weight.to(dtype), mask, temperature=temperature, reduction="sum",
            **_divergence(beta))


def _check_teacher_and_student(trainer: str, built: Trainer) -> None:
    _refuse_if(built.teacher_model is None, trainer, "a trainer without teacher_model",
               "the loss reads the teacher's hidden states and LM head")
    _check_model(trainer, built.model, "student", bias_ok=False)
    _check_model(trainer, built.accelerator.unwrap_model(built.teacher_model), "teacher",
                 bias_ok=False)
    _check_distributed(trainer, built)


class RbaDistillationTrainer(trl.DistillationTrainer):
    """trl.DistillationTrainer (on-policy distillation) whose divergence is
    fused_linear_distill_loss.

    Same constructor and DistillationConfig. Honoured: beta (0 forward KL, 1 reverse KL, else
    generalized JSD), temperature, the loss normalisation (num_items_in_batch or the local
    token count), tool masks; the entropy metric is logged as TRL logs it. Refused with
    UnsupportedOption: a missing teacher_model (server teachers), LM heads with a bias,
    soft-capped or scaled logits, vision-language models, FSDP and DeepSpeed ZeRO-3.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        _refuse_if(self._is_vlm, name, "vision-language models",
                   "the loss runs the text backbone alone")
        _check_teacher_and_student(name, self)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's contract: (loss, the student's entropy summed over the tokens, their count)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        loss_mask = completion_mask if "tool_mask" not in inputs else (
            completion_mask * inputs["tool_mask"])
        keep = completion_ids.size(1)
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids,
                                                     attention_mask, keep)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            # Through the teacher's wrapper too, as TRL does, so a wrapped teacher runs whole.
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                unwrapped_teacher, input_ids, attention_mask, keep)
        weight = unwrapped_student.get_output_embeddings().weight
        mask = loss_mask.bool()
        total = _distill_sum(student_hidden, weight, teacher_hidden,
                            unwrapped_teacher.get_output_embeddings().weight, mask, self.beta,
                            self.temperature)
        count = mask.sum()
        loss = total / (count.clamp(min=1) if num_items_in_batch is None else
                        torch.as_tensor(num_items_in_batch, device=total.device))
        with torch.no_grad(), _head_precision(student_hidden.device):
            # The fused divergence returns no entropy; one forward-only pass gives TRL's metric.
            entropy = fused_linear_logprobs(
                student_hidden.detach().to(weight.dtype), weight.detach(), completion_ids,
                mask=mask, temperature=self.temperature, return_entropy=True).entropy
        return loss, entropy.sum(), count


def __getattr__(name: str):
    # trl.experimental warns on import, so the GKD trainer loads only when asked for.
    if name == "RbaGKDTrainer":
        from rba_core.integrations._trl_gkd import RbaGKDTrainer

        globals()[name] = RbaGKDTrainer
        return RbaGKDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
