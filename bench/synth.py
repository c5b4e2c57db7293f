"""Throughput of `rba synth`'s stages on the CPU, on the converted SmolLM2-135M-Instruct.

    python bench/synth.py [--num 16] [--instruction-tokens 48] [--response-tokens 48]

(a) Magpie instructions: samples/s of the rollout engine (groups of 8 sharing the prefix, all
    groups in one batch, as `rba synth` runs) against a loop that generates one sample at a
    time with `rba_core.rollout.generate` (same model, sampling settings and stop ids);
(b) responses: greedy answers to NUM instructions, one batched rollout call against the
    one-prompt-at-a-time loop;
(c) TTS: espeak-ng clips/s (synthesis, 16 kHz resampling, loudness, FLAC) with one worker and
    with the pipeline's thread pool; piper one at a time when it is installed.
Prints a table; the last line is one JSON object of the measured ratios.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=16, help="samples per stage (default: 16)")
    parser.add_argument("--instruction-tokens", type=int, default=48)
    parser.add_argument("--response-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rba_core.rollout import SamplingConfig, generate
    from rba_core.synth import RolloutTeacher, make_backend, normalize_for_speech, postprocess
    from rba_core.synth.pipeline import GROUP_SIZE, stable_seed
    from rba_core.synth.teacher import magpie_prefix
    from rba_core.synth.tts import write_flac

    teacher = RolloutTeacher.load()
    tokenizer, model = teacher.tokenizer, teacher.model
    stop_ids = list(tokenizer.stop_ids)
    prefix = tokenizer.encode(magpie_prefix(tokenizer))
    groups = [("", stable_seed("bench", g)) for g in range(-(-args.num // GROUP_SIZE))]
    n_instr = len(groups) * GROUP_SIZE
    rows = []

    def count_tokens(ids_lists) -> int:
        return sum(len(ids) for ids in ids_lists)

    # (a) instructions
    def batched_instructions():
        return teacher.user_turns(groups, GROUP_SIZE, max_new_tokens=args.instruction_tokens,
                                  temperature=0.8, top_p=0.95, system=None)

    def looped_instructions():
        sampling = SamplingConfig(max_new_tokens=args.instruction_tokens, temperature=0.8,
                                  top_p=0.95, stop_ids=tuple(stop_ids))
        return [generate(model, [prefix], sampling, seed=i)[0]
                for i in range(n_instr)]

    batched_instructions()  # warm-up: cache allocation
    t_batch, samples = timed(batched_instructions)
    t_loop, loop_ids = timed(looped_instructions)
    batch_texts = [gen.text for row in samples for gen in row]
    batch_tokens = sum(len(tokenizer.encode(text)) + 1 for text in batch_texts)
    rows.append(("instructions", "rollout engine (batched)", n_instr, t_batch, batch_tokens))
    rows.append(("instructions", "one at a time", n_instr, t_loop, count_tokens(loop_ids)))

    # (b) responses to the first NUM instructions
    instructions = [text or "Tell me a fun fact." for text in batch_texts[: args.num]]
    seeds = list(range(len(instructions)))

    def batched_responses():
        return teacher.respond(instructions, seeds, max_new_tokens=args.response_tokens)

    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": m}]))
               for m in instructions]

    def looped_responses():
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.response_tokens,
                                stop_ids=tuple(stop_ids))
        return [generate(model, [p], greedy)[0]
                for p in prompts]

    t_batch_r, replies = timed(batched_responses)
    t_loop_r, loop_replies = timed(looped_responses)
    reply_tokens = sum(len(tokenizer.encode(r.text)) + int(r.ended) for r in replies)
    rows.append(("responses", "rollout engine (batched)", len(prompts), t_batch_r, reply_tokens))
    rows.append(("responses", "one at a time", len(prompts), t_loop_r,
                 count_tokens(loop_replies)))

    # (c) TTS
    texts = [normalize_for_speech(text) for text in instructions]
    espeak = make_backend("espeak")
    folder = Path(tempfile.mkdtemp(prefix="bench-synth-"))

    def speak(backend, item):
        i, text = item
        voice = backend.draw(random.Random(i), backend.voices())
        write_flac(folder / f"{backend.name}-{i}.flac", postprocess(*backend.synthesize(text,
                                                                                      voice)))

    t_tts1, _ = timed(lambda: [speak(espeak, item) for item in enumerate(texts)])
    with ThreadPoolExecutor(max_workers=2) as pool:
        t_tts2, _ = timed(lambda: list(pool.map(lambda item: speak(espeak, item),
                                                enumerate(texts))))
    rows.append(("tts espeak-ng", "1 worker", len(texts), t_tts1, 0))
    rows.append(("tts espeak-ng", "2 workers", len(texts), t_tts2, 0))
    piper_rate = None
    try:
        piper = make_backend("piper")
    except Exception:  # noqa: BLE001 - piper is optional; its absence only drops a row
        piper = None
    if piper is not None:
        speak(piper, (0, "Warm up the voice."))
        t_piper, _ = timed(lambda: [speak(piper, item) for item in enumerate(texts[:4])])
        rows.append(("tts piper", "1 worker", 4, t_piper, 0))
        piper_rate = 4 / t_piper

    print(f"{'stage':<15} {'method':<26} {'samples':>7} {'seconds':>8} {'samples/s':>10} "
          f"{'tokens/s':>9}")
    for stage, method, n, seconds, tokens in rows:
        tok = f"{tokens / seconds:9.1f}" if tokens else f"{'-':>9}"
        print(f"{stage:<15} {method:<26} {n:7d} {seconds:8.2f} {n / seconds:10.2f} {tok}")
    ratios = {
        "instructions_batched_over_loop_samples_per_s": round(t_loop / t_batch, 2),
        "responses_batched_over_loop_samples_per_s": round(t_loop_r / t_batch_r, 2),
        "espeak_2_workers_over_1": round(t_tts1 / t_tts2, 2),
        "espeak_clips_per_s_over_instructions_per_s": round(
            (len(texts) / t_tts2) / (n_instr / t_batch), 2),
    }
    if piper_rate is not None:
        ratios["piper_clips_per_s"] = round(piper_rate, 2)
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
