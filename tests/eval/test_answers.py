"""Answer scoring (rba_core/eval/answers.py): the teacher's log-likelihood of an answer against
a plain forward, chrF worked out by hand, and evaluate_answers row by row on a tiny SpeechLM."""
from __future__ import annotations

import pytest
import torch

from helpers import write_dataset
from rba_core.data.prompts import teacher_messages, teacher_prompt_ids
from rba_core.data.speech import SpeechDataset
from rba_core.errors import ConfigError
from rba_core.eval.answers import chrf, evaluate_answers, teacher_loglik
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


def test_chrf_by_hand():
    assert chrf("the cat", "the cat") == 100.0
    assert chrf("abc", "xyz") == 0.0
    assert chrf("a b", "ab") == 100.0     # whitespace is ignored
    # "ab" vs "abc": 1-grams P=2/2, R=2/3; 2-grams P=1/1, R=1/2; no 3-grams in "ab".
    # P=1, R=7/12, F2 = 5PR / (4P + R) = 35/55.
    assert chrf("ab", "abc") == pytest.approx(100 * 35 / 55)
    assert chrf("abc", "ab") == pytest.approx(100 * 35 / 40)   # P and R swap: 5*(7/12)/(4*7/12+1)
    assert chrf("", "") == 100.0 and chrf("", "a") == 0.0
    with pytest.raises(ConfigError):
        chrf("a", "b", order=0)


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
        ll = teacher_loglik(slm.llm, one.teacher_prompt_ids, ids)
        assert row.answer_tokens == len(ids[0])
        assert row.teacher_logprob == pytest.approx(float(ll.per_token[0]), rel=1e-4)
    assert report.summary()["chrf"] == pytest.approx(sum(r.chrf for r in report.rows) / 3)
