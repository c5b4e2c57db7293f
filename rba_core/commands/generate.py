"""``rba generate``: answer one chat prompt with an LLM checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a chat prompt with an LLM checkpoint",
        description="Apply the checkpoint's chat template to PROMPT and print the reply.",
    )
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="Hugging Face-layout LLM folder (default: the SmolLM2-135M-Instruct "
                             "that `rba prepare` converts)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the user message")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="a system message (default: the template's own, if any)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="most tokens to generate (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely "
                                                            "tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rba_core.errors import ConfigError
    from rba_core.generation import generate
    from rba_core.weights.loading import LLM_MODEL_TYPES, load_model
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.data.tokenizer import Tokenizer

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = all tokens), got {args.top_k}")
    folder = args.model
    if folder is None:
        from rba_core.weights.prepare import default_model_dir

        folder = Path(default_model_dir(DEFAULT_MODEL_NAME))
        if not (folder / "config.json").is_file():
            raise ConfigError(f"the default model is not prepared at {folder}; run "
                              "`rba prepare` first or pass --model DIR")
    model = load_model(folder, dtype=getattr(torch, args.dtype), device=args.device)
    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"{folder}: `rba generate` needs an LLM checkpoint (model_type one of "
                          f"{', '.join(LLM_MODEL_TYPES)})")
    tokenizer = Tokenizer.from_pretrained(folder)
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    reply = generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     stop_ids=tokenizer.stop_ids, seed=args.seed,
                     pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)[0]
    print(tokenizer.decode(reply, skip_special_tokens=True).strip())
    return 0
