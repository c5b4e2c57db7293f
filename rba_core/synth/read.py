"""``rba synth --task read`` and ``--task continue``: speak the sentences of the teacher's
answers that a dataset already holds.

Why: the adapter's CTC pre-alignment (``rba_core.tasks.align``) and the warm start that hears
the words (BLSP, Ultravox: repeat and continue the spoken text before the instruction tasks)
need much more speech than Magpie gives; on a CPU the teacher writes new instructions ~50x
slower than espeak speaks. The answers the teacher already wrote for the
``instruct``/``qa``/``translate`` rows are several times more text than the instructions
themselves, declarative and in the same register. Only train-split answers are read, in
voices the source's train split uses, so nothing of the held-out split leaks into training.

The source can also be a UTF-8 text file, one passage per line (e.g. encyclopedia paragraphs):
its sentences are read in every voice of ``--tts`` but those ``--heldout-voices`` names, so a
held-out split made elsewhere keeps voices training never hears.

Each row's instruction is one sentence. ``read``: the prompt asks to repeat it and the
response is the sentence itself (no teacher call). ``continue``: the prompt asks to continue
it and the response is the teacher's reply to exactly the user turn training shows the
teacher (prompt + sentence, ``teacher_user_message``), so KD's teacher scores its own text.
Sentence ``k`` (in source-row order) becomes row ``TASK-sSEED-k`` with a voice drawn from
(seed, task, k). Rows are made ``--batch-size`` sentences at a time (one teacher call each)
and written one by one; a rerun skips the ids written and makes the rest again in order, so a
killed run resumes. A sentence whose continuation the filters dropped is asked again on a
rerun; the reply is greedy or seeded by (seed, k), so it is dropped again and counted once,
as in an uninterrupted run.
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
from rba_core.synth.text import repetition_reason, unspeakable_reason, words_of

log = logging.getLogger("rba.synth")

READ_TASK = "read"
CONTINUE_TASK = "continue"
# Tasks whose rows speak other rows' answers; they are never a source themselves.
SPOKEN_ANSWER_TASKS = (READ_TASK, CONTINUE_TASK)
# A continuation brings words of its own: with fewer words the sentence lacks, the teacher
# echoed or reordered it (the 135M default teacher does for about 3 sentences in 10), which is
# a repeat row (--task read), not a continuation.
MIN_NEW_WORDS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def answer_sentences(rows: list[dict[str, Any]], *, min_words: int, max_words: int,
                     filters: Counter[str]) -> list[tuple[str, str]]:
    """``(source row id, sentence)`` for every speakable, complete sentence of the train rows'
    answers, in order. A truncated answer's last piece is unfinished and left out."""
    sentences = []
    for row in rows:
        if row["task"] in SPOKEN_ANSWER_TASKS or row["split"] != "train":
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


