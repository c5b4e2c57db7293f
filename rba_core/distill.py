"""Distillation losses of the SpeechLM and the evaluation measures of its answers.

- ``sft_loss``: cross-entropy of the teacher's response y* given the speech.
- ``kd_loss``: the fused distillation loss between the teacher (the LLM given the transcript,
  no grad) and the student (the SpeechLM given the speech) on the response tokens.
- ``teacher_loglik``: how likely the teacher finds an answer given the transcript.
- ``chrf``: character n-gram F-score of an answer against a reference.
- ``evaluate_answers``: the SpeechLM's greedy answers on dataset rows, scored by both.

The losses go through ``fused_linear_logprobs`` / ``fused_linear_distill_loss`` on the final
hidden states and the LM head, so ``[tokens, vocab]`` logits are never held; ``fused=False``
computes them explicitly (the unfused reference, for benchmarks and tests).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rba_core.errors import ConfigError
from rba_core.lora import lora_disabled
from rba_core.models.llama import LlamaForCausalLM
from rba_core.speechlm import text_response_hidden

if TYPE_CHECKING:
    from rba_core.data import SpeechBatch, SpeechDataset
    from rba_core.speechlm import SpeechLM

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


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
        raise ConfigError(f"kd_loss: kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"kd_loss: temperature must be a number > 0, got {temperature!r}")
    core = _unwrap(speechlm)
    student_weight = core.llm.lm_head_weight
    if teacher_llm.lm_head_weight.shape[0] != student_weight.shape[0]:
        rows = teacher_llm.lm_head_weight.shape[0]
        raise ConfigError(f"kd_loss: the teacher's LM head has {rows} rows, the student's "
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


@dataclass
class LogLik:
    """Per-answer summed log-probability ``total [B]`` and token count ``tokens [B]``."""

    total: torch.Tensor
    tokens: torch.Tensor

    @property
    def per_token(self) -> torch.Tensor:
        """Mean log-prob per token (0 for an empty answer)."""
        return self.total / self.tokens.clamp(min=1)


@torch.no_grad()
def teacher_loglik(teacher_llm: LlamaForCausalLM, prompt_ids: Sequence[Sequence[int]],
                   response_ids: Sequence[Sequence[int]]) -> LogLik:
    """log p_teacher(response | prompt) per row, e.g. the prompt = the transcript chat
    (``prompts.teacher_messages``, rendered with the generation prompt) and the response =
    the SpeechLM's answer ids including its stop token. Runs with LoRA off."""
    from rba_core.kernels import fused_linear_logprobs

    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ConfigError(f"teacher_loglik: {len(prompt_ids)} prompts and {len(response_ids)} "
                          "responses; pass one (non-empty list of) prompt per response")
    device = teacher_llm.lm_head_weight.device
    width = max(1, max(len(r) for r in response_ids))
    ids = torch.zeros(len(response_ids), width, dtype=torch.long)
    mask = torch.zeros(len(response_ids), width, dtype=torch.bool)
    for row, response in enumerate(response_ids):
        ids[row, : len(response)] = torch.as_tensor(list(response), dtype=torch.long)
        mask[row, : len(response)] = True
    ids, mask = ids.to(device), mask.to(device)
    with lora_disabled(teacher_llm):
        hidden = text_response_hidden(teacher_llm, prompt_ids, ids, mask)
    logp = fused_linear_logprobs(hidden, _head_for(teacher_llm.lm_head_weight, hidden), ids,
                                 mask=mask)
    return LogLik(total=logp.sum(-1), tokens=mask.sum(-1))


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i: i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, *, order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015) in [0, 100]: character n-grams of orders 1..``order`` with
    whitespace removed; precision and recall are averaged over the orders both strings
    reach, then combined as F-beta (beta = 2 weighs recall twice as much as precision).
    Two empty strings score 100; an empty string against a non-empty one scores 0."""
    if not isinstance(hypothesis, str) or not isinstance(reference, str):
        raise ConfigError("chrf: hypothesis and reference must be strings")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ConfigError(f"chrf: order must be an integer >= 1, got {order!r}")
    if not beta > 0:
        raise ConfigError(f"chrf: beta must be > 0, got {beta!r}")
    hyp = "".join(hypothesis.split())
    ref = "".join(reference.split())
    if not hyp or not ref:
        return 100.0 if hyp == ref else 0.0
    precisions: list[float] = []
    recalls: list[float] = []
    for n in range(1, order + 1):
        hyp_grams, ref_grams = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        if not hyp_grams or not ref_grams:
            break
        matches = sum((hyp_grams & ref_grams).values())
        precisions.append(matches / sum(hyp_grams.values()))
        recalls.append(matches / sum(ref_grams.values()))
    precision = sum(precisions) / len(precisions)
    recall = sum(recalls) / len(recalls)
    if precision == 0 and recall == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


@dataclass
class AnswerScore:
    """One evaluated row: the SpeechLM's answer, the reference (the teacher's answer y*),
    the teacher's mean log-prob per token of the answer given the transcript, and chrF."""

    id: str
    instruction: str
    reference: str
    answer: str
    teacher_logprob: float
    answer_tokens: int
    chrf: float


@dataclass
class EvalReport:
    rows: list[AnswerScore]

    @property
    def teacher_logprob(self) -> float:
        """Mean over answers of the teacher's per-token log-prob (higher is better)."""
        return sum(r.teacher_logprob for r in self.rows) / max(len(self.rows), 1)

    @property
    def chrf(self) -> float:
        """Mean chrF of the answers against the references."""
        return sum(r.chrf for r in self.rows) / max(len(self.rows), 1)

    def summary(self) -> dict[str, float]:
        return {"rows": float(len(self.rows)), "teacher_logprob": self.teacher_logprob,
                "chrf": self.chrf}


@torch.no_grad()
def evaluate_answers(speechlm: "SpeechLM", teacher_llm: LlamaForCausalLM,
                     dataset: "SpeechDataset", *, indices: Sequence[int] | None = None,
                     batch_size: int = 8, max_new_tokens: int = 64) -> EvalReport:
    """Greedy answers of the SpeechLM to the rows ``indices`` of ``dataset`` (all when None;
    typically the held-out split), each scored by ``teacher_loglik`` (the teacher reading the
    transcript; the answer's ids including its stop token) and by ``chrf`` against the row's
    response. Rows whose audio does not load are skipped (and counted by the dataset)."""
    was_training = speechlm.training
    speechlm.eval()
    order = list(range(len(dataset))) if indices is None else list(indices)
    chosen = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    scores: list[AnswerScore] = []
    try:
        for group in chosen:
            batch = dataset.batch(group)
            if batch is None:
                continue
            batch = batch.to(speechlm.device)
            answers = speechlm.generate_pieces(batch.features, batch.frame_lengths,
                                               batch.prompt_before, batch.prompt_after,
                                               max_new_tokens=max_new_tokens)
            loglik = teacher_loglik(teacher_llm, batch.teacher_prompt_ids, answers)
            for b, row in enumerate(batch.rows):
                text = speechlm.tokenizer.decode(answers[b], skip_special_tokens=True).strip()
                scores.append(AnswerScore(
                    id=str(row["id"]), instruction=row["instruction"], reference=row["response"],
                    answer=text, teacher_logprob=float(loglik.per_token[b]),
                    answer_tokens=int(loglik.tokens[b]), chrf=chrf(text, row["response"])))
    finally:
        speechlm.train(was_training)
    return EvalReport(scores)
