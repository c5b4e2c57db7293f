"""``run_synth``: Magpie instructions -> filters -> teacher answers -> TTS -> dataset folder.

Determinism and resumption: candidates are numbered. Candidate ``k`` belongs to group
``k // GROUP_SIZE``; a group's samples come from one seed derived from (seed, task, group),
its row id is ``TASK-sSEED-k``, and its voice and split come from seeds derived from
(seed, task, k). A run saves the next group after each batch; a rerun starts there, skips
candidates whose id the manifest already lists, and rebuilds the duplicate index from the
manifest, so a killed run continues without repeating a row.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from typing import Any

import numpy as np

from rba_core.errors import ConfigError
from rba_core.synth.dataset import DatasetWriter
from rba_core.synth.dedupe import DedupeConfig, NearDuplicateIndex
from rba_core.synth.recipes import TaskRecipe, recipe, sentence_reason, teacher_user_message
from rba_core.synth.teacher import Generation, TeacherLike
from rba_core.synth.text import (
    normalize_for_speech,
    repetition_reason,
    unspeakable_reason,
    words_of,
)
from rba_core.synth.tts import (
    SAMPLE_RATE,
    SynthesisFailed,
    TTSBackend,
    Voice,
    make_backend,
    parse_engines,
    postprocess,
    row_tts,
)

log = logging.getLogger("rba.synth")

GROUP_SIZE = 8
# Settings that decide which rows a run makes: a rerun into the same folder must keep them.
_FIXED_FIELDS = ("seed", "tts", "system", "instruction_temperature", "instruction_top_p",
                 "max_instruction_tokens", "max_response_tokens", "response_temperature",
                 "min_words", "max_words", "near_duplicate_threshold", "heldout_fraction",
                 "heldout_voices", "target_language", "max_audio_seconds")


@dataclass
class SynthConfig:
    """One ``rba synth`` run (one task). ``None`` word bounds and response cap take the task's
    defaults; ``max_candidates`` (default ``20 * num + 64``) caps Magpie samples for this call.

    ``instruction_temperature`` is 0.8 rather than Magpie's usual 1.0: at 1.0 the 135M
    default teacher invents words and names that no listener can transcribe (Whisper tiny.en
    word error rate on the espeak clips 23% at 1.0, 18% at 0.8, 24 clips each).
    """

    task: str
    num: int
    out: str
    tts: str = "espeak"  # an engine or a comma list of them (tts.parse_engines)
    seed: int = 0
    batch_size: int = 32
    heldout_fraction: float = 0.0
    heldout_voices: tuple[str, ...] = ()
    target_language: str = "French"
    teacher: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    system: str | None = None
    instruction_temperature: float = 0.8
    instruction_top_p: float = 0.95
    max_instruction_tokens: int = 96
    max_response_tokens: int | None = None
    response_temperature: float = 0.0
    min_words: int | None = None
    max_words: int | None = None
    near_duplicate_threshold: float = 0.7
    max_candidates: int | None = None
    shard_size: int = 1000
    tts_workers: int = 2
    max_audio_seconds: float = 30.0
    piper_voices: tuple[str, ...] = ()
    progress: bool = True
    resolved: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> TaskRecipe:
        task = recipe(self.task)

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, "
                                  f"got {value!r}")

        integer("num", 1)
        integer("batch_size", 1)
        if self.batch_size % GROUP_SIZE:
            rounded = -(-self.batch_size // GROUP_SIZE) * GROUP_SIZE
            raise ConfigError(f"--batch-size must be a multiple of {GROUP_SIZE} (Magpie "
                              f"candidates come in groups of {GROUP_SIZE} per seed), got "
                              f"{self.batch_size}; use {rounded}")
        integer("max_instruction_tokens", 1)
        integer("shard_size", 1)
        integer("tts_workers", 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        for name in ("max_response_tokens", "min_words", "max_words", "max_candidates"):
            if getattr(self, name) is not None:
                integer(name, 1)
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"--heldout-fraction must be in [0, 1), got "
                              f"{self.heldout_fraction!r}")
        # read/continue take --heldout-voices alone: the voices a text source is not read in.
        if self.heldout_voices and self.heldout_fraction == 0 and self.task not in (
                "read", "continue"):
            raise ConfigError("--heldout-voices needs --heldout-fraction > 0: no row would be "
                              "held out to use them")
        if self.instruction_temperature <= 0:
            raise ConfigError("--instruction-temperature must be > 0: Magpie samples user turns "
                              f"(greedy would repeat one), got {self.instruction_temperature!r}")
        if not 0 < self.instruction_top_p <= 1:
            raise ConfigError(f"--instruction-top-p must be in (0, 1], got "
                              f"{self.instruction_top_p!r}")
        if self.response_temperature < 0:
            raise ConfigError(f"--response-temperature must be >= 0 (0 = greedy), got "
                              f"{self.response_temperature!r}")
        if not self.target_language.strip():
            raise ConfigError("--target-language must name a language, e.g. French")
        if self.max_audio_seconds <= 0:
            raise ConfigError(f"--max-audio-seconds must be > 0, got {self.max_audio_seconds!r}")
        self.resolved = {
            "tts": ",".join(parse_engines(self.tts)),
            "min_words": self.min_words or task.min_words,
            "max_words": self.max_words or task.max_words,
            "max_response_tokens": self.max_response_tokens or task.response_tokens,
        }
        if self.resolved["min_words"] > self.resolved["max_words"]:
            raise ConfigError(f"--min-words {self.resolved['min_words']} exceeds --max-words "
                              f"{self.resolved['max_words']}")
        DedupeConfig(threshold=self.near_duplicate_threshold).validate()
        return task

    def fixed(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(self.resolved)
        values["heldout_voices"] = sorted(values["heldout_voices"])
        return {name: values[name] for name in _FIXED_FIELDS}


def stable_seed(*parts: object) -> int:
    """A 62-bit seed from ``parts``, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def draw_rng(*parts: object) -> random.Random:
    """A ``random.Random`` for one draw named by ``parts``. Seeded with a string, which Python
    hashes with SHA-512: unrelated parts give unrelated streams in every process."""
    return random.Random("rba-synth:" + repr(parts))


