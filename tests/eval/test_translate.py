"""`rba eval --suite translate`: a user's pairs file keeps every good line in order and leaves
out each bad one with its line number and why (never ending the run), an `rba synth --task
translate` split is read as the synth suite reads it, the scores are sacrebleu's on the same
strings, and a whole run writes the translate metrics (tone TTS in place of espeak)."""
from __future__ import annotations

import json

import pytest
import sacrebleu

from helpers import ToneTTS, write_dataset, write_tiny_encoder, write_tiny_llm
from rba_core.cli import main
from rba_core.data.tokenizer import Tokenizer
from rba_core.errors import ConfigError
from rba_core.eval.suites import Context, SuiteOptions, make_suite
from rba_core.eval.suites.translate import read_pairs
from rba_core.eval.systems import Item, System
from rba_core.rollout import SamplingConfig
from rba_core.synth.recipes import translate_prompt
from rba_core.synth.text import repetition_reason

# (line content, why it is left out or None); line 10 is blank and skipped unreported.
LINES = [
    ('{"id": "a", "source": "where is the station", "reference": "ou est la gare"}', None),
    ("not json", "bad_json"),
    ("[1, 2]", "not_an_object"),
    ('{"reference": "x"}', "missing_source"),
    ('{"source": "  ", "reference": "x"}', "missing_source"),
    ('{"source": 3, "reference": "x"}', "bad_source"),
    ('{"source": "hello there", "reference": ""}', "missing_reference"),
    ('{"source": "hello there", "reference": ["x"]}', "bad_reference"),
    ('{"source": "good day", "reference": "bonjour", "target_language": 7}',
     "bad_target_language"),
    ("", None),
    ('{"source": "good morning", "reference": "guten morgen", "target_language": "German"}',
     None),
    ('{"id": "a", "source": "a second a", "reference": "un deuxieme a"}', "duplicate_id"),
    ('{"id": {"x": 1}, "source": "see you", "reference": "a bientot"}', "bad_id"),
    (b'{"source": "caf\xe9 au lait", "reference": "x"}', "bad_json"),    # not UTF-8
    ('{"id": "line-16", "source": "thank you", "reference": "merci"}', None),
    ('{"source": "good night", "reference": "bonne nuit"}', None),     # line-16 is taken
    ('{"id": 7, "source": "the red house", "reference": "la maison rouge", '
     '"target_language": null}', None),
]


def _write_pairs(path, lines=LINES):
    blob = b"\n".join(line if isinstance(line, bytes) else line.encode() for line, _ in lines)
    path.write_bytes(b"\xef\xbb\xbf" + blob + b"\n")     # a BOM, as some editors write
    return path


@pytest.fixture()
def tone_tts(monkeypatch):
    """The eval speaker's engine is the tone TTS (whatever --engine says), in its voice 'a'."""
    from rba_core.synth import tts

    monkeypatch.setattr(tts, "make_backend", lambda *args, **kwargs: ToneTTS())
    return ("a",)


def test_pairs_file_leaves_out_each_bad_line_and_keeps_every_good_one(tmp_path):
    pairs, left_out = read_pairs(_write_pairs(tmp_path / "pairs.jsonl"), "French")
    assert [(p.id, p.line) for p in pairs] == [("a", 1), ("line-11", 11), ("line-16", 15),
                                               ("line-16.2", 16), ("7", 17)]
    assert [p.target_language for p in pairs] == ["French", "German", "French", "French",
                                                  "French"]
    assert pairs[1].source == "good morning" and pairs[1].reference == "guten morgen"
    expected = [(number, why) for number, (_, why) in enumerate(LINES, start=1) if why]
    assert [(left["line"], left["reason"]) for left in left_out] == expected
    assert left_out[0]["id"] == "pairs.jsonl:2"
    assert next(left for left in left_out if left["reason"] == "duplicate_id")["id"] == "a"


def test_pairs_file_is_spoken_and_prompted_per_row(tmp_path, tone_tts):
    data = _write_pairs(tmp_path / "pairs.jsonl",
                        [*LINES, ('{"source": "failnow please", "reference": "x"}', None)])
    options = SuiteOptions(data=data, voices=tone_tts, audio_cache=tmp_path / "audio",
                           target_language="Spanish", progress=False)
    suite = make_suite("translate", options)
    items = suite.items(None)
    assert [item.id for item in items] == ["a", "line-11", "line-16", "line-16.2", "7"]
    assert [item.prompt for item in items] == [translate_prompt(language) for language in (
        "Spanish", "German", "Spanish", "Spanish", "Spanish")]
    assert items[4].text == "the red house" and items[4].gold["reference"] == "la maison rouge"
    assert all(item.audio.is_file() and item.meta["voice"]["voice"] in ("a+1", "a+2")
               for item in items)
    # The TTS failure is one more left-out row, after the file's own bad lines.
    reasons = [left["reason"] for left in suite.left_out]
    assert len(reasons) == 12 and reasons[-1].startswith("synthesis failed")
    assert "all 6" in suite.description

    limited = make_suite("translate", SuiteOptions(
        data=data, voices=tone_tts, audio_cache=tmp_path / "audio", limit=2, progress=False))
    assert [item.id for item in limited.items(None)] == ["a", "line-11"]