def text_rows(path: Path) -> list[dict[str, Any]]:
    """A UTF-8 text file as source rows for ``answer_sentences``: each non-blank line one
    train "answer" (a passage), named ``FILE:LINE``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ConfigError(f"--source {path}: not UTF-8 text ({error}); pass a dataset folder "
                          "or a UTF-8 text file with one passage per line") from None
    return [{"id": f"{path.name}:{number}", "task": "text", "split": "train",
             "response": line.strip()}
            for number, line in enumerate(lines, 1) if line.strip()]


def echo_reason(sentence: str, response: str) -> str | None:
    """``response_echo`` when ``response`` has fewer than ``MIN_NEW_WORDS`` words that
    ``sentence`` lacks, else None."""
    own = set(words_of(sentence))
    new = [word for word in words_of(response) if word not in own]
    return "response_echo" if len(new) < MIN_NEW_WORDS else None


def run_read(config: "SynthConfig", *, source: str | Path | None = None,  # noqa: F821
             tts: Any = None, teacher: Any = None) -> dict[str, Any]:
    """Write up to ``config.num`` rows of ``config.task`` (``read`` or ``continue``) into
    ``config.out`` from the answers in ``source`` (default: ``config.out`` itself); returns the
    summary. ``teacher`` (``continue`` only) defaults to ``config.teacher``."""
    from tqdm import tqdm

    from rba_core.synth.pipeline import (
        PendingRow, checked_task_state, draw_rng, load_teacher, manifest_row, split_voices,
        spoken, teacher_responses,
    )
    from rba_core.synth.tts import make_backend, voices_by_engine

    task = config.validate()
    name = config.task
    if name not in SPOKEN_ANSWER_TASKS:
        raise ConfigError(f"run_read makes --task {' or '.join(SPOKEN_ANSWER_TASKS)} rows, got "
                          f"{name!r}; use run_synth")
    source = Path(source or config.out)
    from_text = source.is_file()
    if config.heldout_fraction:
        raise ConfigError(f"--task {name} makes train rows only; drop --heldout-fraction (the "
                          "held-out split comes from the other tasks)")
    if config.heldout_voices and not from_text:
        raise ConfigError(f"--task {name} speaks {source}'s train answers in its train voices "
                          "only; drop --heldout-voices (they are for a text-file --source)")
    backend = tts or make_backend(config.tts, piper_voices=list(config.piper_voices))
    rows = text_rows(source) if from_text else read_manifest(source)
    filters: Counter[str] = Counter()
    sentences = answer_sentences(rows, min_words=config.resolved["min_words"],
                                 max_words=config.resolved["max_words"], filters=filters)
    if not sentences:
        what = ("lines with a complete, speakable sentence" if from_text else
                "train answers with a speakable sentence; synthesize instruct/qa/translate "
                "rows there first")
        raise ConfigError(f"--task {name}: {source} holds no {what}")
    if from_text:
        # No voices to inherit: every voice but those a held-out split elsewhere keeps.
        source_voices = set(split_voices(backend.voices(), config.heldout_voices)[0])
    else:
        # The voices the source's train split was spoken in: none reserved for held-out rows.
        source_voices = {row["voice"]["voice"] for row in rows if row["split"] == "train"
                         and row["task"] not in SPOKEN_ANSWER_TASKS}
    # Each engine of a mix needs some, or it would speak no row (or a held-out voice).
    for engine, voices in voices_by_engine(backend).items():
        if not source_voices & set(voices):
            where = ("--heldout-voices holds out all of its voices" if from_text else
                     f"no voice of {source}'s train rows belongs to it; use the engine the "
                     "source was made with (each engine of a --tts mix needs train rows there)")
            raise ConfigError(f"--task {name}: the --tts {engine} engine would speak no row: "
                              f"{where}")
    train_voices = sorted(source_voices & set(backend.voices()))
    prompt = task.prompt(config.target_language)
    index = NearDuplicateIndex(DedupeConfig(threshold=config.near_duplicate_threshold))
    with DatasetWriter(config.out, shard_size=config.shard_size) as writer:
        state = writer.load_state()
        previous = checked_task_state(config, state)
        # Row k is sentence k of the source: a rerun reading another source would give
        # existing ids to other sentences.
        if previous and previous.get("source") and \
                Path(previous["source"]).resolve() != source.resolve():
            raise ConfigError(f"--out {config.out} already holds {name} rows read from "
                              f"{previous['source']}, not {source}; rerun with that --source "
                              "to continue, or pick another --out")
        done = writer.count(name)
        if done >= config.num:
            return writer.write_summary(state)
        todo: list[tuple[PendingRow, str]] = []
        for k, (source_id, sentence) in enumerate(sentences):
            duplicate = index.check_and_add(sentence)
            if duplicate:
                filters[duplicate] += 1
                continue
            row_id = f"{name}-s{config.seed}-{k:07d}"
            if row_id not in writer.ids:
                # read: the answer is the sentence itself, a listener repeating it.
                todo.append((PendingRow(k, row_id, sentence, response=sentence), source_id))
        if name == CONTINUE_TASK and todo:
            teacher = teacher or load_teacher(config)
        # The sentence filters are recounted over all sentences each run, the rest over the
        # sentences this run makes (those a previous run dropped are made again).
        task_state = {"config": config.fixed(), "filters": dict(filters),
                      "source": str(source.resolve())}
        state["tasks"][name] = task_state
        bar = tqdm(total=config.num, initial=done, disable=not config.progress, unit="row",
                   desc=f"synth {name}")
        with ThreadPoolExecutor(max_workers=config.tts_workers) as pool:
            while done < config.num and todo:
                take = min(config.batch_size, config.num - done)
                batch, todo = todo[:take], todo[take:]
                sources = {item.row_id: source_id for item, source_id in batch}
                items = [item for item, _ in batch]
                if name == CONTINUE_TASK:
                    teacher_responses(config, teacher, prompt, items, filters)
                    kept = []
                    for item in items:
                        reason = echo_reason(item.instruction, item.response)
                        if reason:
                            filters[reason] += 1
                        else:
                            kept.append(item)
                    items = kept
                for item in items:
                    item.voice = backend.draw(draw_rng(config.seed, name, item.candidate,
                                                       "voice"), train_voices)
                for item, wave in spoken(pool, backend, items, filters,
                                         config.max_audio_seconds):
                    writer.add(manifest_row(
                        item, name, prompt,
                        teacher.name if name == CONTINUE_TASK else "(read)", backend,
                        config.seed, source=sources[item.row_id]), wave)
                    done += 1
                    bar.update(1)
                filters["accepted"] = writer.count(name)
                task_state["filters"] = dict(filters)
                # The state (what resume needs) after every batch; the summary, which reads
                # every row of the folder, once at the end.
                writer.save_state(state)
        bar.close()
        filters["accepted"] = writer.count(name)
        task_state["filters"] = dict(filters)
        writer.save_state(state)
        if done < config.num:
            log.warning("%s: %d of %d rows; the answers in %s hold no more sentences", name,
                        done, config.num, source)
        return writer.write_summary(state)