def row_id(task: str, seed: int, candidate: int) -> str:
    return f"{task}-s{seed}-{candidate:07d}"


def split_voices(voices: list[str], heldout: tuple[str, ...] | list[str]
                 ) -> tuple[list[str], list[str]]:
    """(train voices, held-out voices). Without ``heldout`` both are every voice. A held-out
    entry names a voice exactly, a base voice (``en-us-nyc`` = all its variants) or a
    variant (``+f3`` = that variant of every base voice)."""
    if not heldout:
        return list(voices), list(voices)
    chosen: set[str] = set()
    for spec in heldout:
        matched = [v for v in voices
                   if v == spec or v.split("+")[0] == spec
                   or (spec.startswith("+") and v.endswith(spec))]
        if not matched:
            sample = ", ".join(sorted({v.split("+")[0] for v in voices})[:8])
            raise ConfigError(f"--heldout-voices: {spec!r} matches no voice of --tts; "
                              f"use a voice (e.g. {voices[0]}), a base voice ({sample}) or a "
                              "variant such as +f3")
        chosen.update(matched)
    train = [v for v in voices if v not in chosen]
    if not train:
        raise ConfigError("--heldout-voices holds out every voice of --tts, so training "
                          "would hear none; hold out fewer")
    return train, [v for v in voices if v in chosen]


def instruction_reason(gen: Generation, task: TaskRecipe, config: SynthConfig) -> str | None:
    """The first filter a Magpie sample fails (a filter-count key), or None."""
    if not gen.ended:
        return "turn_not_ended"
    text = gen.text
    count = len(words_of(text))
    if count < config.resolved["min_words"]:
        return "too_short"
    if count > config.resolved["max_words"]:
        return "too_long"
    if repetition_reason(text):
        return "repetition_loop"
    if unspeakable_reason(text):
        return "not_speakable"
    reason = sentence_reason(text, task.max_sentences)
    if reason:
        return reason
    if task.check is not None:
        return task.check(text)
    return None


def response_reason(gen: Generation) -> str | None:
    if not gen.text.strip():
        return "response_empty"
    if repetition_reason(gen.text):
        return "response_loop"
    return None


@dataclass
class PendingRow:
    candidate: int
    row_id: str
    instruction: str
    response: str = ""
    truncated: bool = False
    split: str = "train"
    voice: Voice | None = None


def _speak(backend: TTSBackend, item: PendingRow) -> np.ndarray:
    assert item.voice is not None
    wave, rate = backend.synthesize(normalize_for_speech(item.instruction), item.voice)
    return postprocess(wave, rate)


