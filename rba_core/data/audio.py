"""Audio front end: read a file, make it 16 kHz mono, and compute Whisper's log-mel features.

The features follow Whisper (and transformers' ``WhisperFeatureExtractor``): a 400-point STFT
with a periodic Hann window every 160 samples, power spectrum, a Slaney-scale mel filterbank
with Slaney area normalisation, ``log10`` clamped at 1e-10, a floor 8 below the clip's maximum,
then ``(x + 4) / 4``. The STFT is centred, which yields ``1 + n // hop`` frames; Whisper drops
the last one, so a clip of ``n`` samples has ``n // hop`` frames (30 s -> 3000).
"""
from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rba_core.errors import AudioError, AudioTooLong, ConfigError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES_30S = CHUNK_SECONDS * SAMPLE_RATE
N_FRAMES_30S = N_SAMPLES_30S // HOP_LENGTH
# The centred STFT reflects N_FFT // 2 samples at each end, so one frame needs one more.
MIN_SAMPLES = N_FFT // 2 + 1

_CONVERT_HINT = "convert it to WAV, FLAC or OGG, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`"


def load_audio(path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE,
               max_seconds: float | None = None) -> np.ndarray:
    """The file's samples as float32 mono at ``sample_rate``.

    Any format libsndfile reads works (WAV, FLAC, OGG/Vorbis, ...). Channels are averaged;
    other sample rates are resampled with soxr at high quality. A file longer than
    ``max_seconds`` raises AudioTooLong from its header alone, before any decoding (a 2-hour
    file would take seconds and gigabytes to decode). A file holding fewer samples than its
    header declares (a WAV copy or download cut short) is refused, not read as a shorter clip
    (libsndfile already refuses a cut FLAC).
    """
    import soundfile
    import soxr

    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise ConfigError(f"load_audio: sample_rate must be a positive int, got {sample_rate!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"load_audio: max_seconds must be > 0 or None, got {max_seconds!r}")
    file = Path(path)
    if not file.exists():
        raise AudioError(f"{file}: audio file does not exist; check the path")
    if not file.is_file():
        raise AudioError(f"{file}: is not a file; pass the path of an audio file")
    if file.stat().st_size == 0:
        raise AudioError(f"{file}: audio file is empty (0 bytes); re-export or re-record it")
    try:
        # soundfile raises LibsndfileError (a RuntimeError) for bytes it cannot parse.
        info = soundfile.info(str(file))
        if max_seconds is not None and info.frames / info.samplerate > max_seconds:
            raise _too_long(file, info.frames / info.samplerate, max_seconds)
        _check_wav_complete(file)
        data, file_rate = soundfile.read(str(file), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, TypeError, ValueError) as error:
        raise AudioError(f"{file}: cannot be read as audio ({error}); {_CONVERT_HINT}") from error
    if data.shape[0] == 0:
        raise AudioError(f"{file}: audio file holds no samples; re-export or re-record it")
    mono = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioError(f"{file}: audio holds NaN or infinite samples; re-export it")
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    if max_seconds is not None and mono.shape[0] > max_seconds * sample_rate:
        # A format whose header does not state its length is caught after decoding.
        raise _too_long(file, mono.shape[0] / sample_rate, max_seconds)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _too_long(file: Path, seconds: float, max_seconds: float) -> AudioTooLong:
    return AudioTooLong(f"{file}: {seconds:.1f} s long; at most {max_seconds:g} s is taken; "
                        f"cut it, e.g. `ffmpeg -i IN -t {max_seconds:g} OUT.wav`")


# A hostile file could hold millions of tiny chunks before its data; real WAVs have a handful.
_MAX_WAV_CHUNKS = 64


def _check_wav_complete(file: Path) -> None:
    """Refuse a RIFF WAVE file whose data chunk declares more bytes than the file holds.
    libsndfile reads such a file as the shorter clip it holds without a word, so its header is
    read here. Sizes of 0 and 0xFFFFFFFF are what streaming writers leave when they cannot seek
    back to fill them in: those mean "unknown", not truncated."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        offset, block_align, rate = 12, 0, 0
        for _ in range(_MAX_WAV_CHUNKS):
            handle.seek(offset)
            chunk = handle.read(8)
            if len(chunk) < 8:
                return
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                fmt = handle.read(16)
                if len(fmt) == 16:
                    rate, block_align = struct.unpack("<I", fmt[4:8])[0], struct.unpack(
                        "<H", fmt[12:14])[0]
            elif name == b"data":
                present = size - offset - 8
                if length in (0, 0xFFFFFFFF) or length <= present:
                    return
                if block_align and rate:
                    amount = (f"{length / block_align / rate:.2f} s of audio but holds "
                              f"{present / block_align / rate:.2f} s")
                else:
                    amount = f"{length} bytes of audio but holds {present}"
                raise AudioError(f"{file}: truncated: its header declares {amount} (a copy or "
                                 "download cut short?); re-export or copy it again")
            offset += 8 + length + (length & 1)


def load_speech(path: str | os.PathLike, *, max_seconds: float = CHUNK_SECONDS) -> np.ndarray:
    """A spoken clip as the SpeechLM takes it: ``load_audio`` at 16 kHz, refusing a file longer
    than ``max_seconds`` (at most Whisper's 30 s window; AudioTooLong, from its header before
    decoding) or too short to make one feature frame (AudioError); both name the file and the
    fix."""
    if not 0 < max_seconds <= CHUNK_SECONDS:
        raise ConfigError(f"load_speech: max_seconds must be in (0, {CHUNK_SECONDS}] (Whisper's "
                          f"window), got {max_seconds!r}")
    wave = load_audio(path, sample_rate=SAMPLE_RATE, max_seconds=max_seconds)
    if wave.shape[0] < MIN_SAMPLES:
        raise AudioError(f"{path}: only {wave.shape[0]} samples at {SAMPLE_RATE} Hz "
                         f"({wave.shape[0] / SAMPLE_RATE * 1000:.1f} ms); a clip needs at least "
                         f"{MIN_SAMPLES} ({MIN_SAMPLES / SAMPLE_RATE * 1000:.1f} ms) to make one "
                         "feature frame; record or export a longer one")
    return wave


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    # Slaney's scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above it, with the
    # log step chosen so that 6.4 kHz lands 27 mels above 1 kHz.
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log_step = 27.0 / math.log(6.4)
    with np.errstate(divide="ignore"):
        logarithmic = 15.0 + np.log(np.maximum(hz, 1e-300) / 1000.0) * log_step
    return np.where(hz >= 1000.0, logarithmic, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log_step = 27.0 / math.log(6.4)
    logarithmic = 1000.0 * np.exp((mel - 15.0) / log_step)
    return np.where(mel >= 15.0, logarithmic, linear)


@functools.lru_cache(maxsize=16)
def mel_filterbank(
    n_mels: int = 80,
    *,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> np.ndarray:
    """Slaney-scale triangular mel filters with Slaney area normalisation, as
    ``[n_mels, n_fft // 2 + 1]`` float32 (built in float64, like librosa's)."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_mel = np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2)
    edges_hz = _mel_to_hz_slaney(edges_mel)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: each triangle has unit area in Hz, so wide high bands are not louder.
    weights *= (2.0 / (upper - lower))
    return weights.astype(np.float32)


def _as_wave_tensor(wave: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(wave, np.ndarray):
        if not np.issubdtype(wave.dtype, np.floating) and not np.issubdtype(wave.dtype, np.integer):
            raise AudioError(f"{what}: samples must be numbers, got dtype {wave.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    elif isinstance(wave, torch.Tensor):
        if wave.is_complex() or wave.dtype == torch.bool:
            raise AudioError(f"{what}: samples must be real numbers, got dtype {wave.dtype}")
        tensor = wave.detach().to(torch.float32)
    else:
        raise AudioError(f"{what}: expected a numpy array or torch tensor of samples, got "
                         f"{type(wave).__name__}")
    if tensor.dim() != 1:
        raise AudioError(f"{what}: expected 1-D mono samples, got shape {tuple(tensor.shape)}; "
                         "downmix channels first (load_audio does)")
    if tensor.numel() == 0:
        raise AudioError(f"{what}: holds no samples")
    if not torch.isfinite(tensor).all():
        raise AudioError(f"{what}: holds NaN or infinite samples")
    return tensor


def _check_n_mels(n_mels: int) -> None:
    if not isinstance(n_mels, int) or isinstance(n_mels, bool) or n_mels <= 0:
        raise ConfigError(f"n_mels must be a positive int (80 or 128 for Whisper), got {n_mels!r}")


def log_mel_spectrogram(
    wave: np.ndarray | torch.Tensor,
    *,
    n_mels: int = 80,
    pad_to_30s: bool = False,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Whisper log-mel features ``[n_mels, frames]`` (float32) of 16 kHz mono samples.

    ``pad_to_30s=True`` trims or zero-pads the samples to 30 s first, as Whisper does, giving
    exactly 3000 frames; otherwise a clip of ``n`` samples gives ``n // 160`` frames (it needs
    more than 200 samples, since the centred STFT reflects 200 samples at each end).
    """
    _check_n_mels(n_mels)
    samples = _as_wave_tensor(wave, "log_mel_spectrogram: wave")
    if device is not None:
        samples = samples.to(device)
    if pad_to_30s:
        samples = samples[:N_SAMPLES_30S]
        samples = torch.nn.functional.pad(samples, (0, N_SAMPLES_30S - samples.numel()))
    elif samples.numel() <= N_FFT // 2:
        raise AudioError(f"log_mel_spectrogram: wave has {samples.numel()} samples; it needs more "
                         f"than {N_FFT // 2} ({(N_FFT // 2) / SAMPLE_RATE * 1000:.1f} ms), or "
                         "pass pad_to_30s=True")
    window = torch.hann_window(N_FFT, periodic=True, device=samples.device)
    spectrum = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, center=True,
                          pad_mode="reflect", return_complex=True)
    power = spectrum[:, :-1].abs() ** 2
    filters = torch.from_numpy(mel_filterbank(n_mels)).to(samples.device)
    mel = filters @ power
    log_mel = torch.clamp(mel, min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


def batch_features(
    waves: Sequence[np.ndarray | torch.Tensor],
    *,
    n_mels: int = 80,
    pad_to_30s: bool = False,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of several clips: ``(features [B, n_mels, T], frame_lengths [B])``.

    Each clip is featurised alone (its own maximum sets its floor, as Whisper does per clip),
    so batching never changes a clip's features. Without ``pad_to_30s``, ``T`` is the longest
    clip's frame count and shorter clips are zero-padded beyond their ``frame_lengths`` (the
    encoder masks those frames). With it, every clip is padded to 30 s of silence first (3000
    frames, identical to Whisper) and ``frame_lengths`` still counts only the clip's frames.
    """
    _check_n_mels(n_mels)
    if isinstance(waves, (np.ndarray, torch.Tensor)) or not isinstance(waves, Sequence):
        raise AudioError("batch_features: waves must be a list of 1-D sample arrays, got "
                         f"{type(waves).__name__}; wrap a single clip as [wave]")
    if len(waves) == 0:
        raise AudioError("batch_features: waves is an empty list; pass at least one clip")
    features = []
    lengths = []
    for index, wave in enumerate(waves):
        samples = _as_wave_tensor(wave, f"batch_features: waves[{index}]")
        features.append(log_mel_spectrogram(samples, n_mels=n_mels, pad_to_30s=pad_to_30s,
                                            device=device))
        # With padding, a frame counts when its start sample is in the clip (ceil), which is
        # the attention mask transformers' extractor returns.
        lengths.append(-(-min(samples.numel(), N_SAMPLES_30S) // HOP_LENGTH) if pad_to_30s
                       else features[-1].shape[-1])
    frames = max(item.shape[-1] for item in features)
    batch = features[0].new_zeros(len(features), n_mels, frames)
    for index, item in enumerate(features):
        batch[index, :, : item.shape[-1]] = item
    return batch, torch.tensor(lengths, dtype=torch.long, device=batch.device)
