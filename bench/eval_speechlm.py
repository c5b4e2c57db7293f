"""Evaluate SpeechLM adapters on a dataset split (by default the held-out split of an
`rba synth` folder, whose voices training never heard).

For each adapter the SpeechLM answers every spoken instruction greedily; each answer is
scored by the text teacher's mean log-probability per token given the transcript and by chrF
against the teacher's own answer in the manifest (``rba_core.eval.answers.evaluate_answers``).
The ``untrained`` line is a freshly initialised adapter (seeded); the ``teacher (text)`` line
scores the manifest answers themselves under the teacher: the reference the SpeechLM can at
best reach (its chrF is 100 by construction).

The teacher's log-probability rewards predictable text, and an answer stuck in a loop ("The
answer to this question is: The answer to this question is: ...") is very predictable: such an
answer can out-score the teacher's own. So the table also gives the share of answers caught by
the synthesis loop filter (``rba_core.synth.text.repetition_reason``); read the log-prob column
beside it, and chrF (content overlap with the teacher's answer) as the main measure. The
"on topic" column is the share of answers that use at least one content word of the spoken
question (words of 3+ letters outside a short stop list): a crude check that the answer is
about what was said.

    python bench/eval_speechlm.py --data /work/data/speech --untrained --teacher-line \
        --adapter sft=runs/sft/adapter --adapter kd=runs/kd/adapter

Prints a markdown table, then ``--examples`` rows (transcript, teacher, each SpeechLM), and
last one JSON line with every summary. ``--out FILE`` also writes every scored row as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"eval_speechlm: --adapter takes NAME=DIR, got {spec!r}")
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise SystemExit(f"eval_speechlm: --adapter {spec}: {path}/config.json is missing; "
                             "pass a folder written by SpeechLM.save_trainable (a run's adapter/)")
        out.append((name, path))
    return out


def _teacher_reference(slm: Any, teacher: Any, dataset: Any, indices: list[int],
                       batch_size: int) -> dict[str, Any]:
    """The manifest answers (the teacher's own greedy answers) under the teacher."""
    from rba_core.eval.answers import teacher_loglik

    rows = []
    for start in range(0, len(indices), batch_size):
        batch = dataset.batch(indices[start: start + batch_size])
        if batch is None:
            continue
        answers = [ids[mask].tolist() for ids, mask in zip(batch.response_ids, batch.response_mask)]
        ll = teacher_loglik(teacher, batch.teacher_prompt_ids, answers)
        for b, row in enumerate(batch.rows):
            rows.append({"id": str(row["id"]), "answer": row["response"],
                         "teacher_logprob": float(ll.per_token[b]),
                         "answer_tokens": int(ll.tokens[b]), "chrf": 100.0})
    n = max(len(rows), 1)
    return {"rows": rows, "summary": {
        "rows": float(len(rows)),
        "teacher_logprob": sum(r["teacher_logprob"] for r in rows) / n,
        "chrf": 100.0 if rows else 0.0,
        "answer_tokens": sum(r["answer_tokens"] for r in rows) / n}}


def _looping_share(rows: list[dict[str, Any]]) -> float:
    """Share of answers the synthesis filter calls a repetition loop."""
    from rba_core.synth.text import repetition_reason

    answers = [r.get("answer", r.get("reference", "")) for r in rows]
    return sum(repetition_reason(a) is not None for a in answers) / max(len(answers), 1)


# Function words and question words that say nothing about a question's topic.
_STOP_WORDS = frozenset(
    "the and for are was with from this that what which who whom whose where when why how many "
    "much does did can could you your our their will would should there here about into than "
    "then not yes have has had make give tell best most some any".split())


def _content_words(text: str) -> set[str]:
    import re

    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) > 2 and w not in _STOP_WORDS}


