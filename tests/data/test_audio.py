"""Audio front end: file reading and resampling, and log-mel parity with transformers'
WhisperFeatureExtractor (an independent reference)."""
import struct
import time
import tracemalloc

import numpy as np
import pytest
import soundfile
import torch

from helpers import write_long_wav
from rba_core.data.audio import (HOP_LENGTH, N_FRAMES_30S, batch_features, load_audio,
                                 load_speech, log_mel_spectrogram, mel_filterbank)
from rba_core.errors import AudioError, AudioTooLong


def speech_like(rng: np.random.Generator, n_samples: int, rate: int = 16000) -> np.ndarray:
    """A voiced-speech stand-in: a wandering pitch with harmonics, syllable-rate loudness,
    a random formant-ish tone and breath noise."""
    t = np.arange(n_samples) / rate
    f0 = rng.uniform(90, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 15))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)) ** 2
    tone = 0.1 * np.sin(2 * np.pi * rng.uniform(500, 3000) * t)
    noise = rng.uniform(0.003, 0.03) * rng.standard_normal(n_samples)
    return (rng.uniform(0.05, 0.4) * (voiced * envelope + tone) + noise).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))


@pytest.fixture(scope="module")
def extractors():
    from transformers import WhisperFeatureExtractor

    return {n: WhisperFeatureExtractor(feature_size=n) for n in (80, 128)}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_matches_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    reference = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels,
                                min_frequency=0.0, max_frequency=8000.0, sampling_rate=16000,
                                norm="slaney", mel_scale="slaney")
    ours = mel_filterbank(n_mels)
    assert ours.shape == (n_mels, 201)
    np.testing.assert_allclose(ours, reference.T, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels, rng, extractors):
    extractor = extractors[n_mels]
    for _ in range(2):
        wave = speech_like(rng, int(rng.integers(16000, 16000 * 6)))
        padded = extractor(wave, sampling_rate=16000, return_tensors="np")["input_features"][0]
        ours_padded = log_mel_spectrogram(wave, n_mels=n_mels, pad_to_30s=True).numpy()
        assert ours_padded.shape == (n_mels, N_FRAMES_30S)
        assert np.abs(ours_padded - padded).max() <= 1e-4

        unpadded = extractor(wave, sampling_rate=16000, padding="longest",
                             return_tensors="np")["input_features"][0]
        ours = log_mel_spectrogram(torch.from_numpy(wave), n_mels=n_mels).numpy()
        # Whisper's extractor drops the centred STFT's last frame: n // hop frames remain.
        assert ours.shape == (n_mels, wave.size // HOP_LENGTH) == unpadded.shape
        assert np.abs(ours - unpadded).max() <= 1e-4


def test_long_audio_is_trimmed_to_30s_like_whisper(rng, extractors):
    wave = speech_like(rng, 16000 * 31 + 123)
    reference = extractors[80](wave, sampling_rate=16000, return_tensors="np")["input_features"][0]
    ours = log_mel_spectrogram(wave, pad_to_30s=True).numpy()
    assert ours.shape == reference.shape == (80, N_FRAMES_30S)
    assert np.abs(ours - reference).max() <= 1e-4


def test_batch_features_padded_matches_extractor_batch_and_mask(rng, extractors):
    waves = [speech_like(rng, int(n)) for n in rng.integers(3000, 16000 * 4, size=3)]
    reference = extractors[80](waves, sampling_rate=16000, return_attention_mask=True,
                               return_tensors="np")
    features, lengths = batch_features(waves, pad_to_30s=True)
    assert features.shape == (3, 80, N_FRAMES_30S)
    assert np.abs(features.numpy() - reference["input_features"]).max() <= 1e-4
    assert lengths.tolist() == reference["attention_mask"].sum(-1).tolist()


def test_batch_features_unpadded_equals_each_clip_alone(rng):
    waves = [speech_like(rng, int(n)) for n in (16000 * 2 + 77, 5000, 16000)]
    features, lengths = batch_features(waves, n_mels=128)
    assert lengths.tolist() == [w.size // HOP_LENGTH for w in waves]
    assert features.shape == (3, 128, max(lengths.tolist()))
    for row, wave, length in zip(features, waves, lengths.tolist()):
        torch.testing.assert_close(row[:, :length], log_mel_spectrogram(wave, n_mels=128),
                                   rtol=0, atol=0)
        assert not row[:, length:].any()


def test_load_audio_downmixes_and_resamples(tmp_path, rng):
    rate = 22050
    t = np.arange(int(rate * 1.5)) / rate
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    right = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)
    stereo = np.stack([left, right], axis=1).astype(np.float32)
    for suffix, subtype in ((".wav", "FLOAT"), (".flac", "PCM_24"), (".ogg", "VORBIS")):
        path = tmp_path / f"tone{suffix}"
        soundfile.write(path, stereo, rate, subtype=subtype)
        wave = load_audio(path)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(wave.size - round(t.size * 16000 / rate)) <= 1
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
        peak_hz = np.argmax(spectrum) * 16000 / wave.size
        assert abs(peak_hz - 440) < 2
        # The mono mix of 0.4 and 0.2 amplitude in-phase tones has amplitude 0.3.
        middle = wave[2000:-2000]
        assert abs(np.sqrt(2 * np.mean(middle**2)) - 0.3) < 0.01


def test_load_audio_at_target_rate_keeps_samples(tmp_path, rng):
    samples = rng.uniform(-0.5, 0.5, size=(8000, 2)).astype(np.float32)
    path = tmp_path / "clip.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), samples.mean(axis=1), rtol=0, atol=1e-7)


def test_load_audio_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError, match="nowhere.wav.*does not exist"):
        load_audio(missing)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(empty)
    text = tmp_path / "notes.wav"
    text.write_bytes(b"this is plain text, not a RIFF header" * 20)
    with pytest.raises(AudioError, match="notes.wav.*cannot be read as audio.*ffmpeg"):
        load_audio(text)
    no_samples = tmp_path / "silent.wav"
    soundfile.write(no_samples, np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="silent.wav.*no samples"):
        load_audio(no_samples)
    with pytest.raises(AudioError, match="is not a file"):
        load_audio(tmp_path)


