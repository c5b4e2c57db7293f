"""``rba synth --task read``: sentences of a dataset's train answers, spoken in its train voices,
as repeat-after-me rows; filters, no held-out leak, resume after a kill, bad input."""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pytest

import rba_core.synth.dataset as dataset_module
from helpers import ToneTTS
from rba_core.errors import ConfigError
from rba_core.synth import SynthConfig, read_manifest
from rba_core.synth.dataset import DatasetWriter
from rba_core.synth.read import READ_TASK, answer_sentences, run_read
from rba_core.synth.recipes import READ_PROMPT

ANSWERS = [
    # (split, voice, truncated, response)
    ("train", "a+1", False, "Paris is the capital of France. It lies on the Seine river!"),
    ("train", "a+2", True, "Water boils at one hundred degrees. At high altitude it boils at"),
    ("heldout", "b+1", False, "The heldout answer must never be read aloud here."),
    ("train", "a+1", False, "Yes.\nUse `ls -la` to list the files in a folder.\n"
                            "The moon orbits the earth once in about twenty seven days."),
    ("train", "a+2", False, "The moon orbits the earth once in about twenty seven days."),
]


def write_source(folder) -> None:
    with DatasetWriter(folder) as writer:
        for index, (split, voice, truncated, response) in enumerate(ANSWERS):
            writer.add({"id": f"qa-s0-{index:07d}", "task": "qa", "instruction": f"Question {index}?",
                        "prompt": "Answer the question in the audio briefly.",
                        "response": response, "audio": "", "duration": 0.0, "sample_rate": 16000,
                        "voice": {"engine": "tone", "voice": voice, "speed": 1.0, "pitch": 200.0},
                        "teacher": "t", "tts": "tone 1", "seed": 0, "split": split,
                        "response_truncated": truncated, "candidate": index},
                       np.zeros(1600, dtype=np.float32))


EXPECTED = ["Paris is the capital of France.", "It lies on the Seine river!",
            "Water boils at one hundred degrees.",
            "The moon orbits the earth once in about twenty seven days."]


def config(out, num=10, **overrides) -> SynthConfig:
    return SynthConfig(task="read", num=num, out=str(out), progress=False, tts_workers=2,
                       **overrides)


def test_answer_sentences_keep_complete_speakable_train_sentences(tmp_path):
    write_source(tmp_path)
    filters: Counter[str] = Counter()
    pieces = answer_sentences(read_manifest(tmp_path), min_words=4, max_words=30,
                              filters=filters)
    assert [text for _, text in pieces] == EXPECTED + [EXPECTED[-1]]
    assert [source for source, _ in pieces][:3] == ["qa-s0-0000000"] * 2 + ["qa-s0-0000001"]
    # "Yes." is too short, the backticks are not speakable; the truncated tail is dropped
    # before any filter sees it, and the held-out answer is never considered.
    assert filters == {"too_short": 1, "not_speakable": 1}


def test_read_rows_repeat_the_sentence_in_train_voices_and_resume(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_source(source)
    reference = run_read(config(tmp_path / "reference"), source=source, tts=ToneTTS())
    rows = read_manifest(tmp_path / "reference")
    # The repeated moon sentence is a duplicate: four distinct sentences.
    assert [r["instruction"] for r in rows] == EXPECTED
    assert reference["tasks"]["read"]["filters"]["exact_duplicate"] == 1
    for row in rows:
        assert row["task"] == READ_TASK and row["split"] == "train"
        assert row["prompt"] == READ_PROMPT and row["response"] == row["instruction"]
        assert row["voice"]["voice"] in {"a+1", "a+2"}        # never b+1, a held-out voice
        assert row["id"] == f"read-s0-{row['candidate']:07d}"
    assert [r["source"] for r in rows] == ["qa-s0-0000000", "qa-s0-0000000", "qa-s0-0000001",
                                           "qa-s0-0000003"]

    out = tmp_path / "killed"
    original_add = dataset_module.DatasetWriter.add
    calls = {"n": 0}

    def dying_add(self, row, wave):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_add(self, row, wave)

    monkeypatch.setattr(dataset_module.DatasetWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        run_read(config(out), source=source, tts=ToneTTS())
    monkeypatch.setattr(dataset_module.DatasetWriter, "add", original_add)
    assert len(read_manifest(out)) == 2
    summary = run_read(config(out), source=source, tts=ToneTTS())
    assert summary["tasks"]["read"]["filters"] == reference["tasks"]["read"]["filters"]
    resumed = read_manifest(out)
    for key in ("id", "instruction", "voice", "audio"):
        assert [r[key] for r in resumed] == [r[key] for r in rows]
    # num caps the rows; the read rows of the output folder itself are never a source.
    run_read(config(tmp_path / "two", num=2), source=source, tts=ToneTTS())
    assert len(read_manifest(tmp_path / "two")) == 2


def test_read_into_the_source_folder_reads_only_the_other_tasks(tmp_path):
    write_source(tmp_path)
    run_read(config(tmp_path), tts=ToneTTS())
    run_read(config(tmp_path, num=20), tts=ToneTTS())
    rows = [r for r in read_manifest(tmp_path) if r["task"] == READ_TASK]
    assert [r["instruction"] for r in rows] == EXPECTED


def test_bad_input_names_the_fix(tmp_path):
    write_source(tmp_path / "source")
    with pytest.raises(ConfigError, match="drop --heldout-fraction"):
        run_read(config(tmp_path / "x", heldout_fraction=0.1), source=tmp_path / "source",
                 tts=ToneTTS())
    with DatasetWriter(tmp_path / "empty"):
        pass
    with pytest.raises(ConfigError, match="synthesize instruct/qa/translate rows there first"):
        run_read(config(tmp_path / "y"), source=tmp_path / "empty", tts=ToneTTS())

    class OtherVoices(ToneTTS):
        def voices(self):
            return ["z+1"]

    with pytest.raises(ConfigError, match="use the engine the source was made with"):
        run_read(config(tmp_path / "z"), source=tmp_path / "source", tts=OtherVoices())

    from rba_core.commands import synth as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "--task", "qa", "--num", "1", "--out",
                              str(tmp_path / "q"), "--source", str(tmp_path / "source")])
    with pytest.raises(ConfigError, match="--source goes with --task read or continue only"):
        args.handler(args)


