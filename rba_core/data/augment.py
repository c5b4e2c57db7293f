"""Speech augmentation for training: the spoken clips made as varied as users' recordings.

Synthesized speech is clean, level and studio-flat; users speak faster or slower, higher or
lower, louder or softer, in rooms, over noise and down phone lines. Each training clip gets,
each with its own probability, in this order (voice, room, surroundings, channel, level):

- ``speed``: time stretch without a pitch change (rate > 1 is faster);
- ``pitch``: a pitch shift in semitones, length unchanged;
- ``reverb``: a room, as a synthetic impulse response (below);
- ``noise``: background noise at a signal-to-noise ratio, coloured from white (0 dB/octave)
  through pink (-3) to brown (-6);
- ``band_limit``: a band-pass filter as a phone line is (about 300-3400 Hz);
- ``gain``: a level change in dB.

The DSP is audiomentations' (``pip install -e '.[augment]'``; imported only when augmentation
is on). No noise or impulse-response recordings ship with rba: the noise is generated
(audiomentations' ``AddColorNoise``) and the room is an exponentially decaying Gaussian-noise
impulse response with an RT60 drawn from its range, its tail as loud as the direct path,
convolved with SciPy (audiomentations' ``ApplyImpulseResponse`` reads IR files only). Real
noise and measured rooms would be closer to users' audio.

Every draw (which transforms fire, their settings, the noise and the room) comes from one seed
derived from (run seed, epoch, row id): the same clip gets bit-identical audio on every rank,
after a resume and on a rerun, and new audio each epoch. Only training applies it: the tasks
hand an :class:`Augmenter` to their train batches, and nothing on the evaluation side has one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import ClassVar

import numpy as np

from rba_core.data.audio import MIN_SAMPLES, SAMPLE_RATE
from rba_core.errors import ConfigError
from rba_core.seeding import stable_seed
from rba_core.train.config import check_finite, invalid

INSTALL_HINT = "pip install -e '.[augment]' (that is: pip install 'audiomentations>=0.43,<0.44')"
# Butterworth roll-off of the phone-line band-pass, dB/octave (a multiple of 6).
BAND_ROLLOFF_DB = 24


@dataclass
class Transform:
    """One transform: ``p`` is the chance a clip gets it; each range field is ``[low, high]``,
    drawn uniformly. ``RANGES`` gives each range field's bounds and meaning."""

    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {}
    p: float = 0.0

    def validate(self, prefix: str) -> None:
        check_finite(f"{prefix}.p", self.p, 0.0, 1.0,
                     allowed="a probability in [0, 1] (0 = never, 1 = every clip)")
        for name, (low, high, meaning) in self.RANGES.items():
            pair = getattr(self, name)
            # A bound of 0 (Hz, seconds) is open: a band edge at 0 Hz or a room of RT60 0 is
            # no filter / no room.
            opening = "(" if low == 0 else "["
            # A band edge at the Nyquist frequency is open too: the filter design refuses it
            # mid-run, so it must fail here.
            nyquist = name.endswith("_hz") and high == SAMPLE_RATE / 2
            closing = ")" if nyquist else "]"
            allowed = (f"[low, high] with low <= high, each in {opening}{low:g}, {high:g}"
                       f"{closing} ({meaning})")
            for end in pair:
                check_finite(f"{prefix}.{name}", end, low, high, low_open=low == 0,
                             high_open=nyquist, allowed=allowed)
            if pair[0] > pair[1]:
                invalid(f"{prefix}.{name}", allowed, list(pair))


@dataclass
class SpeedConfig(Transform):
    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "rate": (0.5, 2.0, "time-stretch rate; 1 = unchanged, > 1 = faster")}
    p: float = 0.5
    rate: tuple[float, float] = (0.9, 1.1)


@dataclass
class PitchConfig(Transform):
    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "semitones": (-12.0, 12.0, "pitch shift in semitones")}
    p: float = 0.3
    semitones: tuple[float, float] = (-2.0, 2.0)


@dataclass
class GainConfig(Transform):
    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "db": (-40.0, 40.0, "level change in dB")}
    p: float = 0.5
    db: tuple[float, float] = (-6.0, 6.0)


