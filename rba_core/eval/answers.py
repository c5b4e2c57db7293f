"""Scores of a SpeechLM's answers, shared by evaluation (``rba eval``) and the RL step's held-out
checks, so the number the RL step logs and the number evaluation reports are one computation.

- ``teacher_loglik``: how likely the teacher finds an answer given the transcript.
- ``teacher_gap``: that log-likelihood per token given the answer's own transcript minus given
  a mismatched one (the next row's). It asks whether the answer tracks the instruction; a loop
  ("The answer to this question is: The answer to ...") is as likely after any transcript and
  scores near zero, where the plain log-likelihood rewards it for being predictable.
- ``score_answers``: teacher log-prob and gap, chrF and BLEU against the reference
  (``rba_core.rl.text_metrics``, sacrebleu), on-topic and looping flags, answer length.
- ``evaluate_answers``: the SpeechLM's greedy answers on dataset rows, scored by all of them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rba_core.errors import ConfigError
from rba_core.models.llama import LlamaForCausalLM
from rba_core.models.lora import lora_disabled
from rba_core.rl.text_metrics import bleu, chrf
from rba_core.rollout import RolloutEngine, SamplingConfig
from rba_core.synth.text import repetition_reason

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


def mismatched(prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each row's mismatched transcript prompt: the next row's (the last row gets the first's).
    With one row, or rows that all share a transcript, it is the row's own and the gap is 0."""
    rows = [list(p) for p in prompt_ids]
    return rows[1:] + rows[:1]


def teacher_gap(teacher_llm: LlamaForCausalLM, prompt_ids: Sequence[Sequence[int]],
                mismatched_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
                ) -> tuple[LogLik, torch.Tensor]:
    """(log p_teacher(response | own prompt), per-token log-prob given the own prompt minus
    given ``mismatched_ids`` ``[B]``)."""
    own = teacher_loglik(teacher_llm, prompt_ids, response_ids)
    other = teacher_loglik(teacher_llm, mismatched_ids, response_ids)
    return own, own.per_token - other.per_token


# Function words and question words that say nothing about a question's topic.
_STOP_WORDS = frozenset(
    "the and for are was with from this that what which who whom whose where when why how many "
    "much does did can could you your our their will would should there here about into than "
    "then not yes have has had make give tell best most some any".split())


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ letters outside a short stop list."""
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) > 2 and w not in _STOP_WORDS}


def on_topic(question: str, answer: str) -> bool:
    """The answer reuses a content word of the question: a crude check that it is about what
    was asked (a loop or an answer to another question mostly fails it)."""
    return bool(content_words(question) & content_words(answer))


def looping(answer: str) -> bool:
    """The synthesis loop filter (``repetition_reason``) calls the answer a repetition loop."""
    return repetition_reason(answer) is not None


@dataclass
class Answered:
    """One answer to score: the row's id, transcript and reference (the teacher's answer y*),
    the teacher's prompt ids for that transcript, and the answer as ids (with its stop token
    when it stopped) and as text."""

    id: str
    instruction: str
    reference: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str


@dataclass
class AnswerScore:
    """One scored answer: the teacher's mean log-prob per token of it given the transcript and
    the teacher gap (nats per token), chrF and BLEU against the reference (sacrebleu, in
    [0, 1]), the on-topic and looping flags and the answer's length in tokens."""

    id: str
    instruction: str
    reference: str
    answer: str
    teacher_logprob: float
    teacher_gap: float
    answer_tokens: int
    chrf: float
    bleu: float
    on_topic: bool
    looping: bool

    def scores(self) -> dict[str, float]:
        return {"teacher_logprob": self.teacher_logprob, "teacher_gap": self.teacher_gap,
                "answer_tokens": float(self.answer_tokens), "chrf": self.chrf,
                "bleu": self.bleu, "on_topic": float(self.on_topic),
                "looping": float(self.looping)}


def score_answers(teacher_llm: LlamaForCausalLM, answered: Sequence[Answered], *,
                  batch_size: int = 8) -> list[AnswerScore]:
    """Every answer scored by ``AnswerScore``'s measures; the teacher gap's mismatched
    transcript is the next answer's (``mismatched``), so pass the rows in a fixed order and
    at least two of them."""
    rows = list(answered)
    others = mismatched([a.prompt_ids for a in rows])
    scores: list[AnswerScore] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        loglik, gap = teacher_gap(teacher_llm, [a.prompt_ids for a in chunk],
                                  others[start: start + batch_size],
                                  [a.answer_ids for a in chunk])
        for b, a in enumerate(chunk):
            scores.append(AnswerScore(
                id=a.id, instruction=a.instruction, reference=a.reference, answer=a.answer,
                teacher_logprob=float(loglik.per_token[b]), teacher_gap=float(gap[b]),
                answer_tokens=int(loglik.tokens[b]), chrf=chrf(a.answer, a.reference),
                bleu=bleu(a.answer, a.reference), on_topic=on_topic(a.instruction, a.answer),
                looping=looping(a.answer)))
    return scores


@dataclass
class EvalReport:
    rows: list[AnswerScore]

    def summary(self) -> dict[str, float]:
        """The row count and the mean of every score (chrF and BLEU in [0, 1], the flags as
        shares); what the RL step logs as ``eval_*``."""
        means: dict[str, float] = {}
        for row in self.rows:
            for key, value in row.scores().items():
                means[key] = means.get(key, 0.0) + value / len(self.rows)
        return {"rows": float(len(self.rows)), **means}


@torch.no_grad()
def evaluate_answers(speechlm: "SpeechLM", teacher_llm: LlamaForCausalLM,
                     dataset: "SpeechDataset", *, indices: Sequence[int] | None = None,
                     batch_size: int = 8, max_new_tokens: int = 64,
                     sampling: SamplingConfig | None = None) -> EvalReport:
    """The SpeechLM's answers (greedy, ``max_new_tokens``, unless ``sampling`` is given) to
    the rows ``indices`` of ``dataset`` (all when None; typically the held-out split), scored
    by ``score_answers`` against each row's response with the dataset's teacher prompts.
    Rows whose audio does not load are skipped (and counted by the dataset)."""
    sampling = sampling or SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    was_training = speechlm.training
    speechlm.eval()
    order = list(range(len(dataset))) if indices is None else list(indices)
    answered: list[Answered] = []
    try:
        for start in range(0, len(order), batch_size):
            batch = dataset.batch(order[start: start + batch_size])
            if batch is None:
                continue
            batch = batch.to(speechlm.device)
            answers = speechlm.generate_pieces(batch.features, batch.frame_lengths,
                                               batch.prompt_before, batch.prompt_after, sampling)
            for b, row in enumerate(batch.rows):
                answered.append(Answered(
                    id=str(row["id"]), instruction=row["instruction"], reference=row["response"],
                    prompt_ids=list(batch.teacher_prompt_ids[b]), answer_ids=list(answers[b]),
                    answer=speechlm.tokenizer.decode(answers[b], skip_special_tokens=True).strip()))
    finally:
        speechlm.train(was_training)
    return EvalReport(score_answers(teacher_llm, answered, batch_size=batch_size))
