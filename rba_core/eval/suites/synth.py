"""``--suite synth``: a split of an ``rba synth`` dataset (default: the held-out split, whose
voices training never heard), scored against the manifest's reference answers y*.

Per item: the teacher gap (``rba_core.eval.answers``; the mismatched transcript is the next
item's), the teacher's log-prob, chrF and BLEU against y* (sacrebleu through
``rba_core.rl.text_metrics``), on topic, looping, answer length; and the repeat check: with
"Repeat exactly what was said." beside the same audio (the read task's prompt), the word error
rate of the answer against the transcript (``jiwer``), both spelled as ``rba_core.synth.wer``
spells them. The repeat WER is the corpus WER (errors over all reference words), i.e. the
per-item WER weighted by the transcript's word count. Items are grouped by TTS engine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from rba_core.data.prompts import teacher_messages, teacher_prompt_ids
from rba_core.errors import ConfigError
from rba_core.eval.answers import Answered, score_answers
from rba_core.eval.packages import require_module
from rba_core.eval.report import Metric
from rba_core.eval.suites import Suite, answer_texts, first
from rba_core.synth.recipes import READ_PROMPT
from rba_core.synth.text import normalize_for_speech, words_of

if TYPE_CHECKING:
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.eval.systems import Item


def _wer_words(text: str) -> list[str]:
    # Spelled as rba_core.synth.wer spells both sides: Whisper writes "5" where the TTS read
    # "five", and hyphens split words.
    return words_of(normalize_for_speech(text).replace("-", " "))


def repeat_wer(transcript: str, answer: str) -> tuple[float, int]:
    """(word error rate of ``answer`` against ``transcript`` by jiwer, reference word count)."""
    jiwer = require_module("jiwer", "jiwer", "the repeat check's word error rate")
    ref, hyp = _wer_words(transcript), _wer_words(answer)
    if not ref:
        return (0.0 if not hyp else 1.0), 0
    if not hyp:
        return 1.0, len(ref)
    return float(jiwer.wer(" ".join(ref), " ".join(hyp))), len(ref)


class SynthSuite(Suite):
    name = "synth"
    metrics = (Metric("teacher_gap", "teacher gap", True),
               Metric("chrf", "chrF", True, percent=True),
               Metric("bleu", "BLEU", True, percent=True),
               Metric("on_topic", "on topic", True, percent=True),
               Metric("looping", "looping", False, percent=True),
               Metric("answer_tokens", "answer tokens", None),
               Metric("repeat_wer", "repeat WER", False, percent=True, weight="repeat_words"))

    def items(self, tokenizer):
        options = self.options
        if options.data is None:
            raise ConfigError("--suite synth needs --data DIR (a folder written by `rba synth`)")
        require_module("jiwer", "jiwer", "the repeat check's word error rate")
        items = split_items(self, tokenizer)
        if len(items) < 2:
            raise ConfigError(f"{options.data}: split {options.split!r} has {len(items)} usable "
                              "rows; the teacher gap compares each answer under its own and "
                              "another row's transcript, so it needs at least 2")
        return items

    def evaluate(self, system, items, context):
        ids, texts = answer_texts(system, items, context)
        answered = [Answered(id=item.id, instruction=item.text, reference=item.gold["reference"],
                             prompt_ids=teacher_prompt_ids(context.tokenizer,
                                                           teacher_messages(item.row())),
                             answer_ids=row, answer=text)
                    for item, row, text in zip(items, ids, texts)]
        scores = score_answers(context.teacher, answered, batch_size=context.batch_size)
        _, repeats = answer_texts(system, items, context, prompt=READ_PROMPT,
                                  what="repeat check")
        records = []
        for item, score, repeat in zip(items, scores, repeats):
            wer, words = repeat_wer(item.text, repeat)
            records.append({"answer": score.answer, "repeat_answer": repeat,
                            "scores": {**score.scores(), "repeat_wer": wer,
                                       "repeat_words": float(words)}})
        return records


def split_items(suite: Suite, tokenizer: "Tokenizer", *, task: str | None = None
                ) -> list["Item"]:
    """The rows of ``--split`` of the ``rba synth`` folder ``--data`` as items (the first
    ``--limit``), the reference y* in ``gold["reference"]``, grouped by TTS engine. Shared by
    the synth and translate suites, so both read a folder the way training does; rows of
    another ``task`` than ``task`` (when given) are left out as ``other_task``."""
    from rba_core.data.speech import SpeechDataset
    from rba_core.eval.systems import Item

    options = suite.options
    # The training reader's checks (fields, paths inside the folder, durations up to
    # Whisper's 30 s): a row training would skip is left out here too, and counted.
    dataset = SpeechDataset(options.data, None if options.split == "all" else options.split,
                            tokenizer)
    for where, reason in dataset.skipped_rows:
        suite.left_out.append({"id": where, "reason": reason})
    rows = []
    for row in dataset.rows:
        if task is not None and isinstance(row.get("task"), str) and row["task"] != task:
            suite.left_out.append({"id": str(row["id"]), "reason": "other_task"})
        else:
            rows.append(row)
    rows = first(rows, options.limit)
    suite.description = (f"split {options.split!r} of {options.data}, "
                         f"{'first ' + str(len(rows)) if options.limit else 'all'} rows")
    return [Item(str(row["id"]), row["instruction"], row.get("prompt", ""),
                 dataset.root / row["audio"], _engine(row), {"reference": row["response"]},
                 {"voice": row.get("voice"), "seconds": row.get("duration")})
            for row in rows]


def _engine(row: dict) -> str:
    voice = row.get("voice")
    if isinstance(voice, dict) and isinstance(voice.get("engine"), str):
        return voice["engine"]
    return str(row.get("tts", "unknown"))
