"""``rba chat``: answer a spoken instruction with the SpeechLM (and, given the transcript,
show the text teacher's answer beside it), or answer the clips of a dataset folder beside the
teacher's answers to their transcripts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rba_core.commands.options import (
    add_model_flags, add_sampling_flags, model_placement, sampling_from_args,
)
from rba_core.weights.prepare import DEFAULT_ENCODER, DEFAULT_LLM


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="answer a spoken instruction with the SpeechLM",
        description="Encode AUDIO with Whisper, splice it into the LLM's chat prompt through "
                    "the audio adapter and print the greedy answer. With --transcript, also "
                    "print the text teacher's answer to the transcript. With --data instead of "
                    "--audio, answer the first clips of a dataset split (default: the "
                    "held-out one), each beside the teacher's answer to its transcript.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", metavar="FILE",
                        help="the spoken instruction (WAV/FLAC/OGG, any rate, mono or not)")
    source.add_argument("--data", metavar="DIR",
                        help="a dataset folder (`rba synth` layout): answer its clips")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="with --data: which split (default: heldout)")
    parser.add_argument("--limit", type=int, default=4, metavar="N",
                        help="with --data: how many clips, from the first (default: 4)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a trained adapter folder (SpeechLM.save_trainable); default: the "
                             "packaged warm-started adapter when present, else an untrained one")
    parser.add_argument("--transcript", metavar="TEXT", default=None,
                        help="what the audio says; prints the teacher's answer to it too")
    parser.add_argument("--prompt", metavar="TEXT", default="",
                        help="task text beside the audio, e.g. 'Translate the audio into "
                             "French.' (default: none, the audio is the instruction)")
    parser.add_argument("--encoder", metavar="DIR", default=None,
                        help=f"Whisper folder (default: `rba prepare`'s {DEFAULT_ENCODER})")
    parser.add_argument("--llm", metavar="DIR", default=None,
                        help=f"LLM folder (default: `rba prepare`'s {DEFAULT_LLM})")
    parser.add_argument("--teacher", metavar="DIR", default=None,
                        help="another LLM with the same tokenizer as the text teacher "
                             "(default: the SpeechLM's own LLM)")
    add_sampling_flags(parser)
    add_model_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rba_core.data.prompts import student_messages, teacher_messages, teacher_prompt_ids
    from rba_core.models.lora import lora_disabled
    from rba_core.models.speechlm import DEFAULT_ADAPTER_DIR, SpeechLM
    from rba_core.rollout import generate

    dtype, device = model_placement(args)  # bad flags fail before any model loads
    rows, waves = _requests(args)
    from rba_core.weights.prepare import resolve_model_dir

    encoder_dir = resolve_model_dir(args.encoder, DEFAULT_ENCODER, "--encoder")
    llm_dir = resolve_model_dir(args.llm, DEFAULT_LLM, "--llm")
    adapter = args.adapter
    if adapter is None and args.encoder is None and args.llm is None \
            and (DEFAULT_ADAPTER_DIR / "config.json").is_file():
        adapter = DEFAULT_ADAPTER_DIR
    if adapter is None:
        print("rba chat: warning: no trained adapter (pass --adapter DIR); the answer comes "
              "from an untrained adapter and will not follow the audio", file=sys.stderr)
    torch.manual_seed(args.seed)
    speechlm = SpeechLM.from_pretrained(encoder_dir, llm_dir, adapter,
                                        dtype=dtype, device=device)
    speechlm.eval()
    sampling = sampling_from_args(args, speechlm.tokenizer.stop_ids)
    answers = speechlm.answer(waves, [student_messages(row) for row in rows], sampling,
                              seed=args.seed)
    if args.data is None and args.transcript is None:
        print(answers[0])
        return 0
    teacher, tokenizer = speechlm.load_teacher(args.teacher)
    prompts = [teacher_prompt_ids(tokenizer, teacher_messages(row)) for row in rows]
    with lora_disabled(teacher):
        replies = generate(teacher, prompts, sampling, seed=args.seed)
    for index, (row, answer, reply) in enumerate(zip(rows, answers, replies)):
        if args.data is not None:
            voice = row.get("voice", {}).get("voice", "?")
            print(f"{'' if index == 0 else chr(10)}[{row['id']}, voice {voice}] said: "
                  f"{row['instruction']}")
        print(f"speechlm: {answer}")
        print(f"teacher:  {tokenizer.decode(reply, skip_special_tokens=True).strip()}")
    return 0


def _requests(args: argparse.Namespace) -> tuple[list[dict], list]:
    """The chat rows (instruction = transcript, task prompt) and 16 kHz waves to answer."""
    from rba_core.data.audio import load_speech
    from rba_core.errors import ConfigError

    if args.data is None:
        return ([{"instruction": args.transcript or "", "prompt": args.prompt}],
                [load_speech(args.audio)])
    from rba_core.synth import read_manifest

    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.transcript is not None or args.prompt:
        raise ConfigError("--transcript and --prompt go with --audio; with --data each row "
                          "brings its own")
    root = Path(args.data)
    rows = [row for row in read_manifest(root) if row.get("split") == args.split]
    if not rows:
        raise ConfigError(f"--data {root}: no rows in split {args.split!r}; pick the other "
                          "--split or synthesize with --heldout-fraction")
    rows = rows[: args.limit]
    return rows, [load_speech(root / row["audio"]) for row in rows]
