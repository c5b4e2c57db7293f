"""``--suite nq``: Natural Questions open, spoken; exact match, token F1 and "contains a gold
answer", each against the best-matching gold answer (``rba_core.eval.nq``).

Both systems get the spoken-QA task prompt the SpeechLM is trained with ("Answer the question
in the audio briefly.", the same text the teacher read when it wrote the training answers).
"""
from __future__ import annotations

from rba_core.eval import nq
from rba_core.eval.report import Metric
from rba_core.eval.suites import Suite, answer_texts, first, spoken_items
from rba_core.synth.recipes import QA_PROMPT


class NQSuite(Suite):
    name = "nq"
    metrics = (Metric("exact_match", "exact match", True, percent=True),
               Metric("f1", "token F1", True, percent=True),
               Metric("contains", "contains gold", True, percent=True))

    def items(self, tokenizer):
        questions = first(nq.read_questions(), self.options.limit)
        self.description = (f"NQ-open test from {nq.NQ_DISTRIBUTION}, first {len(questions)} "
                            f"questions in file order, spoken by {self.options.engine}")
        return spoken_items(self, [(f"nq-{q.index:04d}", q.question, QA_PROMPT,
                                    {"answers": q.answers}) for q in questions])

    def evaluate(self, system, items, context):
        _, texts = answer_texts(system, items, context)
        return [{"answer": text, "scores": nq.score(text, item.gold["answers"])}
                for item, text in zip(items, texts)]
