"""The flite engine (--tts flite): the engine issue #13 holds out of training, so rba eval hears
speech from an engine the student never heard. The real flite speaks every voice at the drawn
speed and pitch; fake flite programs stand in for an install that lacks voices or fails."""
from __future__ import annotations

import random
import re
import shutil
import stat

import numpy as np
import pytest

from rba_core.errors import ConfigError
from rba_core.synth import split_voices
from rba_core.synth import tts as tts_module
from rba_core.synth.tts import (
    ENGINES,
    FLITE_PITCH,
    FLITE_VOICES,
    EngineMix,
    FliteBackend,
    SynthesisFailed,
    Voice,
    make_backend,
    parse_engines,
    postprocess,
    row_tts,
)

SENTENCE = "Could you tell me about the history of the river and the town beside it?"


def median_f0(wave: np.ndarray, rate: int = 16000) -> float:
    """Median F0 (Hz) of the loud frames, from the autocorrelation peak in 70-400 Hz."""
    frame, hop = int(0.04 * rate), int(0.01 * rate)
    low, high = rate // 400, rate // 70
    starts = range(0, len(wave) - frame, hop)
    energy = np.array([np.sqrt(np.mean(wave[i:i + frame] ** 2)) for i in starts])
    found = []
    for loud, start in zip(energy >= 0.3 * energy.max(), starts):
        if not loud:
            continue
        x = wave[start:start + frame] - wave[start:start + frame].mean()
        corr = np.correlate(x, x, "full")[frame - 1:]
        lag = low + int(np.argmax(corr[low:high]))
        if corr[lag] > 0.5 * corr[0]:
            found.append(rate / lag)
    return float(np.median(found))


def spoken(backend: FliteBackend, text: str, voice: str, *, stretch: float = 1.0,
           pitch: float = 0.0) -> np.ndarray:
    return postprocess(*backend.synthesize(
        text, Voice("flite", voice, round(1 / stretch, 4), pitch, {"duration_stretch": stretch})))


def fake_flite(tmp_path, script: str) -> str:
    """A stand-in flite program: a shell script with ``script`` as its body."""
    path = tmp_path / f"flite-{len(list(tmp_path.glob('flite-*')))}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


# --- the real flite ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flite():
    # `make install` installs flite, so its absence is a set-up failure, not a skip.
    assert shutil.which("flite"), "flite is missing: apt-get install flite"
    return FliteBackend()


@pytest.mark.slow
def test_every_voice_speaks_a_clip_at_its_drawn_pitch(flite):
    assert flite.voices() == list(FLITE_VOICES)  # Debian's flite 2.2 has all five
    assert "awb_time" not in flite.voices()
    assert re.fullmatch(r"flite \d+\.\d+", flite.identifier()), flite.identifier()
    lead = int(tts_module.LEAD_IN_SECONDS * 16000)
    for name in FLITE_VOICES:
        wave, rate = flite.synthesize(SENTENCE, Voice("flite", name, 1.0, 0.0,
                                                      {"duration_stretch": 1.0}))
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert rate == (8000 if name == "kal" else 16000)
        out = postprocess(wave, rate)
        # 15 words: about 3.5 s at flite's own speed.
        assert 2.5 * 16000 < len(out) - lead < 5.5 * 16000, name
        assert not out[:lead].any()
        rms_db = 20 * np.log10(np.sqrt(np.mean(out[lead:] ** 2)))
        assert rms_db > -35, (name, rms_db)
        pitches = FLITE_PITCH[name]
        if pitches is None:
            continue
        # The drawn mean F0 is the one spoken: the range's two ends are heard within 8%.
        for target in pitches:
            heard = median_f0(spoken(flite, SENTENCE, name, pitch=float(target)))
            assert abs(heard / target - 1) < 0.08, (name, target, heard)


@pytest.mark.slow
def test_duration_stretch_sets_the_speed(flite):
    fast = spoken(flite, SENTENCE, "slt", stretch=0.85)
    slow = spoken(flite, SENTENCE, "slt", stretch=1.15)
    lead = int(tts_module.LEAD_IN_SECONDS * 16000)
    assert (len(fast) - lead) / (len(slow) - lead) == pytest.approx(0.85 / 1.15, rel=0.06)


@pytest.mark.slow
def test_text_starting_with_a_dash_is_spoken_not_taken_as_an_option(flite):
    # On flite's command line "--help" alone would print the usage and "-lv" list the voices
    # (and a text without a space would be taken for a file name).
    for text in ("-v is not an option here", "--help", "-lv"):
        dashed = spoken(flite, text, "slt")
        plain = spoken(flite, text.lstrip("-"), "slt")
        # The same words: flite reads the leading dash as punctuation, not as a flag.
        lead = int(tts_module.LEAD_IN_SECONDS * 16000)
        assert len(dashed) > lead + 0.3 * 16000, text
        assert abs(len(dashed) - len(plain)) < 0.2 * 16000, text


@pytest.mark.slow
def test_flite_is_reproducible_and_refuses_a_voice_it_lacks(flite):
    first = spoken(flite, SENTENCE, "awb", stretch=0.9, pitch=110.0)
    assert np.array_equal(first, spoken(flite, SENTENCE, "awb", stretch=0.9, pitch=110.0))
    # flite itself would speak its default voice for an unknown name, exit status 0.
    with pytest.raises(SynthesisFailed, match="'awb_time' is not available"):
        spoken(flite, SENTENCE, "awb_time")


