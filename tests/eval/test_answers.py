"""Answer scoring (rba_core/eval/answers.py): the teacher's log-likelihood of an answer against
a plain forward, the teacher gap (zero when the mismatched transcript is the own one), the
on-topic and looping flags, and evaluate_answers row by row on a tiny SpeechLM."""
from __future__ import annotations

import pytest
import torch

from helpers import write_dataset
from rba_core.data.prompts import teacher_messages, teacher_prompt_ids
from rba_core.data.speech import SpeechDataset
from rba_core.eval.answers import (
    evaluate_answers, looping, mismatched, on_topic, teacher_gap, teacher_loglik,
)
from rba_core.rl.text_metrics import bleu, chrf
from rba_core.rollout import SamplingConfig


def test_teacher_loglik_matches_a_plain_forward(slm_and_batch):
    slm, _ = slm_and_batch
    tokenizer = slm.tokenizer
    prompts = [teacher_prompt_ids(tokenizer, teacher_messages({"instruction": text}))
               for text in ("what is the capital of france ?", "say hello")]
    answers = [tokenizer.encode("paris .") + [tokenizer.eos_id], tokenizer.encode("hello world")]
    result = teacher_loglik(slm.llm, prompts, answers)
    for b in range(2):
        ids = torch.tensor(prompts[b] + answers[b])
        with torch.no_grad():
            logp = slm.llm(ids[None])[0].log_softmax(-1)
        start = len(prompts[b]) - 1
        expected = sum(float(logp[start + i, t]) for i, t in enumerate(answers[b]))
        assert float(result.total[b]) == pytest.approx(expected, rel=1e-4)
        assert int(result.tokens[b]) == len(answers[b])
    assert float(result.per_token[0]) == pytest.approx(float(result.total[0]) / len(answers[0]))


def test_teacher_gap_is_zero_when_the_mismatched_transcript_is_the_own(slm):
    tokenizer = slm.tokenizer
    prompts = [teacher_prompt_ids(tokenizer, teacher_messages({"instruction": text}))
               for text in ("what is the capital of france ?", "what color is the sky ?")]
    answers = [tokenizer.encode("paris .") + [tokenizer.eos_id], tokenizer.encode("blue .")]
    own, gap = teacher_gap(slm.llm, prompts, prompts, answers)
    assert gap.tolist() == [0.0, 0.0]
    assert own.per_token.tolist() == teacher_loglik(slm.llm, prompts, answers).per_token.tolist()
    _, swapped = teacher_gap(slm.llm, prompts, mismatched(prompts), answers)
    other = teacher_loglik(slm.llm, prompts[::-1], answers).per_token
    assert swapped.tolist() == pytest.approx((own.per_token - other).tolist(), abs=1e-6)
    assert mismatched([[1], [2], [3]]) == [[2], [3], [1]] and mismatched([[1]]) == [[1]]


def test_on_topic_and_looping_flags():
    assert on_topic("What is the capital of France?", "Paris is the capital.")
    assert not on_topic("What is the capital of France?", "The answer is: blue.")
    assert looping("The answer to this question is: " * 4)
    assert not looping("Paris is the capital of France.")


def test_evaluate_answers_scores_each_row(slm_and_batch, tmp_path):
    slm, _ = slm_and_batch
    dataset = SpeechDataset(write_dataset(tmp_path / "eval"), "train", slm.tokenizer)
    report = evaluate_answers(slm, slm.llm, dataset, batch_size=2, max_new_tokens=6)
    assert [r.id for r in report.rows] == [row["id"] for row in dataset.rows]
    assert slm.training    # restored after evaluation
    for index, row in enumerate(report.rows):
        one = dataset.batch([index])
        ids = slm.generate_pieces(one.features, one.frame_lengths, one.prompt_before,
                                  one.prompt_after,
                                  SamplingConfig(temperature=0.0, max_new_tokens=6))
        assert row.answer == slm.tokenizer.decode(ids[0]).strip()
        assert row.chrf == chrf(row.answer, row.reference)
        assert row.bleu == bleu(row.answer, row.reference)
        ll = teacher_loglik(slm.llm, one.teacher_prompt_ids, ids)
        assert row.answer_tokens == len(ids[0])
        assert row.teacher_logprob == pytest.approx(float(ll.per_token[0]), rel=1e-4)
        # The mismatched transcript is the next row's (the last row's is the first's).
        other = dataset.batch([(index + 1) % len(dataset)]).teacher_prompt_ids
        gap = ll.per_token[0] - teacher_loglik(slm.llm, other, ids).per_token[0]
        assert row.teacher_gap == pytest.approx(float(gap), abs=1e-5)
    summary = report.summary()
    assert summary["rows"] == 3.0
    assert summary["chrf"] == pytest.approx(sum(r.chrf for r in report.rows) / 3)
    assert set(summary) == {"rows", "teacher_logprob", "teacher_gap", "answer_tokens", "chrf",
                            "bleu", "on_topic", "looping"}