def test_unusable_data_is_one_clear_error(tmp_path):
    # Without line 1, line 12's id is no duplicate: it would be the one usable row.
    bad = _write_pairs(tmp_path / "bad.jsonl",
                       [line for line in LINES if line[1] not in (None, "duplicate_id")])
    with pytest.raises(ConfigError, match=r"bad\.jsonl: no usable rows \(10 left out\).*"
                                          r'"source" and "reference"'):
        make_suite("translate", SuiteOptions(data=bad, audio_cache=tmp_path)).items(None)
    with pytest.raises(ConfigError, match="needs --data"):
        make_suite("translate", SuiteOptions()).items(None)
    with pytest.raises(ConfigError, match="no such file or folder"):
        make_suite("translate", SuiteOptions(data=tmp_path / "missing.jsonl")).items(None)
    good = _write_pairs(tmp_path / "good.jsonl", LINES[:1])
    with pytest.raises(ConfigError, match="--target-language"):
        make_suite("translate", SuiteOptions(data=good, target_language=" ")).items(None)


def _translate_rows():
    prompt = translate_prompt("French")
    return [{"instruction": "what is the capital of france", "prompt": prompt,
             "response": "quelle est la capitale de la france", "task": "translate"},
            {"instruction": "the sky is blue", "prompt": "answer the question briefly .",
             "response": "blue .", "task": "qa"},
            {"instruction": "hello world", "prompt": prompt, "response": "bonjour le monde",
             "task": "translate"},
            {"instruction": "red green blue", "prompt": prompt, "response": "rouge vert bleu",
             "task": "translate"}]


def test_a_synth_translate_split_is_read_like_the_synth_suite(tmp_path):
    llm = write_tiny_llm(tmp_path / "llm")
    data = write_dataset(tmp_path / "data", _translate_rows(), split="heldout")
    (data / "audio" / "00003.flac").unlink()
    suite = make_suite("translate", SuiteOptions(data=data))
    items = suite.items(Tokenizer.from_pretrained(llm))
    assert [item.id for item in items] == ["s0-0", "s0-2"]
    assert items[1].text == "hello world" and items[1].prompt == translate_prompt("French")
    assert items[1].gold == {"reference": "bonjour le monde"}
    assert items[1].audio == data / "audio" / "00002.flac" and items[1].group == "espeak"
    assert [(left["id"], left["reason"]) for left in suite.left_out] == [
        ("manifest.jsonl:4 (id s0-3)", "missing_audio"), ("s0-1", "other_task")]
    with pytest.raises(ConfigError, match="no usable translate rows"):
        make_suite("translate", SuiteOptions(data=data, split="train")).items(
            Tokenizer.from_pretrained(llm))


class _Fixed(System):
    """Answers each item with a fixed string (its ids under the tiny tokenizer)."""

    name = "fixed"

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, answers

    def answer_ids(self, items, sampling, *, prompt=None, batch_size=8, seed=0, progress=None):
        return [self.tokenizer.encode(self.answers[item.id]) + [self.tokenizer.eos_id]
                for item in items]


def test_scores_are_sacrebleus_on_the_same_strings(tmp_path):
    tokenizer = Tokenizer.from_pretrained(write_tiny_llm(tmp_path / "llm"))
    references = {"x": "the capital of france is paris .", "y": "hello world .",
                  "z": "red green blue ."}
    answers = {"x": "paris is the capital of france .", "y": "hello hello hello hello world",
               "z": "red green blue ."}
    items = [Item(key, "source", translate_prompt("French"), None, "espeak", {"reference": ref})
             for key, ref in references.items()]
    context = Context(teacher=None, tokenizer=tokenizer, sampling=SamplingConfig(),
                      batch_size=2, seed=0, progress=False)
    records = make_suite("translate", SuiteOptions()).evaluate(
        _Fixed(tokenizer, answers), items, context)
    assert [r["answer"] for r in records] == list(answers.values())
    for record, ref in zip(records, references.values()):
        hyp, scores = record["answer"], record["scores"]
        assert scores["bleu"] == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100)
        assert scores["chrf"] == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score / 100)
        assert scores["looping"] == float(repetition_reason(hyp) is not None)
        assert scores["answer_tokens"] == len(hyp.split()) + 1      # with the stop token
    assert 0 < records[0]["scores"]["bleu"] < 1 and records[2]["scores"]["chrf"] == 1.0
    assert [r["scores"]["looping"] for r in records] == [0.0, 1.0, 0.0]


def test_translate_suite_end_to_end(tmp_path, tone_tts, capsys):
    encoder = write_tiny_encoder(tmp_path / "encoder")
    llm = write_tiny_llm(tmp_path / "llm")
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    # No --max-new-tokens: the suite's default applies.
    assert main(["eval", "--encoder", str(encoder), "--llm", str(llm), "--batch-size", "2",
                 "--resamples", "20", "--no-progress", "--suite", "translate", "--data",
                 str(pairs), "--voices", ",".join(tone_tts), "--audio-cache",
                 str(tmp_path / "audio"), "--teacher-text", "--untrained", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "results.md").read_text()
    assert "| system | BLEU ↑ | chrF ↑ | looping ↓ | answer tokens |" in printed
    assert "Left out: 11 items (bad_id 1, bad_json 2," in printed
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "translate" and results["items"] == 5
    assert results["sampling"]["max_new_tokens"] == 96
    assert [m["key"] for m in results["metrics"]] == ["bleu", "chrf", "looping", "answer_tokens"]
    assert results["left_out_counts"]["missing_source"] == 2
    assert [left["line"] for left in results["left_out"]] == [
        n for n, (_, why) in enumerate(LINES, start=1) if why]
    assert list(results["systems"]) == ["teacher (text)", "untrained"]
    assert len(results["differences"]) == 4
    for item in results["per_item"]:
        assert item["prompt"].startswith("Translate the audio into ")
        for record in item["answers"].values():
            ref = item["gold"]["reference"]
            assert record["scores"]["bleu"] == pytest.approx(
                sacrebleu.sentence_bleu(record["answer"], [ref]).score / 100)
            assert record["scores"]["chrf"] == pytest.approx(
                sacrebleu.sentence_chrf(record["answer"], [ref]).score / 100)
