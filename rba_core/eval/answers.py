"""Scores of a SpeechLM's answers, shared by evaluation and the RL step's held-out checks.

- ``teacher_loglik``: how likely the teacher finds an answer given the transcript.
- ``chrf``: character n-gram F-score of an answer against a reference.
- ``evaluate_answers``: the SpeechLM's greedy answers on dataset rows, scored by both.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rba_core.errors import ConfigError
from rba_core.models.llama import LlamaForCausalLM
from rba_core.models.lora import lora_disabled
from rba_core.rollout import RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from rba_core.data.speech import SpeechDataset
    from rba_core.models.speechlm import SpeechLM


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
    the SpeechLM's answer ids including its stop token. Runs with LoRA off, through
    ``RolloutEngine.score``: the same teacher score the RL reward uses."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ConfigError(f"teacher_loglik: {len(prompt_ids)} prompts and {len(response_ids)} "
                          "responses; pass one (non-empty list of) prompt per response")
    prompts = [torch.as_tensor(list(p), dtype=torch.long) for p in prompt_ids]
    answers = [[torch.as_tensor(list(r), dtype=torch.long)] for r in response_ids]
    engine = RolloutEngine(teacher_llm, max_prompt_len=max(len(p) for p in prompts),
                           pack_weights=False)
    with lora_disabled(teacher_llm):
        scores = engine.score(prompts, answers)
    return LogLik(total=scores.logprobs[:, 0].sum(-1), tokens=scores.mask[:, 0].sum(-1))


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
            answers = speechlm.generate_pieces(
                batch.features, batch.frame_lengths, batch.prompt_before, batch.prompt_after,
                SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
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