@dataclass
class NoiseConfig(Transform):
    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "snr_db": (-10.0, 80.0, "signal-to-noise ratio in dB; lower = noisier"),
        "f_decay": (-12.0, 12.0, "noise colour in dB/octave: 0 white, -3 pink, -6 brown")}
    p: float = 0.3
    snr_db: tuple[float, float] = (10.0, 30.0)
    f_decay: tuple[float, float] = (-6.0, 0.0)


@dataclass
class ReverbConfig(Transform):
    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "rt60_s": (0.0, 3.0, "seconds the room takes to decay by 60 dB")}
    p: float = 0.3
    rt60_s: tuple[float, float] = (0.2, 0.8)


@dataclass
class BandLimitConfig(Transform):
    RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
        "low_hz": (0.0, SAMPLE_RATE / 2, "the band's lower edge in Hz"),
        "high_hz": (0.0, SAMPLE_RATE / 2, "the band's upper edge in Hz")}
    p: float = 0.2
    low_hz: tuple[float, float] = (250.0, 350.0)
    high_hz: tuple[float, float] = (3200.0, 3600.0)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.low_hz[1] >= self.high_hz[0]:
            invalid(f"{prefix}.low_hz / {prefix}.high_hz",
                    f"a band whose every low edge is below every high edge (the highest "
                    f"low_hz, {self.low_hz[1]:g}, must be < the lowest high_hz, "
                    f"{self.high_hz[0]:g})", [list(self.low_hz), list(self.high_hz)])