def test_a_text_file_source_is_read_in_every_voice_but_the_heldout_ones(tmp_path):
    text = tmp_path / "passages.txt"
    text.write_text("Paris is the capital of France. It lies on the Seine river!\n\n"
                    "Yes. The moon orbits the earth once in about twenty seven days.\n"
                    "An unfinished passage with no end\n", encoding="utf-8")
    summary = run_read(config(tmp_path / "out", heldout_voices=("b",)), source=text,
                       tts=ToneTTS())
    rows = read_manifest(tmp_path / "out")
    assert [r["instruction"] for r in rows] == [EXPECTED[0], EXPECTED[1], EXPECTED[3]]
    assert [r["source"] for r in rows] == ["passages.txt:1", "passages.txt:1", "passages.txt:3"]
    # No voice of base voice b: those are the held-out split's (made by another task).
    assert {r["voice"]["voice"] for r in rows} <= {"a+1", "a+2"}
    assert all(r["split"] == "train" and r["response"] == r["instruction"] for r in rows)
    filters = summary["tasks"]["read"]["filters"]
    assert filters["too_short"] == 1 and filters["not_a_sentence"] == 1
    # Without --heldout-voices every voice may speak.
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"Sentence number {n} is spoken by someone here." for n in
                              range(60)), encoding="utf-8")
    run_read(config(tmp_path / "all", num=40, near_duplicate_threshold=1.0), source=many,
             tts=ToneTTS())
    voices = {r["voice"]["voice"].split("+")[0] for r in read_manifest(tmp_path / "all")}
    assert voices == {"a", "b"}


def test_a_bad_text_source_names_the_fix(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("Too short.\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lines with a complete, speakable sentence"):
        run_read(config(tmp_path / "a"), source=empty, tts=ToneTTS())
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        run_read(config(tmp_path / "b"), source=binary, tts=ToneTTS())
    fine = tmp_path / "fine.txt"
    fine.write_text("Paris is the capital of France.\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds out every voice of --tts"):
        run_read(config(tmp_path / "c", heldout_voices=("a", "b")), source=fine,
                 tts=ToneTTS())
    write_source(tmp_path / "folder")
    with pytest.raises(ConfigError, match="they are for a text-file --source"):
        run_read(config(tmp_path / "d", heldout_voices=("b",)), source=tmp_path / "folder",
                 tts=ToneTTS())


def test_a_rerun_from_another_source_is_refused(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("Paris is the capital of France.\n", encoding="utf-8")
    second.write_text("The moon orbits the earth once a month.\n", encoding="utf-8")
    run_read(config(tmp_path / "out", num=1), source=first, tts=ToneTTS())
    with pytest.raises(ConfigError, match="rows read from .*first.txt, not .*second.txt"):
        run_read(config(tmp_path / "out", num=2), source=second, tts=ToneTTS())
    # The same source, named another way, continues.
    run_read(config(tmp_path / "out", num=2), source=tmp_path / "." / "first.txt",
             tts=ToneTTS())
