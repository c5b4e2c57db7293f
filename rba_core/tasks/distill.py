"""The distillation tasks of the SpeechLM (``task=sft`` and ``task=kd``: the baselines RBA must
beat, and its warm start), their losses and their config section.

- ``sft_loss``: cross-entropy of the teacher's response y* given the speech.
- ``kd_loss``: the fused distillation loss between the teacher (the LLM given the transcript,
  no grad) and the student (the SpeechLM given the speech) on the response tokens.
- :class:`SpeechDistillTask` runs either under the trainer; :class:`DistillConfig` adds the
  ``kd`` section (kind, temperature, jsd_beta) to the speech tasks' sections.

The losses go through ``fused_linear_logprobs`` / ``fused_linear_distill_loss`` on the final
hidden states and the LM head, so ``[tokens, vocab]`` logits are never held; ``fused=False``
computes them explicitly (the unfused reference, for benchmarks and tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from rba_core.kernels.linear_distill import KINDS as KD_KINDS
from rba_core.models.llama import LlamaForCausalLM
from rba_core.tasks.speech import (
    SpeechTask, SpeechTaskConfig, load_augmenter, load_dataset, load_speechlm,
)
from rba_core.train.config import check_choice, check_finite

if TYPE_CHECKING:
    from rba_core.data.augment import Augmenter
    from rba_core.data.speech import SpeechBatch, SpeechDataset
    from rba_core.models.speechlm import SpeechLM

REDUCTIONS = ("mean", "sum")


@dataclass
class KDConfig:
    """The divergence ``task=kd`` minimises (``task=sft`` is plain cross-entropy and ignores it)."""

    kind: str = "forward_kl"
    temperature: float = 2.0
    jsd_beta: float = 0.5

    def validate(self, prefix: str = "kd") -> None:
        check_choice(f"{prefix}.kind", self.kind, KD_KINDS)
        check_finite(f"{prefix}.temperature", self.temperature, 0.0, low_open=True,
                     allowed="a finite number > 0")
        check_finite(f"{prefix}.jsd_beta", self.jsd_beta, 0.0, 1.0, low_open=True,
                     high_open=True, allowed="a number in (0, 1)")


@dataclass
class DistillConfig(SpeechTaskConfig):
    """``task=sft`` or ``task=kd``: the speech tasks' sections plus ``kd``."""

    TASKS: ClassVar[tuple[str, ...]] = ("sft", "kd")
    MOVED: ClassVar[dict[str, str]] = {
        "loss": "KD's settings are the 'kd' section now (kd.kind, kd.temperature, "
                "kd.jsd_beta); rename 'loss:' to 'kd:' in the file, or loss.X=... to kd.X=..."}

    task: str = "kd"
    kd: KDConfig = field(default_factory=KDConfig)

    def validate(self) -> None:
        super().validate()
        self.kd.validate()


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


def _head_for(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in the hidden states' dtype: under autocast the hidden states come out in
    bf16/fp16 while the weights stay fp32, and the fused ops take one dtype."""
    return weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def _unwrap(speechlm: torch.nn.Module) -> "SpeechLM":
    """The SpeechLM inside a DistributedDataParallel wrapper (or the SpeechLM itself)."""
    return getattr(speechlm, "module", speechlm)


def _student_hidden(speechlm: torch.nn.Module, batch: "SpeechBatch") -> torch.Tensor:
    # Called through the module (not .response_hidden) so a DDP wrapper sees the forward.
    return speechlm(batch.features, batch.frame_lengths, batch.prompt_before,
                    batch.prompt_after, batch.response_ids, batch.response_mask)


def sft_loss(speechlm: "SpeechLM | torch.nn.Module", batch: "SpeechBatch", *,
             reduction: str = "mean", fused: bool = True
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of ``batch.response_ids`` given the speech: the mean over
    response tokens (``reduction="mean"``) or their sum (``"sum"``, for trainers that
    normalise by a global token count). Metrics: loss, nll (per token), tokens, samples."""
    from rba_core.kernels import fused_linear_logprobs

    _check_reduction(reduction)
    hidden = _student_hidden(speechlm, batch)
    weight = _head_for(_unwrap(speechlm).llm.lm_head_weight, hidden)
    ids = batch.response_ids.to(hidden.device)
    mask = batch.response_mask.to(hidden.device).bool()
    if fused:
        logp = fused_linear_logprobs(hidden, weight, ids, mask=mask)
    else:
        logits = F.linear(hidden, weight).float()
        logp = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * mask
    loss = _reduce(-logp, mask, reduction)
    tokens = int(mask.sum())
    nll = float(-(logp * mask).sum().detach()) / max(tokens, 1)
    return loss, {"loss": float(loss.detach()), "nll": nll, "tokens": float(tokens),
                  "samples": float(ids.shape[0])}


def _reference_distill(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str,
                       jsd_beta: float) -> torch.Tensor:
    log_s = s_logits.float().log_softmax(-1)
    log_t = t_logits.float().log_softmax(-1)
    if kind == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    mix = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(jsd_beta)),
                                       log_s + torch.log(torch.tensor(1 - jsd_beta))]), dim=0)
    return (jsd_beta * (log_t.exp() * (log_t - mix)).sum(-1)
            + (1 - jsd_beta) * (log_s.exp() * (log_s - mix)).sum(-1))


