"""``rba synth --task read``: speak the sentences of the teacher's answers that a dataset already
holds, with no teacher call.

Why: the adapter's CTC pre-alignment (``rba_core.tasks.align``) needs many different spoken words,
and on a CPU the teacher writes new instructions ~50x slower than espeak speaks. The answers
the teacher already wrote for the ``instruct``/``qa``/``translate`` rows are several times
more text than the instructions themselves, in the same register. Only train-split answers are
read, in train voices, so nothing of the held-out split leaks into training.

Each row's instruction is one sentence, its prompt asks to repeat it and its response is the
sentence itself. Sentence ``k`` (in source-row order) becomes row ``read-sSEED-k`` with a voice
drawn from (seed, k); a rerun skips rows already written, so a killed run resumes.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rba_core.errors import ConfigError
from rba_core.synth.dataset import DatasetWriter, read_manifest
from rba_core.synth.dedupe import DedupeConfig, NearDuplicateIndex
from rba_core.synth.text import normalize_for_speech, repetition_reason, unspeakable_reason, words_of

log = logging.getLogger("rba.synth")

READ_TASK = "read"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def answer_sentences(rows: list[dict[str, Any]], *, min_words: int, max_words: int,
                     filters: Counter[str]) -> list[tuple[str, str]]:
    """``(source row id, sentence)`` for every speakable, complete sentence of the train rows'
    answers, in order. A truncated answer's last piece is unfinished and left out."""
    sentences = []
    for row in rows:
        if row["task"] == READ_TASK or row["split"] != "train":
            continue
        pieces = [p.strip() for line in row["response"].splitlines()
                  for p in _SENTENCE_END.split(line) if p.strip()]
        if row.get("response_truncated") and pieces:
            pieces.pop()
        for piece in pieces:
            words = len(words_of(piece))
            # The filter-count keys of the Magpie filters (pipeline.instruction_reason).
            if words < min_words:
                reason = "too_short"
            elif words > max_words:
                reason = "too_long"
            elif repetition_reason(piece):
                reason = "repetition_loop"
            elif unspeakable_reason(piece):
                reason = "not_speakable"
            elif not piece.endswith((".", "!", "?")):
                reason = "not_a_sentence"
            else:
                reason = None
            if reason:
                filters[reason] += 1
                continue
            sentences.append((row["id"], piece))
    return sentences


def run_read(config: "SynthConfig", *, source: str | Path | None = None,  # noqa: F821
             tts: Any = None) -> dict[str, Any]:
    """Write up to ``config.num`` read rows into ``config.out`` from the answers in ``source``
    (default: ``config.out`` itself); returns the summary."""
    from tqdm import tqdm

    from rba_core.synth.pipeline import PendingRow, try_speak, draw_rng
    from rba_core.synth.tts import SAMPLE_RATE, make_backend

    task = config.validate()
    source = Path(source or config.out)
    if config.heldout_fraction or config.heldout_voices:
        raise ConfigError("--task read speaks train answers in the source's train voices only; "
                          "drop --heldout-fraction/--heldout-voices (the held-out split comes "
                          "from the other tasks)")
    backend = tts or make_backend(config.tts, piper_voices=list(config.piper_voices))
    rows = read_manifest(source)
    filters: Counter[str] = Counter()
    sentences = answer_sentences(rows, min_words=config.resolved["min_words"],
                                 max_words=config.resolved["max_words"], filters=filters)
    if not sentences:
        raise ConfigError(f"--task read: {source} holds no train answers with a speakable "
                          "sentence; synthesize instruct/qa/translate rows there first")
    # The voices the source's train split was spoken in: none reserved for held-out rows.
    train_voices = sorted({row["voice"]["voice"] for row in rows if row["split"] == "train"
                           and row["task"] != READ_TASK} & set(backend.voices()))
    if not train_voices:
        raise ConfigError(f"--task read: no voice of {source}'s train rows belongs to the "
                          f"--tts {config.tts} engine; use the engine the source was made with")
    index = NearDuplicateIndex(DedupeConfig(threshold=config.near_duplicate_threshold))
    with DatasetWriter(config.out, shard_size=config.shard_size) as writer:
        state = writer.load_state()
        done = writer.count(READ_TASK)
        pending = []
        for k, (source_id, sentence) in enumerate(sentences):
            duplicate = index.check_and_add(sentence)
            if duplicate:
                filters[duplicate] += 1
                continue
            row_id = f"{READ_TASK}-s{config.seed}-{k:07d}"
            if row_id in writer.ids:
                continue
            if done + len(pending) >= config.num:
                break
            voice = backend.draw(draw_rng(config.seed, READ_TASK, k, "voice"), train_voices)
            # The answer is the sentence itself: a listener repeating it.
            pending.append((PendingRow(k, row_id, sentence, response=sentence, voice=voice),
                            source_id))
        bar = tqdm(total=config.num, initial=done, disable=not config.progress, unit="row",
                   desc="synth read")
        with ThreadPoolExecutor(max_workers=config.tts_workers) as pool:
            waves = pool.map(lambda entry: try_speak(backend, entry[0]), pending)
            for (item, source_id), wave in zip(pending, waves):
                if isinstance(wave, str):
                    filters[wave] += 1
                    continue
                writer.add({
                    "id": item.row_id, "task": READ_TASK, "instruction": item.instruction,
                    "prompt": task.prompt(config.target_language),
                    "response": item.response, "audio": "", "duration": 0.0,
                    "sample_rate": SAMPLE_RATE, "voice": item.voice.to_dict(),
                    "teacher": "(read)", "tts": backend.identifier(), "seed": config.seed,
                    "split": "train", "response_truncated": False,
                    "spoken_text": normalize_for_speech(item.instruction),
                    "candidate": item.candidate, "source": source_id,
                }, wave)
                bar.update(1)
        bar.close()
        # The other counts are recomputed over all sentences each run; so is this one.
        filters["accepted"] = writer.count(READ_TASK)
        state["tasks"][READ_TASK] = {"config": config.fixed(), "filters": dict(filters),
                                     "source": str(source)}
        writer.save_state(state)
        if writer.count(READ_TASK) < config.num:
            log.warning("read: %d of %d rows; the answers in %s hold no more sentences",
                        writer.count(READ_TASK), config.num, source)
        return writer.write_summary(state)