@dataclass
class AugmentConfig:
    """The ``data.augment`` section: off unless ``enabled``; then each transform fires with
    its own ``p`` (set one to 0 to leave it out). The defaults are a moderate mix for speech."""

    enabled: bool = False
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    pitch: PitchConfig = field(default_factory=PitchConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    band_limit: BandLimitConfig = field(default_factory=BandLimitConfig)
    gain: GainConfig = field(default_factory=GainConfig)

    def transforms(self) -> list[tuple[str, Transform]]:
        """``(name, settings)`` in the order they are applied."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "enabled"]

    def validate(self, prefix: str = "data.augment") -> None:
        # Checked even when off, so that switching it on later cannot meet a bad value.
        for name, transform in self.transforms():
            transform.validate(f"{prefix}.{name}")

    def summary(self) -> str:
        """What fires how often, for the start-of-run line."""
        on = [f"{name} p={t.p:g}" for name, t in self.transforms() if t.p > 0]
        return ", ".join(on) or "every transform at p=0"


@dataclass
class AugmentDraw:
    """One clip's draw: the transforms that fire with their settings, and the seed of the
    noise and room they generate."""

    transforms: dict[str, dict[str, float]]
    seed: int


def require_audiomentations() -> ModuleType:
    """audiomentations, or a ConfigError that says how to install it."""
    if importlib.util.find_spec("audiomentations") is None:
        raise ConfigError("data.augment.enabled=true needs the Python package audiomentations, "
                          f"which is not installed; {INSTALL_HINT}")
    return importlib.import_module("audiomentations")


@contextlib.contextmanager
def _global_rngs(seed: int) -> Iterator[None]:
    """audiomentations draws from Python's and NumPy's global generators (its own parameter
    draws, the noise samples): seed them for one clip, then put the trainer's streams back, so
    a clip's audio depends on its seed alone and the checkpointed RNG state does not move."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def room_impulse_response(rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: Gaussian noise under an envelope falling 60 dB in ``rt60_s``, scaled
    to the energy of the direct path in front of it, the whole of unit energy (so the level of
    the speech stays about the same)."""
    length = max(2, int(rt60_s * SAMPLE_RATE))
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-3.0 * np.log(10.0) * t / rt60_s)
    tail /= np.sqrt(np.sum(tail ** 2))
    response = np.concatenate([[1.0], tail])
    return (response / np.sqrt(2.0)).astype(np.float32)


class Augmenter:
    """Applies an :class:`AugmentConfig` to 16 kHz mono float32 clips, seeded per clip.

    ``augmenter(wave, seed=, epoch=, key=)`` gives the clip's augmented audio (``key``: the
    row's id). A clip is never made longer than ``max_seconds`` (a slow-down is capped to fit)
    nor shorter than one feature frame; a peak above full scale is scaled back to 1, as a
    recorder's limiter would, rather than clipped. A draw that fires nothing returns the clip
    unchanged."""

    def __init__(self, config: AugmentConfig, *, max_seconds: float = 30.0) -> None:
        config.validate()
        self.config = config
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        self.library = require_audiomentations()

    def draw(self, seed: int, epoch: int, key: str) -> AugmentDraw:
        """The clip's draw. Every range is drawn whether or not its transform fires, so one
        transform's ``p`` never changes another's settings."""
        rng = np.random.default_rng(stable_seed("augment", seed, epoch, key))
        fired: dict[str, dict[str, float]] = {}
        for name, transform in self.config.transforms():
            fires = rng.random() < transform.p
            values = {field_name: float(rng.uniform(*getattr(transform, field_name)))
                      for field_name in transform.RANGES}
            if fires:
                fired[name] = values
        return AugmentDraw(fired, int(rng.integers(2 ** 32)))

    def __call__(self, wave: np.ndarray, *, seed: int, epoch: int, key: str) -> np.ndarray:
        return self.apply(wave, self.draw(seed, epoch, key))

    def for_epoch(self, seed: int, epoch: int) -> Callable[[np.ndarray, str], np.ndarray]:
        """``(wave, row id) -> wave`` for one epoch: what a dataset's ``batch`` takes."""
        return functools.partial(_apply_for, self, seed, epoch)

    def apply(self, wave: np.ndarray, draw: AugmentDraw) -> np.ndarray:
        """``wave`` with ``draw``'s transforms, in the config's order."""
        if not draw.transforms:
            return wave
        from scipy.signal import fftconvolve

        lib, fired = self.library, draw.transforms
        x = np.ascontiguousarray(wave, dtype=np.float32)
        # Each library transform is built with the drawn value as both ends of its range and
        # p=1: the draw above decides, the library only does the signal processing.
        with _global_rngs(draw.seed):
            if "speed" in fired:
                rate = max(fired["speed"]["rate"], x.shape[0] / self.max_samples)
                x = lib.TimeStretch(min_rate=rate, max_rate=rate, leave_length_unchanged=False,
                                    p=1.0)(x, SAMPLE_RATE)
            if "pitch" in fired:
                shift = fired["pitch"]["semitones"]
                x = lib.PitchShift(min_semitones=shift, max_semitones=shift, p=1.0)(x, SAMPLE_RATE)
            if "reverb" in fired:
                response = room_impulse_response(fired["reverb"]["rt60_s"],
                                                 np.random.default_rng(draw.seed))
                x = fftconvolve(x, response)[: x.shape[0]].astype(np.float32)
            if "noise" in fired:
                snr, decay = fired["noise"]["snr_db"], fired["noise"]["f_decay"]
                x = lib.AddColorNoise(min_snr_db=snr, max_snr_db=snr, min_f_decay=decay,
                                      max_f_decay=decay, p=1.0)(x, SAMPLE_RATE)
            if "band_limit" in fired:
                low, high = fired["band_limit"]["low_hz"], fired["band_limit"]["high_hz"]
                centre, width = (low + high) / 2, high - low
                x = lib.BandPassFilter(min_center_freq=centre, max_center_freq=centre,
                                       min_bandwidth_fraction=width / centre,
                                       max_bandwidth_fraction=width / centre,
                                       min_rolloff=BAND_ROLLOFF_DB, max_rolloff=BAND_ROLLOFF_DB,
                                       p=1.0)(x, SAMPLE_RATE)
            if "gain" in fired:
                db = fired["gain"]["db"]
                x = lib.Gain(min_gain_db=db, max_gain_db=db, p=1.0)(x, SAMPLE_RATE)
        x = x[: self.max_samples]
        if x.shape[0] < MIN_SAMPLES:
            x = np.pad(x, (0, MIN_SAMPLES - x.shape[0]))
        peak = float(np.max(np.abs(x)))
        if peak > 1.0:
            x = x / peak
        return np.ascontiguousarray(x, dtype=np.float32)


def _apply_for(augmenter: Augmenter, seed: int, epoch: int, wave: np.ndarray,
               key: str) -> np.ndarray:
    return augmenter(wave, seed=seed, epoch=epoch, key=key)


def build_augmenter(config: AugmentConfig, *, max_seconds: float = 30.0) -> Augmenter | None:
    """The train clips' augmenter, or None when ``config`` is off."""
    return Augmenter(config, max_seconds=max_seconds) if config.enabled else None
