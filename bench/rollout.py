"""Shared-prefix rollout engine against the unshared way, on the converted SmolLM2-135M.

    python bench/rollout.py [--model FOLDER] [--groups 4 8] [--prompt-len 256] [--new-tokens 64]

(a) group rollouts: tokens/s of RolloutEngine.generate against transformers' generate with
    num_return_sequences=G (same weights, dtype, threads, sampling settings, fixed length),
    medians of interleaved repeats;
(b) K/V memory of the shared layout against one prompt copy per sample;
(c) scoring G continuations against G independent full forwards;
(d) a training forward + backward with and without the shared prefix.
Prints a table; the last line is one JSON object of the measured ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median wall times (seconds) of two functions after one warm-up each, run alternately so
    that load from other processes on a shared machine hits both alike."""
    first()
    second()
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def make_prompt(folder, length: int) -> torch.Tensor:
    from rba_core.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    text = ("Explain, step by step and with examples, how a speech model can learn to follow "
            "spoken instructions as well as its text teacher does. ")
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(text)
    return torch.tensor(ids[:length], dtype=torch.long)


def rollout_part(args, G, P, T, prompt, engine, sampling, hf, add, ratios) -> None:
    """(a) tokens/s against transformers generate, (b) K/V bytes."""
    # No stop ids and min_new_tokens on the peer: both produce exactly T tokens per sample.
    def ours():
        batch = engine.generate([prompt], G, sampling, seeds=[0])
        assert int(batch.lengths.min()) == T

    def theirs():
        with torch.no_grad():
            out = hf.generate(prompt[None], do_sample=True, temperature=0.8, top_k=50,
                              top_p=0.95, max_new_tokens=T, min_new_tokens=T,
                              num_return_sequences=G, pad_token_id=0)
        assert out.shape == (G, P + T)
    if hf is not None:
        ours_s, hf_s = timed_pair(ours, theirs, args.repeats)
    else:
        ours_s, _ = timed_pair(ours, lambda: None, args.repeats)
    add(f"(a) rollout G={G}", "rba shared-prefix", f"{G * T / ours_s:.1f} tok/s",
        f"{ours_s:.2f} s")
    if hf is not None:
        add(f"(a) rollout G={G}", "transformers generate",
            f"{G * T / hf_s:.1f} tok/s", f"{hf_s:.2f} s")
        ratios[f"rollout_g{G}_vs_transformers"] = round(hf_s / ours_s, 3)

    # (b) K/V memory: the formula, and the bytes the engine actually allocated.
    shared, unshared = engine.kv_memory([P], G, T)
    cache = engine.cache
    allocated = sum(t.numel() * t.element_size() for t in
                    (cache.prefix_k, cache.prefix_v, cache.suffix_k, cache.suffix_v))
    add(f"(b) K/V memory G={G}", "shared / unshared",
        f"{shared / 2**20:.1f} / {unshared / 2**20:.1f} MiB",
        f"allocated {allocated / 2**20:.1f} MiB")
    ratios[f"kv_memory_g{G}_shared_over_unshared"] = round(allocated / unshared, 4)
    ratios[f"kv_memory_g{G}_formula"] = round((P + G * T) / (G * (P + T)), 4)


def scoring_part(args, G, P, T, prompt, model, engine, add, ratios) -> None:
    """(c) scoring G continuations against G full forwards."""
    from rba_core.kernels import fused_linear_logprobs

    continuations = torch.randint(0, model.config.vocab_size, (1, G, T))
    lengths = torch.full((1, G), T)

    def score_shared():
        engine.score([prompt], continuations, lengths)

    def score_full():
        with torch.no_grad():
            sequences = torch.cat([prompt.expand(G, P), continuations[0]], dim=1)
            hidden = model(sequences, return_hidden=True)[:, P - 1: P + T - 1]
            fused_linear_logprobs(hidden, model.lm_head_weight, continuations[0])
    shared_s, full_s = timed_pair(score_shared, score_full, args.repeats)
    add(f"(c) scoring G={G}", "shared prefill / G full forwards",
        f"{shared_s:.2f} / {full_s:.2f} s", f"x{full_s / shared_s:.2f}")
    ideal = G * (P + T) / (P + G * T)
    ratios[f"scoring_g{G}_speedup"] = round(full_s / shared_s, 3)
    ratios[f"token_saving_g{G}_ideal"] = round(ideal, 3)


def training_part(args, G, P, T, prompt, model, add, ratios) -> None:
    """(d) training forward + backward with and without the shared prefix."""
    from rba_core.kernels import fused_linear_logprobs
    from rba_core.rollout import shared_prefix_logprobs

    continuations = torch.randint(0, model.config.vocab_size, (1, G, T))
    lengths = torch.full((1, G), T)
    # All weights trainable, as in full fine-tuning.
    model.requires_grad_(True)

    def train_shared():
        scores = shared_prefix_logprobs(model, [prompt], continuations, lengths)
        scores.logprobs.sum().backward()
        model.zero_grad(set_to_none=True)

    def train_full():
        sequences = torch.cat([prompt.expand(G, P), continuations[0]], dim=1)
        hidden = model(sequences, return_hidden=True)[:, P - 1: P + T - 1]
        fused_linear_logprobs(hidden, model.lm_head_weight, continuations[0]).sum().backward()
        model.zero_grad(set_to_none=True)
    tshared_s, tfull_s = timed_pair(train_shared, train_full, args.repeats)
    model.requires_grad_(False)
    add(f"(d) train fwd+bwd G={G}", "shared prefix / unshared",
        f"{tshared_s:.2f} / {tfull_s:.2f} s", f"x{tfull_s / tshared_s:.2f}")
    ratios[f"train_g{G}_speedup"] = round(tfull_s / tshared_s, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="converted model folder (default: the "
                        "default LLM `rba prepare` converts)")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--parts", default="abcd", help="which of the parts a-d to run")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rba_core.weights.loading import load_model
    from rba_core.rollout import RolloutEngine, SamplingConfig
    from rba_core.weights.prepare import DEFAULT_LLM, resolve_model_dir

    folder = resolve_model_dir(args.model, DEFAULT_LLM, "--model")
    model = load_model(folder, dtype=torch.float32)
    P, T = args.prompt_len, args.new_tokens
    prompt = make_prompt(folder, P)
    sampling = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=T)
    engine = RolloutEngine(model, max_prompt_len=P, max_new_tokens=T)
    hf = None
    if not args.skip_transformers and "a" in args.parts:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    rows: list[tuple[str, str, str, str]] = []

    def add(*row: str) -> None:
        rows.append(row)
        print("  " + "  ".join(row), file=sys.stderr, flush=True)

    ratios: dict[str, float] = {}
    print(f"model {folder}, prompt {P} tokens, {T} new tokens, float32, "
          f"{torch.get_num_threads()} threads, device cpu")

    if "a" in args.parts:
        # Paid again whenever the weights change (each RL step), not in the timings below.
        from rba_core.models.packed import PackedProjections

        start = time.perf_counter()
        PackedProjections(model)
        add("(a) packed weight copies", "built once per weight change",
            f"{time.perf_counter() - start:.2f} s", "not in the rollout times")
    for G in args.groups:
        if "a" in args.parts or "b" in args.parts:
            rollout_part(args, G, P, T, prompt, engine, sampling, hf, add, ratios)
        if "c" in args.parts:
            scoring_part(args, G, P, T, prompt, model, engine, add, ratios)
        if "d" in args.parts:
            training_part(args, G, P, T, prompt, model, add, ratios)

    width = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("case", "compared", "value", "note")
    width = [max(w, len(h)) for w, h in zip(width, header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, width)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
