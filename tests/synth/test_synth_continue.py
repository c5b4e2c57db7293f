"""``rba synth --task continue`` (the teacher's continuation of a spoken answer sentence) and
``--tts espeak,piper`` (one dataset mixing engines, the engine drawn per row).

A tiny random Llama is the continue task's teacher, and the decode oracle of the tests
(``helpers.reference_generate``) recomputes each row's response from the training side's own
teacher prompt (``teacher_prompt_ids(teacher_messages(row))``), so a response generated from
any other text than the row's prompt and transcript fails. Tone-generating fake engines stand
in for espeak and piper, except in one tiny real run of both."""
from __future__ import annotations

import argparse
import random
import shutil
from collections import Counter

import numpy as np
import pytest

import rba_core.synth.dataset as dataset_module
from helpers import ToneTTS, reference_generate, write_tiny_llm
from rba_core.data.prompts import teacher_messages, teacher_prompt_ids
from rba_core.errors import ConfigError
from rba_core.synth import SynthConfig, read_manifest, run_synth
from rba_core.synth.dataset import DatasetWriter
from rba_core.synth.read import CONTINUE_TASK, echo_reason, run_read
from rba_core.synth.recipes import CONTINUE_PROMPT
from rba_core.synth.teacher import Generation, RolloutTeacher
from rba_core.synth.tts import EngineMix, make_backend, parse_engines

# Answers in the tiny teacher's vocabulary (helpers.WORDS), so its prompts hold known words.
ANSWERS = [
    # (split, voice, response)
    ("train", "a+1", "paris is the capital of france. say hello world one two three!"),
    ("train", "a+2", "the sky color is blue. what is the capital of france?"),
    ("heldout", "b+1", "red green blue yes no is the heldout answer."),
    ("train", "c+1", "one two three is the answer to the question. the sky color is blue."),
    ("train", "a+1", "translate it into french briefly. it is red green and blue."),
]
# The train answers' sentences in order (sentence k is candidate k); the second sky sentence
# is a duplicate, so 7 are distinct.
CANDIDATES = ["paris is the capital of france.", "say hello world one two three!",
              "the sky color is blue.", "what is the capital of france?",
              "one two three is the answer to the question.", "the sky color is blue.",
              "translate it into french briefly.", "it is red green and blue."]
SENTENCES = sorted(set(CANDIDATES))


class BuzzTTS(ToneTTS):
    """A second fake engine: voices of its own, a lower tone."""

    name = "buzz"

    def identifier(self):
        return "buzz 2"

    def voices(self):
        return ["c+1", "c+2"]

    def draw(self, rng, voices):
        from rba_core.synth import Voice

        return Voice("buzz", rng.choice(voices), 1.0, float(rng.randint(60, 90)))


def write_source(folder, answers=ANSWERS) -> None:
    with DatasetWriter(folder) as writer:
        for index, (split, voice, response) in enumerate(answers):
            engine = "buzz" if voice.startswith("c") else "tone"
            writer.add({"id": f"qa-s0-{index:07d}", "task": "qa",
                        "instruction": f"Question {index}?", "prompt": "Answer briefly.",
                        "response": response, "audio": "", "duration": 0.0,
                        "sample_rate": 16000,
                        "voice": {"engine": engine, "voice": voice, "speed": 1.0,
                                  "pitch": 200.0},
                        "teacher": "t", "tts": "tone 1", "seed": 0, "split": split,
                        "response_truncated": False, "candidate": index},
                       np.zeros(1600, dtype=np.float32))


def continue_config(out, num=10, **overrides) -> SynthConfig:
    values = dict(task="continue", num=num, out=str(out), progress=False, tts_workers=2,
                  batch_size=8)
    values.update(overrides)
    return SynthConfig(**values)


