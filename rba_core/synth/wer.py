"""Word error rate, for checking that synthesized speech says its transcript."""
from __future__ import annotations

from rba_core.synth.text import normalize_for_speech, words_of


def _words(text: str) -> list[str]:
    # Both sides spelled the same way: Whisper writes "5" where the TTS read "five".
    return words_of(normalize_for_speech(text).replace("-", " "))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after both texts are
    normalised for speech and lower-cased without punctuation. An empty reference gives 0.0
    for an empty hypothesis and 1.0 otherwise."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, other in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1,
                             previous[j - 1] + (word != other))
        previous = current
    return previous[-1] / len(ref)
