"""rba synth on the real default teacher (SmolLM2-135M-Instruct) and espeak-ng: a small run of
every task makes a valid dataset, and Whisper tiny.en hears the instructions in the audio."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile
import torch

from rba_core.weights.prepare import default_model_dir
from rba_core.synth import (
    RolloutTeacher,
    SynthConfig,
    make_backend,
    postprocess,
    read_manifest,
    run_synth,
    unspeakable_reason,
    word_error_rate,
)
from rba_core.synth.tts import Voice

# Every test here runs the real teacher, Whisper and TTS engines.
pytestmark = pytest.mark.slow

NUM = 8
TASKS = ("instruct", "qa", "translate")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # `make install` installs espeak-ng, so its absence is a set-up failure, not a skip.
    assert shutil.which("espeak-ng"), "espeak-ng is missing: apt-get install espeak-ng"
    folder = default_model_dir("smollm2-135m-instruct")
    assert (folder / "config.json").is_file(), "run `rba prepare` first"
    teacher = RolloutTeacher.load(folder)
    backend = make_backend("espeak")
    out = tmp_path_factory.mktemp("synth") / "data"
    summaries = {}
    # The sampled instructions depend on float rounding, which depends on the thread count:
    # one thread makes this dataset (and so its word error rate) independent of the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for task in TASKS:
            # Short caps keep the run small; a cut answer is kept and flagged, as in real runs.
            config = SynthConfig(task=task, num=NUM, out=str(out), seed=3, batch_size=16,
                                 max_instruction_tokens=40, max_response_tokens=24,
                                 heldout_fraction=0.25, heldout_voices=("en-us-nyc",),
                                 progress=False)
            summaries[task] = run_synth(config, teacher=teacher, tts=backend)
    finally:
        torch.set_num_threads(threads)
    return out, summaries


def test_small_real_run_makes_a_valid_dataset(dataset):
    out, summaries = dataset
    rows = read_manifest(out)
    assert sorted(r["task"] for r in rows) == sorted(TASKS * NUM)
    assert len({r["id"] for r in rows}) == len(rows)
    prompts = {"instruct": "", "qa": "Answer the question in the audio briefly.",
               "translate": "Translate the audio into French."}
    for row in rows:
        assert row["prompt"] == prompts[row["task"]]
        assert row["instruction"].strip() and row["response"].strip()
        assert unspeakable_reason(row["instruction"]) is None
        assert row["teacher"] == "smollm2-135m-instruct" and row["tts"].startswith("espeak-ng")
        audio, rate = soundfile.read(out / row["audio"], dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        assert row["duration"] == pytest.approx(len(audio) / 16000, abs=1e-3)
        assert 0.3 < row["duration"] <= 30
        if row["split"] == "heldout":
            assert row["voice"]["voice"].startswith("en-us-nyc+")
        else:
            assert not row["voice"]["voice"].startswith("en-us-nyc+")
    assert all(r["instruction"].endswith("?") for r in rows if r["task"] == "qa")
    summary = summaries["translate"]
    assert summary["total"]["rows"] == len(rows)
    for task in TASKS:
        filters = summary["tasks"][task]["filters"]
        assert filters["accepted"] == NUM
        rejected = sum(v for k, v in filters.items()
                       if k not in ("candidates", "accepted", "surplus_unused",
                                    "response_truncated"))
        assert filters["candidates"] == NUM + rejected


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from rba_core.data.tokenizer import Tokenizer

    folder = default_model_dir("whisper-tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, WhisperFeatureExtractor.from_pretrained(folder), Tokenizer.from_pretrained(
        folder)


def transcribe(whisper, clips: list[np.ndarray]) -> list[str]:
    """Greedy Whisper decoding of a batch of 16 kHz clips."""
    model, extractor, tokenizer = whisper
    features = extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=96)
    return [tokenizer.decode(row.tolist()).strip() for row in ids]


def test_whisper_hears_the_instructions(dataset, whisper):
    out, _ = dataset
    rows = read_manifest(out)
    chosen = [r for task in TASKS for r in [x for x in rows if x["task"] == task][:4]]
    clips = [soundfile.read(out / r["audio"], dtype="float32")[0] for r in chosen]
    heard = transcribe(whisper, clips)
    errors = [word_error_rate(r["instruction"], text) for r, text in zip(chosen, heard)]
    words = [len(r["spoken_text"].split()) for r in chosen]
    # Word-weighted WER over the clips, as WER over a corpus is reported.
    total = sum(e * w for e, w in zip(errors, words)) / sum(words)
    detail = [(r["voice"]["voice"], r["instruction"], text) for r, text in zip(chosen, heard)]
    assert total <= 0.20, detail


def test_piper_round_trip(whisper):
    # `make install` installs the optional piper extra, so this always runs in CI.
    backend = make_backend("piper")
    sentences = ["Could you tell me how to bake a simple loaf of bread?",
                 "What is the tallest mountain in Europe?"]
    clips = []
    for i, text in enumerate(sentences):
        voice = Voice("piper", backend.voices()[0], 1.0, 1.0,
                      {"length_scale": 1.0, "noise_scale": 0.6, "noise_w": 0.8})
        clips.append(postprocess(*backend.synthesize(text, voice)))
    heard = transcribe(whisper, clips)
    for text, got in zip(sentences, heard):
        assert word_error_rate(text, got) <= 0.2, (text, got)