def test_echo_reason_wants_four_words_of_its_own():
    sentence = "The capital of France is Paris."
    assert echo_reason(sentence, "The capital of France is Paris.") == "response_echo"
    assert echo_reason(sentence, "Paris is the capital of France, yes.") == "response_echo"
    assert echo_reason(sentence, "It lies on the Seine river.") is None
    # Three words of its own are too few, four enough.
    assert echo_reason(sentence, "Paris, France: lovely old city.") == "response_echo"
    assert echo_reason(sentence, "Paris, France: a lovely old city.") is None


def test_continue_rows_hold_the_teachers_continuation_of_their_own_transcript(tmp_path):
    source = tmp_path / "source"
    write_source(source)
    folder = write_tiny_llm(tmp_path / "teacher")
    teacher = RolloutTeacher.load(folder)
    out = tmp_path / "out"
    summary = run_read(continue_config(out, max_response_tokens=8), source=source,
                       tts=EngineMix([ToneTTS(), BuzzTTS()]),
                       teacher=teacher)
    rows = read_manifest(out)
    filters = summary["tasks"]["continue"]["filters"]
    # Every distinct train sentence either became a row or was dropped by a response filter.
    dropped = sum(filters.get(k, 0) for k in ("response_echo", "response_loop",
                                               "response_empty", "tts_failed"))
    assert len(rows) + dropped == len(SENTENCES) and len(rows) >= 3
    assert filters["accepted"] == len(rows)
    model, tokenizer = teacher.model, teacher.tokenizer
    shown_alone = []
    for row in rows:
        assert row["task"] == CONTINUE_TASK and row["split"] == "train"
        assert row["prompt"] == CONTINUE_PROMPT and row["teacher"] == "teacher"
        assert row["instruction"] == CANDIDATES[row["candidate"]] and row["candidate"] != 5
        assert row["id"] == f"continue-s0-{row['candidate']:07d}"
        assert row["voice"]["voice"] in {"a+1", "a+2", "c+1"}     # never b+1, held out
        # The oracle: greedy decoding of the chat training shows the teacher for this row.
        prompt = teacher_prompt_ids(tokenizer, teacher_messages(row))
        ids = reference_generate(model, [prompt], max_new_tokens=8,
                                 stop_ids=tokenizer.stop_ids)[0]
        assert row["response"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert row["response_truncated"] == (ids[-1] not in tokenizer.stop_ids)
        assert echo_reason(row["instruction"], row["response"]) is None
        alone = teacher_prompt_ids(tokenizer, [{"role": "user", "content": row["instruction"]}])
        shown_alone.append(reference_generate(model, [alone], max_new_tokens=8,
                                              stop_ids=tokenizer.stop_ids)[0] != ids)
    # Without the prompt the teacher says something else: the check above shows something.
    assert any(shown_alone)


class ScriptedContinuer:
    """Continues each sentence with words of its own, except that it echoes the ones about
    the sky; counts the sentences it was asked about."""

    name = "scripted"

    def __init__(self):
        self.asked: Counter[str] = Counter()

    def respond(self, user_messages, seeds, *, max_new_tokens, temperature):
        replies = []
        for message in user_messages:
            prompt, sentence = message.split("\n\n", 1)
            assert prompt == CONTINUE_PROMPT
            self.asked[sentence] += 1
            if "sky" in sentence:
                replies.append(Generation(sentence, True))
            else:
                replies.append(Generation(f"Then came {len(sentence)} more new words.",
                                          len(sentence) % 2 == 0))
        return replies


def test_continue_resumes_after_a_kill_without_repeating_a_row(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_source(source)
    mix = EngineMix([ToneTTS(), BuzzTTS()])
    reference = run_read(continue_config(tmp_path / "reference", batch_size=8), source=source,
                         tts=mix, teacher=ScriptedContinuer())
    expected = read_manifest(tmp_path / "reference")
    # Seven sentences less the echoed sky one.
    assert len(expected) == 6
    assert reference["tasks"]["continue"]["filters"]["response_echo"] == 1

    out = tmp_path / "killed"
    original_add = dataset_module.DatasetWriter.add
    calls = {"n": 0}

    def dying_add(self, row, wave):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original_add(self, row, wave)

    monkeypatch.setattr(dataset_module.DatasetWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        run_read(continue_config(out, batch_size=8), source=source, tts=mix,
                 teacher=ScriptedContinuer())
    monkeypatch.setattr(dataset_module.DatasetWriter, "add", original_add)
    assert len(read_manifest(out)) == 3
    teacher = ScriptedContinuer()
    summary = run_read(continue_config(out, batch_size=8), source=source, tts=mix,
                       teacher=teacher)
    rows = read_manifest(out)
    for key in ("id", "instruction", "response", "response_truncated", "voice", "audio",
                "source", "tts"):
        assert [r[key] for r in rows] == [r[key] for r in expected], key
    # Only what the killed run had not written is asked again (the echoed sentence too).
    assert sum(teacher.asked.values()) == len(SENTENCES) - 3
    assert summary["tasks"]["continue"]["filters"] == reference["tasks"]["continue"]["filters"]
    # A finished folder asks the teacher nothing; other settings are refused.
    teacher = ScriptedContinuer()
    run_read(continue_config(out, num=6, batch_size=8), source=source, tts=mix, teacher=teacher)
    assert not teacher.asked and len(read_manifest(out)) == 6
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        run_read(continue_config(out, num=8, seed=1), source=source, tts=mix,
                 teacher=ScriptedContinuer())
    # Small batches and a cap: rows stop at --num even when a batch loses one to a filter.
    run_read(continue_config(tmp_path / "small", num=3, batch_size=8), source=source, tts=mix,
             teacher=ScriptedContinuer())
    assert len(read_manifest(tmp_path / "small")) == 3


def test_continue_refuses_what_it_cannot_do(tmp_path):
    write_source(tmp_path / "source")
    with pytest.raises(ConfigError, match="--task continue makes train rows only; drop "
                                          "--heldout-fraction"):
        run_read(continue_config(tmp_path / "x", heldout_fraction=0.1),
                 source=tmp_path / "source", tts=ToneTTS(), teacher=ScriptedContinuer())
    # An engine of the mix with no train voice in the source would speak nothing (or a
    # held-out voice): refused, naming it.
    write_source(tmp_path / "tone-only", [a for a in ANSWERS if not a[1].startswith("c")])
    with pytest.raises(ConfigError, match="the --tts buzz engine would speak no row: no voice.*use the engine"):
        run_read(continue_config(tmp_path / "y"), source=tmp_path / "tone-only",
                 tts=EngineMix([ToneTTS(), BuzzTTS()]), teacher=ScriptedContinuer())


# --- the engine mix ---------------------------------------------------------------------------

class PlainTeacher:
    """Distinct speakable requests from each group's seed; short answers."""

    name = "plain"
    WORDS = ("river", "garden", "winter", "market", "violin", "planet", "harbor", "forest",
             "castle", "pepper", "ladder", "candle", "silver", "meadow", "rocket", "tunnel")

    def user_turns(self, groups, group_size, *, max_new_tokens, temperature, top_p, system):
        return [[Generation("Tell me about " + " ".join(random.Random(seed * 100 + g).sample(
            self.WORDS, 6)) + " please.", True) for g in range(group_size)]
            for _, seed in groups]

    def respond(self, user_messages, seeds, *, max_new_tokens, temperature):
        return [Generation("A short answer.", True) for _ in user_messages]


def mixed_run(out, seed=0, **overrides):
    config = SynthConfig(task="instruct", num=16, out=str(out), seed=seed, batch_size=16,
                         progress=False, tts="espeak,piper", **overrides)
    run_synth(config, teacher=PlainTeacher(), tts=EngineMix([ToneTTS(), BuzzTTS()]))
    return read_manifest(out)


def test_engine_mix_draws_an_engine_per_row_reproducibly(tmp_path):
    rows = mixed_run(tmp_path / "a")
    engines = Counter(row["voice"]["engine"] for row in rows)
    assert set(engines) == {"tone", "buzz"} and min(engines.values()) >= 3
    for row in rows:
        voices = {"tone": {"a+1", "a+2", "b+1", "b+2"}, "buzz": {"c+1", "c+2"}}
        assert row["voice"]["voice"] in voices[row["voice"]["engine"]]
        assert row["tts"] == {"tone": "tone 1", "buzz": "buzz 2"}[row["voice"]["engine"]]
    again = mixed_run(tmp_path / "b")
    assert [(r["id"], r["voice"]) for r in again] == [(r["id"], r["voice"]) for r in rows]
    other = mixed_run(tmp_path / "c", seed=1)
    assert [r["voice"]["engine"] for r in other] != [r["voice"]["engine"] for r in rows]


def test_heldout_voices_in_a_mix(tmp_path):
    # Only the first engine's voices named: held-out rows are all that engine's, and the
    # second engine's rows all train.
    rows = mixed_run(tmp_path / "a", heldout_fraction=0.4, heldout_voices=("b",))
    heldout = [r for r in rows if r["split"] == "heldout"]
    assert heldout and {r["voice"]["voice"] for r in heldout} <= {"b+1", "b+2"}
    assert {r["voice"]["engine"] for r in rows if r["split"] == "train"} == {"tone", "buzz"}
    # Naming every voice of the second engine holds out a whole engine: training never uses it.
    rows = mixed_run(tmp_path / "b", heldout_fraction=0.4, heldout_voices=("b", "c"))
    assert {r["voice"]["engine"] for r in rows if r["split"] == "train"} == {"tone"}
    assert "buzz" in {r["voice"]["engine"] for r in rows if r["split"] == "heldout"}


@pytest.mark.parametrize("value, message", [
    ("espeak,banana", r"'banana' is not an engine"),
    ("espeak,", r"'espeak,' has an empty item"),
    (",piper", r"has an empty item"),
    ("espeak, ,piper", r"has an empty item"),
    ("espeak,espeak", r"names espeak twice"),
    ("festival", r"'espeak', 'piper' or 'flite', or a comma list"),
])
def test_bad_tts_values_are_refused_naming_the_flag(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_engines(value)
    from rba_core.commands import synth as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "--task", "qa", "--num", "1", "--out",
                              str(tmp_path / "q"), "--tts", value, "--no-progress"])
    with pytest.raises(ConfigError, match="--tts must be"):
        args.handler(args)
    assert not (tmp_path / "q").exists()


def test_engine_order_does_not_matter():
    assert parse_engines(" piper , espeak") == ("espeak", "piper")
    config = SynthConfig(task="qa", num=1, out="x", tts="piper,espeak")
    config.validate()
    assert config.fixed()["tts"] == "espeak,piper"
    config = SynthConfig(task="qa", num=1, out="x", tts="espeak")
    config.validate()
    assert config.fixed()["tts"] == "espeak"


@pytest.mark.slow
def test_real_espeak_and_piper_in_one_folder(tmp_path):
    # `make install` installs espeak-ng and the piper extra, so neither is skipped.
    assert shutil.which("espeak-ng"), "espeak-ng is missing: apt-get install espeak-ng"
    backend = make_backend("espeak,piper")
    assert isinstance(backend, EngineMix) and "en_US-joe-medium" in backend.voices()
    # Seed 2's first six rows hold both engines (the draw is seeded, so this is fixed).
    config = SynthConfig(task="instruct", num=6, out=str(tmp_path / "mix"), seed=2,
                         batch_size=8, progress=False, tts="espeak,piper")
    run_synth(config, teacher=PlainTeacher(), tts=backend)
    rows = read_manifest(tmp_path / "mix")
    engines = {row["voice"]["engine"] for row in rows}
    assert engines == {"espeak", "piper"}
    for row in rows:
        prefix = {"espeak": "espeak-ng ", "piper": "piper-tts"}[row["voice"]["engine"]]
        assert row["tts"].startswith(prefix) and 0.6 < row["duration"] < 15
