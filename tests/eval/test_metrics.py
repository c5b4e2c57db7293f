"""The text metrics evaluation reports (rba_core.rl.text_metrics, the RL rewards' own): chrF and
BLEU against sacrebleu called directly, SQuAD normalisation on tricky strings, "contains a gold
answer", and NQ's per-question scores."""
from __future__ import annotations

import pytest
import sacrebleu

from rba_core.errors import ConfigError
from rba_core.eval import nq
from rba_core.rl import text_metrics as tm

PAIRS = [("The capital of France is Paris.", "Paris is the capital of France."),
         ("hello world", "hello there world"),
         ("", "a reference"),
         ("Ein Haus am See.", "A house by the lake.")]


@pytest.mark.parametrize("hyp, ref", PAIRS)
def test_sentence_chrf_and_bleu_are_sacrebleus(hyp, ref):
    assert tm.chrf(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score / 100)
    assert tm.bleu(hyp, ref) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100)


def test_corpus_chrf_and_bleu_are_sacrebleus():
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    assert tm.corpus_chrf(hyps, refs) == pytest.approx(
        sacrebleu.corpus_chrf(hyps, [refs]).score / 100)
    assert tm.corpus_bleu(hyps, refs) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score / 100)
    with pytest.raises(ConfigError, match="one reference string per hypothesis"):
        tm.corpus_bleu(hyps, refs[:2])


def test_squad_normalisation_on_tricky_strings():
    # Articles only as whole words ("theater" keeps its "the"), punctuation deleted not spaced
    # (the official script's rule), case and runs of whitespace folded.
    assert tm.normalize_answer("  The  Theater, an  Apple!  ") == "theater apple"
    assert tm.normalize_answer("Eiffel-Tower") == "eiffeltower"
    assert tm.normalize_answer("A.B.C.") == "abc"
    assert tm.exact_match("the Beatles.", ["Beatles", "John"]) == 1.0
    assert tm.exact_match("Beatles band", "Beatles") == 0.0
    # F1 on bags of normalised tokens, best gold wins: "nine generals" vs "nine" = 2/3.
    assert tm.token_f1("Nine generals", ["Nine", "five"]) == pytest.approx(2 / 3)
    assert tm.token_f1("", "") == 1.0 and tm.token_f1("", "x") == 0.0


def test_contains_answer_needs_whole_words():
    assert tm.contains_answer("There are nine five-star generals.", "Nine") == 1.0
    assert tm.contains_answer("There were ninety.", "nine") == 0.0
    assert tm.contains_answer("It was the Amma.", ["Camille", "amma"]) == 1.0
    assert tm.contains_answer("anything", ["the"]) == 0.0     # empty after normalisation


def test_nq_score_is_the_max_over_gold_answers():
    scores = nq.score("Six geese a-laying", ["6 geese a-laying", "six geese a-laying"])
    assert scores == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0}
