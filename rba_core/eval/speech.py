"""Benchmark prompts spoken by rba's TTS in voices training never uses, cached on disk.

Each clip is named by a hash of (engine version, voice, text), so a rerun reuses it (piper's
noise cannot be seeded: the cache is also what makes its audio repeatable), and changing the
engine, voice or text makes a new one. The voice of each prompt is drawn from a seed and the
prompt's id, so it does not depend on which other prompts are spoken.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rba_core.errors import ConfigError

# Voices the packaged default adapter's training never heard (its synthesis held out every
# en-us-nyc variant and the +f3 variant of every accent; see assets/speechlm-default/TRAINING.md).
DEFAULT_HELDOUT_VOICES = {"espeak": ("en-us-nyc", "+f3"), "piper": (), "flite": ()}
# Whisper's encoder window: longer prompts cannot be heard whole, so they are left out.
MAX_SECONDS = 30.0


@dataclass(frozen=True)
class SpokenPrompt:
    id: str
    audio: Path | None        # None: left out (too long or the engine failed)
    duration: float
    voice: dict
    reason: str = ""


def matching_voices(voices: Sequence[str], specs: Sequence[str]) -> list[str]:
    """The voices ``specs`` name, as ``rba synth --heldout-voices`` reads them: a voice
    (``en-gb+f3``), a base voice (``en-us-nyc``: all its variants) or a variant (``+f3``).
    No specs: every voice (an engine training never used is held out as a whole)."""
    if not specs:
        return list(voices)
    chosen = []
    for spec in specs:
        matched = [v for v in voices if v == spec or v.split("+")[0] == spec
                   or (spec.startswith("+") and v.endswith(spec))]
        if not matched:
            raise ConfigError(f"--voices: {spec!r} matches no voice of this engine (it has "
                              f"{', '.join(list(voices)[:6])}, ...)")
        chosen += [v for v in matched if v not in chosen]
    return chosen


def _key(identifier: str, voice: dict, text: str) -> str:
    blob = json.dumps([identifier, voice, text], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def speak(prompts: Sequence[tuple[str, str]], *, engine: str, voices: Sequence[str],
          cache_dir: Path, seed: int, progress: bool = True,
          piper_voices: Sequence[str] = ()) -> list[SpokenPrompt]:
    """``prompts`` = (id, text) pairs spoken by ``engine`` in one of the ``voices`` specs each
    (default: ``DEFAULT_HELDOUT_VOICES``), as 16 kHz FLAC under ``cache_dir``. Prompts longer
    than ``MAX_SECONDS`` or that the engine fails on come back with ``audio=None`` and why."""
    import soundfile
    from tqdm import tqdm

    from rba_core.synth.pipeline import stable_seed
    from rba_core.synth.tts import SynthesisFailed, make_backend, postprocess, write_flac

    backend = make_backend(engine, piper_voices=list(piper_voices))
    pool = matching_voices(backend.voices(), voices or DEFAULT_HELDOUT_VOICES.get(engine, ()))
    identifier = backend.identifier()
    folder = Path(cache_dir) / engine
    folder.mkdir(parents=True, exist_ok=True)
    spoken = []
    for prompt_id, text in tqdm(prompts, desc=f"speaking ({engine})", unit="prompt",
                                disable=not progress):
        voice = backend.draw(random.Random(stable_seed(seed, "eval-voice", prompt_id)), pool)
        path = folder / f"{_key(identifier, voice.to_dict(), text)}.flac"
        if not path.is_file():
            try:
                wave, rate = backend.synthesize(text, voice)
                write_flac(path, postprocess(wave, rate))
            except SynthesisFailed as error:
                spoken.append(SpokenPrompt(prompt_id, None, 0.0, voice.to_dict(),
                                           f"synthesis failed: {error}"))
                continue
        duration = float(soundfile.info(str(path)).duration)
        if duration > MAX_SECONDS:
            spoken.append(SpokenPrompt(prompt_id, None, duration, voice.to_dict(),
                                       f"longer than {MAX_SECONDS:.0f} s"))
        else:
            spoken.append(SpokenPrompt(prompt_id, path, duration, voice.to_dict()))
    return spoken