def run_synth(config: SynthConfig, *, teacher: TeacherLike | None = None,
              tts: TTSBackend | None = None) -> dict[str, Any]:
    """Make ``config.num`` rows of ``config.task`` in ``config.out`` (continuing what a previous
    run left there); returns the summary also written to ``summary.json``.

    ``teacher`` and ``tts`` default to the checkpoint in ``config.teacher`` (or the default
    SmolLM2) and the ``config.tts`` engine.
    """
    from tqdm import tqdm

    task = config.validate()
    backend = tts or make_backend(config.tts, piper_voices=list(config.piper_voices))
    train_voices, heldout_voices = split_voices(backend.voices(), config.heldout_voices)
    prompt = task.prompt(config.target_language)
    with DatasetWriter(config.out, shard_size=config.shard_size) as writer:
        state = writer.load_state()
        task_state = checked_task_state(config, state)
        if task_state is None:
            task_state = {"config": config.fixed(), "next_group": 0, "filters": {}}
            state["tasks"][config.task] = task_state
        filters: Counter[str] = Counter(task_state["filters"])
        done = writer.count(config.task)
        if done >= config.num:
            return writer.write_summary(state)

        teacher = teacher or load_teacher(config)
        index = NearDuplicateIndex(DedupeConfig(threshold=config.near_duplicate_threshold))
        for row in writer.rows:
            if row["task"] == config.task:
                index.add(row["instruction"])
        max_candidates = config.max_candidates or 20 * config.num + 64
        groups_per_batch = config.batch_size // GROUP_SIZE
        bar = tqdm(total=config.num, initial=done, disable=not config.progress, unit="row",
                   desc=f"synth {config.task}")
        pool = ThreadPoolExecutor(max_workers=config.tts_workers)
        try:
            while done < config.num:
                first = task_state["next_group"]
                if first * GROUP_SIZE >= max_candidates:
                    log.warning("%s: stopped after %d Magpie candidates with %d of %d rows; "
                                "the filters rejected the rest (see summary.json); raise "
                                "--max-candidates or loosen the filters", config.task,
                                first * GROUP_SIZE, done, config.num)
                    break
                groups = list(range(first, first + groups_per_batch))
                written = {row["id"]: row for row in writer.rows
                           if row["task"] == config.task and row.get("candidate", -1)
                           >= first * GROUP_SIZE}
                pending = _instructions(config, task, teacher, groups, written, index,
                                        filters, config.num - done)
                teacher_responses(config, teacher, prompt, pending, filters)
                _voices(config, backend, pending, train_voices, heldout_voices)
                for item, wave in spoken(pool, backend, pending, filters,
                                         config.max_audio_seconds):
                    writer.add(manifest_row(item, config.task, prompt, teacher.name, backend,
                                            config.seed), wave)
                    filters["accepted"] += 1
                    filters["response_truncated"] += int(item.truncated)
                    done += 1
                    bar.update(1)
                task_state["next_group"] = first + groups_per_batch
                task_state["filters"] = dict(filters)
                writer.save_state(state)
                writer.write_summary(state)
        finally:
            pool.shutdown(wait=True)
            bar.close()
        task_state["filters"] = dict(filters)
        writer.save_state(state)
        return writer.write_summary(state)


def checked_task_state(config: SynthConfig, state: dict[str, Any]) -> dict[str, Any] | None:
    """``config.task``'s entry in the run state (None before its first run), refused when the
    rows already written were made with other row-defining settings: a rerun must continue
    the same rows, never mix in others under the same ids."""
    task_state = state["tasks"].get(config.task)
    fixed = config.fixed()
    if task_state is not None and task_state.get("config") != fixed:
        old = task_state.get("config", {})
        changed = [f"{k}: {old.get(k)!r} -> {fixed[k]!r}" for k in fixed
                   if old.get(k) != fixed[k]]
        raise ConfigError(f"--out {config.out} already holds {config.task} rows made with "
                          f"other settings ({'; '.join(changed)}); rerun with the same "
                          "settings to continue, or pick another --out")
    return task_state


def load_teacher(config: SynthConfig) -> TeacherLike:
    """The ``--teacher`` checkpoint (default: the converted SmolLM2) on ``--device``."""
    from rba_core.dtypes import parse_dtype
    from rba_core.synth.teacher import RolloutTeacher

    return RolloutTeacher.load(config.teacher, device=config.device,
                               dtype=parse_dtype(config.dtype, "--dtype"))


