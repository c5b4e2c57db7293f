"""``rba synth``: make a spoken-instruction dataset with the teacher and a TTS engine."""
from __future__ import annotations

import argparse

from rba_core.dtypes import DTYPE_NAMES


def _voices(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="synthesize a spoken-instruction dataset (teacher-written, TTS-spoken)",
        description="The teacher writes instructions (Magpie) and answers them; a TTS engine "
                    "speaks the instructions. Rows go to DIR/manifest.jsonl with 16 kHz FLAC "
                    "audio. Rerunning with the same options continues an interrupted run; "
                    "another --task can be added to the same DIR.",
    )
    parser.add_argument("--task", required=True,
                        choices=("instruct", "qa", "translate", "read", "continue"),
                        help="instruct: spoken requests; qa: spoken questions with brief "
                             "answers; translate: spoken sentences to translate; read: "
                             "sentences of the train answers in --source spoken to be repeated "
                             "(more words for the adapter's CTC alignment; no teacher call); "
                             "continue: the same sentences, the teacher's continuation of each "
                             "as the answer (the warm start before the instruction tasks)")
    parser.add_argument("--source", metavar="DIR|FILE", default=None,
                        help="--task read/continue: the dataset whose answers are spoken "
                             "(default: --out), or a UTF-8 text file, one passage per line, "
                             "read in every voice but the --heldout-voices")
    parser.add_argument("--num", type=int, required=True, metavar="N",
                        help="rows of this task the folder should hold")
    parser.add_argument("--tts", default="espeak", metavar="ENGINE[,ENGINE]",
                        help="speech engine, espeak, piper (an optional GPL extra) or flite, "
                             "or a comma list such as espeak,piper: one engine drawn per row "
                             "from the seed, so one folder mixes them (default: espeak)")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of all draws (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="Magpie candidates (read/continue: sentences) per teacher call, "
                             "a multiple of 8 (default: 32)")
    parser.add_argument("--heldout-fraction", type=float, default=0.0, metavar="F",
                        help="share of rows in the held-out split (default: 0)")
    parser.add_argument("--heldout-voices", type=_voices, default=(), metavar="V1,V2",
                        help="voices only the held-out split uses: a voice (en-gb+f3), a base "
                             "voice (en-us-nyc) or a variant (+f3)")
    parser.add_argument("--target-language", default="French", metavar="LANG",
                        help="translation target for --task translate (default: French)")
    parser.add_argument("--teacher", metavar="DIR", default=None,
                        help="teacher LLM folder (default: the SmolLM2-135M-Instruct `rba "
                             "prepare` converts)")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="system turn before the Magpie user turn (default: the template's "
                             "own)")
    parser.add_argument("--max-response-tokens", type=int, default=None, metavar="N",
                        help="cap on each answer; longer ones are kept and flagged truncated "
                             "(default: instruct 256, qa 64, translate 128, continue 64)")
    parser.add_argument("--max-instruction-tokens", type=int, default=96, metavar="N",
                        help="cap on a Magpie user turn; unfinished turns are dropped "
                             "(default: 96)")
    parser.add_argument("--instruction-temperature", type=float, default=0.8,
                        help="Magpie sampling temperature (default: 0.8)")
    parser.add_argument("--response-temperature", type=float, default=0.0,
                        help="0 = greedy answers (default), > 0 samples them")
    parser.add_argument("--min-words", type=int, default=None, metavar="N",
                        help="shortest instruction kept (default: 3)")
    parser.add_argument("--max-words", type=int, default=None, metavar="N",
                        help="longest instruction kept (default: instruct 60, others 30)")
    parser.add_argument("--near-duplicate-threshold", type=float, default=0.7, metavar="J",
                        help="word-trigram Jaccard similarity that counts as a duplicate "
                             "(default: 0.7)")
    parser.add_argument("--max-candidates", type=int, default=None, metavar="N",
                        help="most Magpie samples drawn (default: 20 * num + 64)")
    parser.add_argument("--tts-workers", type=int, default=2, metavar="N",
                        help="parallel TTS syntheses (default: 2)")
    parser.add_argument("--piper-voice", action="append", default=[], metavar="FILE.onnx",
                        help="an extra piper voice file (repeatable)")
    parser.add_argument("--device", default="cpu", help="teacher device (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES,
                        default="float32", help="teacher weight dtype (default: float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from rba_core.synth import SynthConfig, run_synth

    logging.basicConfig(level=logging.WARNING, format="rba synth: %(message)s")
    config = SynthConfig(
        task=args.task, num=args.num, out=args.out, tts=args.tts, seed=args.seed,
        batch_size=args.batch_size, heldout_fraction=args.heldout_fraction,
        heldout_voices=args.heldout_voices, target_language=args.target_language,
        teacher=args.teacher, device=args.device, dtype=args.dtype, system=args.system,
        instruction_temperature=args.instruction_temperature,
        max_instruction_tokens=args.max_instruction_tokens,
        max_response_tokens=args.max_response_tokens,
        response_temperature=args.response_temperature, min_words=args.min_words,
        max_words=args.max_words, near_duplicate_threshold=args.near_duplicate_threshold,
        max_candidates=args.max_candidates, tts_workers=args.tts_workers,
        piper_voices=tuple(args.piper_voice), progress=not args.no_progress)
    if args.source is not None and args.task not in ("read", "continue"):
        from rba_core.errors import ConfigError

        raise ConfigError("--source goes with --task read or continue only")
    if args.task in ("read", "continue"):
        from rba_core.synth.read import run_read

        summary = run_read(config, source=args.source)
    else:
        summary = run_synth(config)
    task = summary["tasks"].get(args.task, {})
    print(json.dumps({"out": args.out, "task": args.task, "rows": task.get("rows", 0),
                      "hours": task.get("hours", 0.0), "filters": task.get("filters", {})},
                     indent=2))
    return 0 if task.get("rows", 0) >= args.num else 1