def kd_loss(speechlm: "SpeechLM | torch.nn.Module", teacher_llm: LlamaForCausalLM,
            batch: "SpeechBatch", *, kind: str = "forward_kl", temperature: float = 2.0,
            jsd_beta: float = 0.5, reduction: str = "mean",
            scale_by_temperature_squared: bool = False, fused: bool = True
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level distillation on the response: the teacher reads the transcript prompt
    (``batch.teacher_prompt_ids``, no grad, LoRA off), the student the speech prompt; both are
    scored on ``batch.response_ids``. ``kind``: forward_kl = KL(teacher || student), reverse_kl,
    or jsd (weight ``jsd_beta`` on the teacher). Metrics: loss, tokens, samples."""
    from rba_core.kernels import fused_linear_distill_loss

    _check_reduction(reduction)
    if kind not in KD_KINDS:
        raise ValueError(f"kd_loss: kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be a number > 0, got {temperature!r}")
    core = _unwrap(speechlm)
    student_weight = core.llm.lm_head_weight
    if teacher_llm.lm_head_weight.shape[0] != student_weight.shape[0]:
        rows = teacher_llm.lm_head_weight.shape[0]
        raise ValueError(f"kd_loss: the teacher's LM head has {rows} rows, the student's "
                         f"{student_weight.shape[0]}; load the teacher with "
                         "SpeechLM.load_teacher, which checks the vocabulary")
    mask = batch.response_mask.to(core.device).bool()
    teacher_hidden = core.teacher_hidden(teacher_llm, batch.teacher_prompt_ids,
                                             batch.response_ids, batch.response_mask)
    hidden = _student_hidden(speechlm, batch)
    student_weight = _head_for(student_weight, hidden)
    teacher_weight = teacher_llm.lm_head_weight.detach().to(hidden.dtype)
    teacher_hidden = teacher_hidden.to(hidden.dtype)
    if fused:
        per_token = fused_linear_distill_loss(
            hidden, student_weight, teacher_hidden, teacher_weight, mask, kind=kind,
            jsd_beta=jsd_beta, temperature=float(temperature), reduction="none")
    else:
        per_token = _reference_distill(F.linear(hidden, student_weight) / temperature,
                                       F.linear(teacher_hidden, teacher_weight) / temperature,
                                       kind, jsd_beta)
    if scale_by_temperature_squared:
        per_token = per_token * float(temperature) ** 2
    loss = _reduce(per_token, mask, reduction)
    return loss, {"loss": float(loss.detach()), "tokens": float(mask.sum()),
                  "samples": float(mask.shape[0])}


class SpeechDistillTask(SpeechTask):
    """``task="sft"``: cross-entropy of the teacher's responses given the speech;
    ``task="kd"``: the fused distillation loss against ``teacher`` reading the transcript.
    Both are per-token means over the response tokens, which weight each batch.
    ``fused=False`` uses the eager reference loss over materialised logits (benchmarks)."""

    TASKS = DistillConfig.TASKS

    def __init__(self, speechlm: "SpeechLM", dataset: "SpeechDataset", *, task: str,
                 batch_size: int, kd: KDConfig | None = None,
                 teacher: LlamaForCausalLM | None = None, fused: bool = True,
                 augment: "Augmenter | None" = None) -> None:
        if task == "kd" and teacher is None:
            raise ValueError("task 'kd' needs a teacher LLM (SpeechLM.load_teacher())")
        super().__init__(speechlm, dataset, task=task, batch_size=batch_size, augment=augment)
        self.kd = kd or KDConfig()
        self.teacher = teacher
        self.fused = fused

    def loss_tokens(self, batch: "SpeechBatch") -> float:
        return float(batch.num_tokens)

    def batch_loss(self, batch: "SpeechBatch") -> tuple[torch.Tensor, dict[str, float]]:
        if self.task == "sft":
            return sft_loss(self.speechlm, batch, fused=self.fused)
        return kd_loss(self.speechlm, self.teacher, batch, kind=self.kd.kind,
                       temperature=self.kd.temperature, jsd_beta=self.kd.jsd_beta,
                       fused=self.fused)


def build_distill_task(config: DistillConfig, device: torch.device) -> SpeechDistillTask:
    """The SpeechLM, its teacher (kd) and the dataset that ``config`` names, on ``device``."""
    # Before the models load: a missing augmentation package fails at once.
    augment = load_augmenter(config.data)
    speechlm = load_speechlm(config.model, device)
    teacher = teacher_tokenizer = None
    if config.task == "kd":
        teacher, teacher_tokenizer = speechlm.load_teacher(config.model.teacher)
    dataset = load_dataset(config.data, speechlm, teacher_tokenizer=teacher_tokenizer)
    return SpeechDistillTask(speechlm, dataset, task=config.task,
                             batch_size=config.data.batch_size, kd=config.kd, teacher=teacher,
                             augment=augment)