def test_the_draw_is_seeded_and_stays_in_range(tmp_path):
    backend = FliteBackend(fake_flite(tmp_path, "echo 'Voices available: kal awb_time "
                                                "kal16 awb rms slt'\n"))
    voices = backend.voices()
    draws = [backend.draw(random.Random(seed), voices) for seed in range(200)]
    assert draws[:20] == [backend.draw(random.Random(seed), voices) for seed in range(20)]
    assert len({(d.voice, d.speed, d.pitch) for d in draws}) > 150
    assert {d.voice for d in draws} == set(FLITE_VOICES)
    for voice in draws:
        stretch = voice.extra["duration_stretch"]
        assert voice.engine == "flite" and 0.85 <= stretch <= 1.15
        assert voice.speed == round(1 / stretch, 4)
        assert voice.to_dict()["duration_stretch"] == stretch
        pitches = FLITE_PITCH[voice.voice]
        if pitches is None:
            assert voice.pitch == 0.0
        else:
            assert pitches[0] <= voice.pitch <= pitches[1] and voice.pitch == int(voice.pitch)
    slt = [d.pitch for d in draws if d.voice == "slt"]
    assert min(slt) >= 150 and max(slt) - min(slt) > 20
    # Only the voices it is given.
    assert {backend.draw(random.Random(s), ["rms"]).voice for s in range(10)} == {"rms"}


# --- engines, mixes and broken installs -----------------------------------------------------

def test_flite_is_the_third_engine():
    assert ENGINES == ("espeak", "piper", "flite")
    assert parse_engines("flite,espeak") == ("espeak", "flite")
    assert parse_engines("flite , piper,espeak") == ENGINES
    with pytest.raises(ConfigError, match="'espeak', 'piper' or 'flite'"):
        parse_engines("festival")


@pytest.mark.slow
def test_a_mix_of_espeak_and_flite_draws_and_speaks_both(flite):
    assert shutil.which("espeak-ng"), "espeak-ng is missing: apt-get install espeak-ng"
    mix = make_backend("flite,espeak")
    assert isinstance(mix, EngineMix) and list(mix.engines) == ["espeak", "flite"]
    assert isinstance(mix.engines["flite"], FliteBackend)
    assert set(mix.voices_by_engine()["flite"]) == set(FLITE_VOICES)
    draws = [mix.draw(random.Random(seed), mix.voices()) for seed in range(40)]
    assert {d.engine for d in draws} == {"espeak", "flite"}
    for engine in ("espeak", "flite"):
        voice = next(d for d in draws if d.engine == engine)
        assert voice.voice in mix.voices_by_engine()[engine]
        wave = postprocess(*mix.synthesize("What is the tallest mountain in Europe?", voice))
        assert len(wave) > int((tts_module.LEAD_IN_SECONDS + 0.8) * 16000)
        assert row_tts(mix, voice).startswith({"espeak": "espeak-ng ", "flite": "flite "}[engine])
    # --heldout-voices kal,kal16,awb,rms,slt: the held-out rows are all flite's, and training
    # never hears it.
    train, heldout = split_voices(mix.voices(), list(FLITE_VOICES))
    assert heldout == list(FLITE_VOICES)
    assert {mix.draw(random.Random(s), train).engine for s in range(20)} == {"espeak"}
    assert {mix.draw(random.Random(s), heldout).engine for s in range(20)} == {"flite"}


def test_a_missing_flite_names_what_to_install(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="apt-get install flite"):
        FliteBackend(str(tmp_path / "no-such-flite"))
    monkeypatch.setattr(tts_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"--tts flite: .*apt-get install flite.*brew install"):
        make_backend("flite")


def test_a_flite_without_our_voices(tmp_path):
    lacking = FliteBackend(fake_flite(tmp_path, "echo 'Voices available: awb_time slt'\n"))
    assert lacking.voices() == ["slt"]
    none = FliteBackend(fake_flite(tmp_path, "echo 'Voices available: awb_time'\n"))
    with pytest.raises(ConfigError, match="lists none of the voices.*apt-get install flite"):
        none.voices()


def test_flite_failures_are_one_failed_sample(tmp_path):
    voices = "if [ \"$1\" = -lv ]; then echo 'Voices available: kal'; exit 0; fi\n"
    crashing = FliteBackend(fake_flite(tmp_path, voices + "echo 'bad feature' >&2; exit 3\n"))
    voice = crashing.draw(random.Random(0), crashing.voices())
    with pytest.raises(SynthesisFailed, match="flite exited with 3: bad feature"):
        crashing.synthesize("Hello there.", voice)
    # flite's own behaviour for an unreadable text file: a message, exit status 0, no WAV.
    silent = FliteBackend(fake_flite(tmp_path, voices + "echo 'failed to open file' >&2\n"))
    with pytest.raises(SynthesisFailed, match="wrote no audio: failed to open file"):
        silent.synthesize("Hello there.", voice)
    # A WAV that is not one: the argument after -o gets garbage.
    garbage = FliteBackend(fake_flite(tmp_path, voices + (
        "while [ $# -gt 0 ]; do if [ \"$1\" = -o ]; then echo junk > \"$2\"; fi; shift; done\n")))
    with pytest.raises(SynthesisFailed, match="unreadable audio"):
        garbage.synthesize("Hello there.", voice)
    slow = FliteBackend(fake_flite(tmp_path, voices + "sleep 5\n"), timeout_s=0.5)
    with pytest.raises(SynthesisFailed, match="timed out"):
        slow.synthesize("Hello there.", voice)
