"""Text similarity metrics shared by the RL task rewards and by evaluation.

One implementation for both, so a reward and the number reported for it cannot drift apart.

- chrf, bleu: sentence-level scores from sacrebleu (its default settings: chrF with character
  order 6, word order 0, beta 2; BLEU with the 13a tokenizer, exponential smoothing and
  effective order), divided by 100 so they lie in [0, 1] like the other rewards. Several
  references are passed to sacrebleu as such and scored by its own multi-reference rules.
- corpus_chrf, corpus_bleu: sacrebleu's corpus-level scores (statistics summed over all
  sentences before the score is formed, as papers report BLEU), also in [0, 1].
- exact_match, token_f1: SQuAD v2's official definitions (its normalize_answer, which Natural
  Questions evaluations reuse), the maximum over several gold answers. The normalisation
  deletes ASCII punctuation rather than turning it into a space, exactly as the official
  script does, so "Eiffel-Tower" becomes "eiffeltower"; matching that script keeps our
  numbers comparable to published ones.
- contains_answer: whether a normalised gold answer occurs in the normalised prediction as a
  whole-word run (the "has answer" check of open-domain QA, for answers that are right but
  wrapped in a sentence).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import sacrebleu

from rba_core.errors import ConfigError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ConfigError(
            f"references must be a string or a non-empty list of strings, got {references!r}; "
            "check the reference field of the data row")
    return refs


def normalize_answer(text: str) -> str:
    """Lowercase, delete punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(ref)) for ref in _references(references))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    # SQuAD v2: an empty answer matches only an empty answer.
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Bag-of-words F1 of the normalised strings, the maximum over the references."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in _references(references))


def contains_answer(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when some normalised reference is a run of whole words of the normalised
    prediction ("nine" is in "there are nine generals", not in "ninety"), else 0.0."""
    pred = f" {normalize_answer(prediction)} "
    return max(float(bool(gold) and f" {gold} " in pred)
               for gold in (normalize_answer(ref) for ref in _references(references)))


def chrf(hypothesis: str, references: str | Sequence[str]) -> float:
    """sacrebleu's sentence chrF in [0, 1] (its score / 100)."""
    return sacrebleu.sentence_chrf(hypothesis, _references(references)).score / 100.0


def bleu(hypothesis: str, references: str | Sequence[str]) -> float:
    """sacrebleu's sentence BLEU in [0, 1] (its score / 100)."""
    return sacrebleu.sentence_bleu(hypothesis, _references(references)).score / 100.0


def _corpus(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs) or not hyps or not all(isinstance(t, str) for t in hyps + refs):
        raise ConfigError(f"corpus scores need one reference string per hypothesis string; got "
                          f"{len(hyps)} hypotheses and {len(refs)} references")
    return hyps, refs


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus chrF in [0, 1], one reference per hypothesis."""
    hyps, refs = _corpus(hypotheses, references)
    return sacrebleu.corpus_chrf(hyps, [refs]).score / 100.0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU in [0, 1], one reference per hypothesis."""
    hyps, refs = _corpus(hypotheses, references)
    return sacrebleu.corpus_bleu(hyps, [refs]).score / 100.0