def test_a_two_hour_file_is_refused_from_its_header(tmp_path):
    long = write_long_wav(tmp_path / "lecture.wav", 2 * 3600)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(AudioTooLong, match=r"lecture.wav: 7200.0 s long; at most 30 s.*ffmpeg"):
            load_speech(long)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Decoding it would take seconds and 460 MB of float32 samples (numpy's buffers are traced).
    assert elapsed < 1.0 and peak < 4 * 2**20
    with pytest.raises(AudioTooLong, match="at most 60 s"):
        load_audio(long, max_seconds=60)
    # Without a bound it is only a long file.
    short = write_long_wav(tmp_path / "short.wav", 2.0)
    assert load_speech(short).shape == (32000,)


def test_a_wav_cut_short_is_refused_not_read_as_a_shorter_clip(tmp_path):
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, np.full(16000, 0.1, dtype=np.float32), 16000, subtype="PCM_16")
    data = whole.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: 44 + 16000])
    with pytest.raises(AudioError, match=r"cut.wav: truncated: its header declares 1.00 s of "
                                         r"audio but holds 0.50 s.*re-export"):
        load_audio(cut)
    # A streaming writer's "size unknown" placeholder is no truncation.
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(data[:40] + struct.pack("<I", 0xFFFFFFFF) + data[44:])
    assert load_audio(streamed).shape == (16000,)


def test_a_clip_too_short_for_one_frame_names_the_file(tmp_path):
    blip = tmp_path / "blip.wav"
    soundfile.write(blip, np.full(100, 0.1, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"blip.wav: only 100 samples.*at least 201") as raised:
        load_speech(blip)
    # The fix must be one a user can apply, not an API argument the CLI cannot pass.
    assert "pad_to_30s" not in str(raised.value)


def test_bad_waves_give_clear_errors():
    with pytest.raises(AudioError, match="1-D mono"):
        log_mel_spectrogram(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(AudioError, match="100 samples.*pad_to_30s"):
        log_mel_spectrogram(np.zeros(100, dtype=np.float32))
    with pytest.raises(AudioError, match="NaN"):
        log_mel_spectrogram(np.full(1000, np.nan, dtype=np.float32))
    with pytest.raises(AudioError, match=r"waves\[1\]: holds no samples"):
        batch_features([np.zeros(1000, dtype=np.float32), np.zeros(0, dtype=np.float32)])
    with pytest.raises(AudioError, match="list of 1-D"):
        batch_features(np.zeros(1000, dtype=np.float32))
    # A clip shorter than the STFT reach still featurises once padded to 30 s.
    features, lengths = batch_features([np.ones(100, dtype=np.float32)], pad_to_30s=True)
    assert features.shape == (1, 80, N_FRAMES_30S) and lengths.tolist() == [1]
