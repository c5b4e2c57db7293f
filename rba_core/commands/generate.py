"""``rba generate``: answer one chat prompt with an LLM checkpoint."""
from __future__ import annotations

import argparse

from rba_core.commands.options import (
    add_model_flags, add_sampling_flags, model_placement, sampling_from_args,
)
from rba_core.weights.prepare import DEFAULT_LLM


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a chat prompt with an LLM checkpoint",
        description="Apply the checkpoint's chat template to PROMPT and print the reply.",
    )
    parser.add_argument("--model", metavar="DIR", default=None,
                        help=f"Hugging Face-layout LLM folder (default: `rba prepare`'s "
                             f"{DEFAULT_LLM})")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the user message")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="a system message (default: the template's own, if any)")
    add_sampling_flags(parser)
    add_model_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.errors import ConfigError
    from rba_core.models.llama import LlamaConfig
    from rba_core.rollout import generate
    from rba_core.weights.loading import LLM_MODEL_TYPES, SUPPORTED_MODEL_TYPES, load_model
    from rba_core.weights.prepare import resolve_model_dir
    from rba_core.weights.safetensors_io import CONFIG_NAME, read_config

    # Bad flags, and a prompt the model cannot take, fail before any weights load.
    dtype, device = model_placement(args)
    folder = resolve_model_dir(args.model, DEFAULT_LLM, "--model")
    model_type = read_config(folder).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{folder / CONFIG_NAME}: model_type {model_type!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in LLM_MODEL_TYPES:
        raise ConfigError(f"{folder}: `rba generate` needs an LLM checkpoint (model_type one of "
                          f"{', '.join(LLM_MODEL_TYPES)})")
    context = LlamaConfig.from_pretrained(folder).max_position_embeddings
    tokenizer = Tokenizer.from_pretrained(folder)
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    if len(prompt_ids) + args.max_new_tokens > context:
        raise ConfigError(f"--prompt is {len(prompt_ids)} tokens in the chat template; with "
                          f"--max-new-tokens {args.max_new_tokens} that passes the model's "
                          f"context of {context} tokens (max_position_embeddings in "
                          f"{folder}/config.json); shorten --prompt or lower --max-new-tokens")
    model = load_model(folder, dtype=dtype, device=device)
    reply = generate(model, [prompt_ids], sampling_from_args(args, tokenizer.stop_ids),
                     seed=args.seed)[0]
    print(tokenizer.decode(reply, skip_special_tokens=True).strip())
    return 0
