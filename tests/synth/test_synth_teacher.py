"""`rba synth --teacher DIR` with an LLM whose tokenizer is not the SpeechLM's: synthesis loads
the teacher's own tokenizer and writes plain text, which the SpeechLM's side tokenizes with its
own. A tiny random Llama with a vocabulary of other words stands in for the teacher and a
tone-generating TTS for espeak."""
from __future__ import annotations

import argparse
import json

from helpers import WORDS, ToneTTS, write_tiny_llm
from rba_core.data.speech import SpeechDataset
from rba_core.data.tokenizer import Tokenizer
from rba_core.synth import read_manifest

# Not one word shared with the SpeechLM's tiny vocabulary (helpers.WORDS), and fewer of them.
TEACHER_WORDS = ("le la chat chien rouge bleu maison ciel est un une de et bonjour monde oui "
                 "non merci soleil").split()


def test_a_teacher_with_another_tokenizer_synthesizes_translate_rows(tmp_path, monkeypatch,
                                                                    capsys):
    from rba_core.commands import synth as command
    import rba_core.synth.pipeline as pipeline

    assert not set(TEACHER_WORDS) & set(WORDS)
    teacher = write_tiny_llm(tmp_path / "teacher", TEACHER_WORDS)
    speech_llm = write_tiny_llm(tmp_path / "llm")
    ours, theirs = Tokenizer.from_pretrained(speech_llm), Tokenizer.from_pretrained(teacher)
    assert ours.vocab_size != theirs.vocab_size and not ours.same_vocabulary(theirs)

    monkeypatch.setattr(pipeline, "make_backend", lambda *a, **k: ToneTTS())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "data"
    # A random model's turns are a few words long: --min-words 1 keeps them.
    args = parser.parse_args([
        "synth", "--task", "translate", "--target-language", "French", "--num", "2",
        "--out", str(out), "--teacher", str(teacher), "--batch-size", "16", "--min-words", "1",
        "--max-instruction-tokens", "8", "--max-response-tokens", "6", "--tts-workers", "1",
        "--no-progress"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2

    rows = read_manifest(out)
    assert len(rows) == 2
    teacher_vocab = set(theirs.get_vocab())
    for row in rows:
        assert row["task"] == "translate" and row["teacher"] == "teacher"
        assert row["prompt"] == "Translate the audio into French."
        # Plain text in the teacher's words, decoded by the teacher's own tokenizer.
        words = (row["instruction"] + " " + row["response"]).split()
        assert words and set(words) <= teacher_vocab
    written = " ".join(row["instruction"] + " " + row["response"] for row in rows).split()
    assert set(written) & set(TEACHER_WORDS), "no teacher-only word: the test shows nothing"
    # The training side reads those rows with the SpeechLM's tokenizer.
    dataset = SpeechDataset(out, "train", ours)
    assert len(dataset) == 2
    batch = dataset.batch([0, 1])
    assert batch is not None and int(batch.response_mask.sum()) > 0