def _instructions(config: SynthConfig, task: TaskRecipe, teacher: TeacherLike,
                  groups: list[int], written: dict[str, dict[str, Any]],
                  index: NearDuplicateIndex,
                  filters: Counter[str], wanted: int) -> list[PendingRow]:
    requests = []
    for group in groups:
        opener = ""
        if task.openers:
            opener = draw_rng(config.seed, config.task, group, "opener").choice(task.openers)
        requests.append((opener, stable_seed(config.seed, config.task, group, "magpie")))
    samples = teacher.user_turns(requests, GROUP_SIZE,
                                 max_new_tokens=config.max_instruction_tokens,
                                 temperature=config.instruction_temperature,
                                 top_p=config.instruction_top_p, system=config.system)
    accepted: list[PendingRow] = []
    for group, row in zip(groups, samples):
        for g, gen in enumerate(row):
            candidate = group * GROUP_SIZE + g
            rid = row_id(config.task, config.seed, candidate)
            if rid in written:
                # Written by a run killed inside this batch, before the counts were saved:
                # count it now, as that run would have.
                filters["candidates"] += 1
                filters["accepted"] += 1
                filters["response_truncated"] += int(written[rid]["response_truncated"])
                continue
            if len(accepted) >= wanted:
                filters["surplus_unused"] += 1
                continue
            filters["candidates"] += 1
            reason = instruction_reason(gen, task, config) or index.check_and_add(gen.text)
            if reason:
                filters[reason] += 1
                continue
            accepted.append(PendingRow(candidate, rid, gen.text))
    return accepted


def teacher_responses(config: SynthConfig, teacher: TeacherLike, prompt: str,
                      pending: list[PendingRow], filters: Counter[str]) -> None:
    """Fill in each row's response: the teacher's answer to ``prompt`` and its instruction, as
    training shows them to the teacher; rows whose answer is empty or loops are dropped."""
    replies = teacher.respond(
        [teacher_user_message(prompt, item.instruction) for item in pending],
        [stable_seed(config.seed, config.task, item.candidate, "response") for item in pending],
        max_new_tokens=config.resolved["max_response_tokens"],
        temperature=config.response_temperature)
    kept = []
    for item, reply in zip(pending, replies):
        reason = response_reason(reply)
        if reason:
            filters[reason] += 1
            continue
        item.response, item.truncated = reply.text, not reply.ended
        kept.append(item)
    pending[:] = kept


def _voices(config: SynthConfig, backend: TTSBackend, pending: list[PendingRow],
            train_voices: list[str], heldout_voices: list[str]) -> None:
    for item in pending:
        split_rng = draw_rng(config.seed, config.task, item.candidate, "split")
        item.split = "heldout" if split_rng.random() < config.heldout_fraction else "train"
        voice_rng = draw_rng(config.seed, config.task, item.candidate, "voice")
        item.voice = backend.draw(voice_rng,
                                  heldout_voices if item.split == "heldout" else train_voices)


def spoken(pool: ThreadPoolExecutor, backend: TTSBackend, items: list[PendingRow],
           filters: Counter, max_audio_seconds: float) -> Iterator[tuple[PendingRow, np.ndarray]]:
    """Each item with its audio, spoken on ``pool``; a clip the engine fails on or one longer
    than ``max_audio_seconds`` is counted in ``filters`` and skipped."""
    waves = list(pool.map(lambda item: try_speak(backend, item), items))
    for item, wave in zip(items, waves):
        if isinstance(wave, str):
            filters[wave] += 1
        elif len(wave) / SAMPLE_RATE > max_audio_seconds:
            filters["audio_too_long"] += 1
        else:
            yield item, wave


def manifest_row(item: PendingRow, task: str, prompt: str, teacher: str, backend: TTSBackend,
                 seed: int, **extra: Any) -> dict[str, Any]:
    """The manifest row of a spoken item (the writer fills in audio and duration)."""
    assert item.voice is not None
    return {"id": item.row_id, "task": task, "instruction": item.instruction, "prompt": prompt,
            "response": item.response, "audio": "", "duration": 0.0,
            "sample_rate": SAMPLE_RATE, "voice": item.voice.to_dict(), "teacher": teacher,
            "tts": row_tts(backend, item.voice), "seed": seed, "split": item.split,
            "response_truncated": item.truncated,
            "spoken_text": normalize_for_speech(item.instruction),
            "candidate": item.candidate, **extra}


def try_speak(backend: TTSBackend, item: PendingRow) -> np.ndarray | str:
    try:
        return _speak(backend, item)
    except SynthesisFailed as error:
        log.warning("%s: synthesis failed, row skipped: %s", item.row_id, error)
        return "tts_failed"
