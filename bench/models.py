"""Load time and generation throughput of the converted SmolLM2-135M-Instruct: rba's own
Llama module against transformers (``from_pretrained`` + ``generate``), greedy, same prompts,
batch 1 and 8, in one run.

    python bench/models.py [--new-tokens 64] [--repeats 3] [--device cpu] [--dtype float32]
                           [--threads N]

Prints a table, then as its last line one JSON object of ratios (>1 means rba is faster).
Needs the model that `rba prepare` converts; exits 1 with instructions when it is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rba_core.dtypes import DTYPE_NAMES, parse_dtype

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue? Answer in one sentence.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Write a haiku about autumn leaves falling in the quiet forest.",
    "What is two plus two?",
    "Suggest a name for a small grey cat.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="LLM folder (default: the prepared "
                                                      "SmolLM2-135M-Instruct)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement; the fastest counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both (default: torch's choice); on a shared "
                             "machine 1 avoids OpenMP waits on descheduled threads")
    return parser.parse_args()


def best_time(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> int:
    args = parse_args()
    from rba_core.errors import ConfigError
    from rba_core.weights.prepare import DEFAULT_LLM, resolve_model_dir

    try:
        folder = resolve_model_dir(args.model, DEFAULT_LLM, "--model")
    except ConfigError as error:
        print(f"bench/models.py: {error}", file=sys.stderr)
        return 1

    import transformers

    from rba_core.rollout import RolloutEngine, SamplingConfig, generate
    from rba_core.weights.loading import load_model
    from rba_core.data.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype, "--dtype")
    tokenizer = Tokenizer.from_pretrained(folder)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in QUESTIONS]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    # Both loaders read the same file; one untimed read first puts it in the page cache so
    # neither pays for the disk.
    (folder / "model.safetensors").read_bytes()
    ours_load, ours = best_time(lambda: load_model(folder, dtype=dtype, device=args.device),
                                args.repeats)
    hf_load, hf = best_time(
        lambda: transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype).to(args.device).eval(), args.repeats)
    hf.generation_config.eos_token_id = None  # fixed-length runs: every row makes N tokens

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    engine = RolloutEngine(ours, max_new_tokens=args.new_tokens)

    def run_ours(batch: list[list[int]]) -> list[list[int]]:
        return generate(ours, batch, greedy, engine=engine)

    def run_hf(batch: list[list[int]]) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = hf.generate(ids.to(args.device), attention_mask=mask.to(args.device),
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=pad_id)
        return out[:, width:].tolist()

    rows = []
    ratios: dict[str, float] = {"load_speedup": hf_load / ours_load}
    for batch_size in (1, 8):
        batch = prompts[:batch_size]
        run_ours(batch[:1])  # warm-up
        run_hf(batch[:1])
        ours_time, ours_out = best_time(lambda: run_ours(batch), args.repeats)
        hf_time, hf_out = best_time(lambda: run_hf(batch), args.repeats)
        tokens = batch_size * args.new_tokens
        same = sum(a == b for a, b in zip(ours_out, hf_out))
        rows.append((batch_size, tokens / ours_time, tokens / hf_time, f"{same}/{batch_size}"))
        ratios[f"decode_speedup_b{batch_size}"] = hf_time / ours_time

    print(f"model: {folder}  device: {args.device}  dtype: {args.dtype}  "
          f"threads: {torch.get_num_threads()}  new tokens: {args.new_tokens}  "
          f"best of {args.repeats}")
    print(f"{'measure':<26}{'rba':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'load time (s)':<26}{ours_load:>12.3f}{hf_load:>14.3f}"
          f"{ratios['load_speedup']:>8.2f}")
    for batch_size, ours_tps, hf_tps, same in rows:
        label = f"tokens/s, batch {batch_size}"
        print(f"{label:<26}{ours_tps:>12.1f}{hf_tps:>14.1f}"
              f"{ratios[f'decode_speedup_b{batch_size}']:>8.2f}   identical replies: {same}")
    print("ratios > 1: rba faster (load: transformers time / rba time; tokens/s: rba / "
          "transformers); generation time includes the prompt prefill")
    print(json.dumps({key: round(value, 3) for key, value in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