def _on_topic_share(rows: list[dict[str, Any]], questions: dict[str, str]) -> float:
    """Share of answers sharing a content word with their spoken question."""
    hits = [bool(_content_words(questions[r["id"]]) & _content_words(r["answer"]))
            for r in rows if r["id"] in questions]
    return sum(hits) / max(len(hits), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder (manifest.jsonl)")
    parser.add_argument("--split", default="heldout", choices=("train", "heldout", "all"))
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter folder to evaluate (repeatable)")
    parser.add_argument("--untrained", action="store_true",
                        help="also evaluate a freshly initialised adapter (seeded by --seed)")
    parser.add_argument("--teacher-line", action="store_true",
                        help="also score the manifest answers under the teacher (upper line)")
    parser.add_argument("--limit", type=int, default=0, help="first N rows only (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=3, help="rows to print in full")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--encoder", default=None, help="Whisper folder (default: prepared)")
    parser.add_argument("--llm", default=None, help="LLM folder (default: prepared)")
    parser.add_argument("--out", default=None, help="write every scored row here as JSON")
    parser.add_argument("--previous", action="append", default=[], metavar="FILE",
                        help="an earlier --out file (same data and options) whose lines join "
                             "the table first (repeatable); evaluating adapters in several "
                             "runs")
    args = parser.parse_args(argv)
    adapters = _parse_adapters(args.adapter)
    if not adapters and not args.untrained and not args.teacher_line and not args.previous:
        parser.error("nothing to evaluate: pass --adapter NAME=DIR, --untrained, "
                     "--teacher-line or --previous FILE")
    if args.threads:
        torch.set_num_threads(args.threads)

    from rba_core.data.speech import SpeechDataset
    from rba_core.eval.answers import evaluate_answers
    from rba_core.models.speechlm import SpeechLM
    from rba_core.weights.prepare import DEFAULT_ENCODER, DEFAULT_LLM, resolve_model_dir

    torch.manual_seed(args.seed)
    slm = SpeechLM.from_pretrained(resolve_model_dir(args.encoder, DEFAULT_ENCODER, "--encoder"),
                                   resolve_model_dir(args.llm, DEFAULT_LLM, "--llm"), None)
    slm.eval()
    fresh = {k: v.clone() for k, v in slm.adapter.state_dict().items()}
    teacher, _ = slm.load_teacher(None)
    dataset = SpeechDataset(args.data, None if args.split == "all" else args.split,
                            slm.tokenizer)
    indices = list(range(len(dataset)))[: args.limit or None]
    if not indices:
        raise SystemExit(f"eval_speechlm: {args.data} has no {args.split} rows")

    results: dict[str, dict[str, Any]] = {}
    for file in args.previous:
        results.update(json.loads(Path(file).read_text(encoding="utf-8")))
    if args.teacher_line:
        t0 = time.perf_counter()
        results["teacher (text)"] = _teacher_reference(slm, teacher, dataset, indices,
                                                       args.batch_size)
        results["teacher (text)"]["seconds"] = time.perf_counter() - t0
    runs: list[tuple[str, Path | None]] = ([("untrained", None)] if args.untrained else [])
    runs += adapters
    for name, folder in runs:
        t0 = time.perf_counter()
        if folder is None:
            slm.adapter.load_state_dict(fresh)
        else:
            slm.load_trainable(folder)
        report = evaluate_answers(slm, teacher, dataset, indices=indices,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        rows = [vars(r) for r in report.rows]
        summary = report.summary()
        summary["answer_tokens"] = sum(r["answer_tokens"] for r in rows) / max(len(rows), 1)
        results[name] = {"rows": rows, "summary": summary, "adapter": str(folder or ""),
                         "seconds": time.perf_counter() - t0}
        print(f"[{name}] {summary} ({results[name]['seconds']:.0f} s)", file=sys.stderr,
              flush=True)

    print(f"\nSplit {args.split!r} of {args.data}: {len(indices)} rows, greedy answers, "
          f"at most {args.max_new_tokens} new tokens\n")
    questions = {str(row["id"]): row["instruction"] for row in dataset.rows}
    print("| model | teacher log-prob / token (higher is better) | chrF vs teacher | "
          "answer tokens | looping answers | on topic |")
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        s = res["summary"]
        s["looping"] = _looping_share(res["rows"])
        s["on_topic"] = _on_topic_share(res["rows"], questions)
        print(f"| {name} | {s['teacher_logprob']:.3f} | {s['chrf']:.1f} | "
              f"{s['answer_tokens']:.1f} | {100 * s['looping']:.0f}% | "
              f"{100 * s['on_topic']:.0f}% |")

    by_id = {name: {r["id"]: r for r in res["rows"]} for name, res in results.items()}
    manifest_rows = {str(dataset.rows[i]["id"]): dataset.rows[i] for i in indices}
    shown = [i for i in manifest_rows if all(i in rows for rows in by_id.values())]
    for row_id in shown[: args.examples]:
        row = manifest_rows[row_id]
        print(f"\n- **transcript**: {row['instruction']}")
        for name, rows in by_id.items():
            print(f"  - **{name}**: {rows[row_id]['answer']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({name: res["summary"] for name, res in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
