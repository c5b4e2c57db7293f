"""``--suite translate``: speech-to-text translation (issue #15), scored against a reference
translation with sacrebleu's sentence BLEU and chrF through ``rba_core.rl.text_metrics`` (the
functions the RL rewards use, so a reward and the number reported for it cannot drift apart),
plus the looping share and the answer length.

``--data`` is either
- a folder written by ``rba synth --task translate``: the rows of ``--split``, read as the synth
  suite reads them (the spoken sentence, its task prompt, the teacher's translation as the
  reference), grouped by TTS engine; or
- a JSON Lines file of the user's own pairs, one ``{"source", "reference"}`` object a line
  (optional ``"id"`` and ``"target_language"``, default ``--target-language``). The sources are
  spoken in held-out voices (``spoken_items``), as ifeval and nq prompts are. A line that
  cannot be used is left out with its line number and why, never ending the run: one bad line
  in a long file must not cost the other rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rba_core.errors import ConfigError
from rba_core.eval.answers import looping
from rba_core.eval.report import Metric
from rba_core.eval.suites import Suite, answer_texts, first, spoken_items
from rba_core.rl.text_metrics import bleu, chrf
from rba_core.synth.recipes import translate_prompt

TASK = "translate"


@dataclass(frozen=True)
class Pair:
    """One usable line of a pairs file."""

    id: str
    line: int
    source: str
    reference: str
    target_language: str


def _text(row: dict[str, Any], name: str) -> str | None:
    """The reason the field ``name`` is unusable, or None."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"missing_{name}"
    return None if isinstance(value, str) else f"bad_{name}"


def read_pairs(path: Path, target_language: str
               ) -> tuple[list[Pair], list[dict[str, Any]]]:
    """(the usable pairs in file order, the left-out lines as ``{"id", "line", "reason"}``).

    Reasons: ``bad_json`` (not JSON or not UTF-8), ``not_an_object``, ``missing_source`` /
    ``missing_reference`` (absent, null or blank), ``bad_source`` / ``bad_reference`` (not a
    string), ``bad_target_language`` (not a non-empty string), ``bad_id`` (not a string or
    integer), ``duplicate_id`` (the first line with an id keeps it). Blank lines are skipped
    unreported. A line without ``id`` is named ``line-N``, unless another line claims that id."""
    parsed: list[tuple[int, dict[str, Any]]] = []
    left_out: list[dict[str, Any]] = []

    def leave_out(number: int, reason: str, name: str | None = None) -> None:
        left_out.append({"id": name or f"{path.name}:{number}", "line": number,
                         "reason": reason})

    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise ConfigError(f"--data {path}: cannot read it ({error})") from error
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            if not text.strip():
                continue
            row = json.loads(text)
        except ValueError:          # UnicodeDecodeError and JSONDecodeError both are
            leave_out(number, "bad_json")
            continue
        if not isinstance(row, dict):
            leave_out(number, "not_an_object")
            continue
        language = row.get("target_language", target_language)
        language = target_language if language is None else language
        reason = (_text(row, "source") or _text(row, "reference")
                  or (None if isinstance(language, str) and language.strip()
                      else "bad_target_language"))
        ident = row.get("id")
        if reason is None and ident is not None and (
                isinstance(ident, bool) or not isinstance(ident, (str, int))
                or not str(ident).strip()):
            reason = "bad_id"
        if reason is not None:
            leave_out(number, reason)
            continue
        parsed.append((number, row))
    # Explicit ids first, so a generated line-N never takes an id a row asked for.
    claimed = {str(row["id"]) for _, row in parsed if row.get("id") is not None}
    seen: set[str] = set()
    pairs = []
    for number, row in parsed:
        if row.get("id") is not None:
            ident = str(row["id"])
        else:
            ident, copy = f"line-{number}", 1
            while ident in claimed or ident in seen:
                copy += 1
                ident = f"line-{number}.{copy}"
        if ident in seen:
            leave_out(number, "duplicate_id", ident)
            continue
        seen.add(ident)
        language = row.get("target_language") or target_language
        pairs.append(Pair(ident, number, row["source"].strip(), row["reference"].strip(),
                          language.strip()))
    left_out.sort(key=lambda left: left["line"])
    return pairs, left_out


def translation_scores(answer: str, reference: str, answer_tokens: int) -> dict[str, float]:
    """One answer's scores: sentence BLEU and chrF in [0, 1], looping (0/1), its length in
    tokens (with the stop token, as the synth suite counts it)."""
    return {"bleu": bleu(answer, reference), "chrf": chrf(answer, reference),
            "looping": float(looping(answer)), "answer_tokens": float(answer_tokens)}


class TranslateSuite(Suite):
    name = "translate"
    metrics = (Metric("bleu", "BLEU", True, percent=True),
               Metric("chrf", "chrF", True, percent=True),
               Metric("looping", "looping", False, percent=True),
               Metric("answer_tokens", "answer tokens", None))

    def items(self, tokenizer):
        from rba_core.eval.suites.synth import split_items

        options = self.options
        data = options.data
        if data is None:
            raise ConfigError("--suite translate needs --data: a folder written by `rba synth "
                              "--task translate`, or a JSON Lines file with one "
                              '{"source": ..., "reference": ...} object a line')
        if data.is_dir():
            items = split_items(self, tokenizer, task=TASK)
            if not items:
                raise ConfigError(f"{data}: split {options.split!r} has no usable translate "
                                  "rows; pass a folder written by `rba synth --task translate` "
                                  "(or another --split)")
            return items
        if not data.is_file():
            raise ConfigError(f"--data {data}: no such file or folder; pass a folder written by "
                              "`rba synth --task translate` or a JSON Lines file of pairs")
        if not options.target_language.strip():
            raise ConfigError("--target-language must name a language, e.g. French")
        pairs, self.left_out = read_pairs(data, options.target_language.strip())
        if not pairs:
            raise ConfigError(
                f"{data}: no usable rows ({len(self.left_out)} left out); write one JSON object "
                'a line with non-empty string "source" and "reference" (optional "id", '
                '"target_language"), e.g. {"source": "Where is the station?", "reference": '
                '"Où est la gare ?"}')
        pairs = first(pairs, options.limit)
        self.description = (f"pairs from {data}, {'first ' if options.limit else 'all '}"
                            f"{len(pairs)}, spoken by {options.engine}")
        return spoken_items(self, [(p.id, p.source, translate_prompt(p.target_language),
                                    {"reference": p.reference, "target_language":
                                     p.target_language, "line": p.line}) for p in pairs])

    def evaluate(self, system, items, context):
        ids, texts = answer_texts(system, items, context)
        return [{"answer": text,
                 "scores": translation_scores(text, item.gold["reference"], len(row))}
                for item, row, text in zip(items, ids, texts)]
