"""One GRPO step of rba's RL step against TRL's GRPOTrainer, same run, same process set-up.

    python bench/rl_step.py [--threads 1] [--steps 6] [--betas 0.04 0] [--trl-gc both]
                            [--speech-data DIR] [--skip-trl] [--skip-speech]

Text mode, on the SmolLM2-135M-Instruct that `rba prepare` converts: 1 prompt x G=8 samples x
64 new tokens (no stop tokens on either side, so every completion is exactly 64 tokens), full
fine-tune, float32, CPU, temperature 1, top-k 0, top-p 1, clip eps 0.2 / 0.2, AdamW at lr 1e-6
with gradient clipping at 1.0, at beta 0.04 (a frozen reference model) and beta 0. Both sides
score completions with the same reward function, ``distinct_word_ratio`` below (distinct words
/ words), as a GRPO sequence reward.

  rba: RLStep from rba_core.tasks.rba on our LlamaForCausalLM (shared-prefix rollouts, fused
       policy loss), driven by the loop a trainer step runs (loss, backward, clip, AdamW).
  trl: trl.GRPOTrainer on the transformers model of the same folder, timed by a
       TrainerCallback (on_step_begin / on_step_end). TRL runs with gradient checkpointing on
       (its default: leaner, slower) and off (faster, more memory); the headline ratios take
       TRL's better setting for each measure (its fastest for time, its leanest for memory).

Then the speech task at its packaged default config (rba_core/tasks/configs/rba.yaml: 4 spoken
prompts x 4 rollouts x 48 tokens, dense teacher reward, the packaged adapter) through the real
trainer on a small `rba synth --task qa` dataset (synthesized into a temp folder unless
--speech-data names one).

Every measurement runs in its own subprocess (`--side rba|trl|speech`), so each peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at its end) is that side's alone; all children get the
same thread settings. Seconds per step are the median of steps 2..N (step 1 is warm-up); CPU
seconds per step (the process's user + system time) are shown too, since on a shared machine
wall time also counts waiting for a core. Prints a table; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file is ``__main__``; registering it under its own name lets the RL
# step import the reward below as "rl_step:reward_fn" without executing the file twice.
sys.modules.setdefault("rl_step", sys.modules[__name__])

from sides import (  # noqa: E402 (bench/sides.py, beside this script)
    PROMPT, THREAD_ENV, completion_texts, cpu_grpo_config, cpu_seconds, distinct_word_ratio,
    peak_rss_mib, run_side, timed, trl_step_timer,
)


# ---------------------------------------------------------------------------- the reward
def reward_fn(rows, responses, group):
    """rba's external reward signature (rows, decoded responses, group index)."""
    return [distinct_word_ratio(text) for text in responses]


def trl_reward(completions, **kwargs):
    """TRL's reward signature; conversational prompts give completions as message lists."""
    return [distinct_word_ratio(text) for text in completion_texts(completions)]


# ---------------------------------------------------------------------------- helpers
def current_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def llm_folder(given: str | None) -> Path:
    from rba_core.weights.prepare import DEFAULT_LLM, resolve_model_dir

    return resolve_model_dir(given, DEFAULT_LLM, "--model")


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def summarize(steps: list[dict]) -> dict:
    """Medians over steps 2..N of every timed field of the per-step records."""
    keys = [k for k in steps[0] if isinstance(steps[0][k], (int, float))]
    return {k: median_after_warmup([s[k] for s in steps]) for k in keys}


# ---------------------------------------------------------------------------- children
def side_rba(args) -> dict:
    """rba's text-mode RL step, driven as one trainer step is."""
    import copy

    import torch

    from rba_core.data.tokenizer import Tokenizer
    from rba_core.seeding import stable_seed
    from rba_core.tasks.rba import RBAConfig, RewardWeights, RLStep, TextPrompts
    from rba_core.weights.loading import load_model

    folder = llm_folder(args.model)
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_pretrained(folder)
    policy = load_model(folder, dtype=torch.float32)
    policy.train()
    policy.requires_grad_(True)
    # pi_ref: a frozen copy of the whole policy (full fine-tune), only when beta > 0, as TRL.
    reference = (copy.deepcopy(policy).eval().requires_grad_(False) if args.beta > 0 else None)
    prompt = torch.tensor(tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True)), dtype=torch.long)
    config = RBAConfig(
        group_size=args.group, max_new_tokens=args.new_tokens, temperature=1.0, top_k=0,
        top_p=1.0, beta=args.beta, loss_type=args.loss_type, eps_low=0.2, eps_high=0.2,
        rewards=RewardWeights(dense=0.0, external=1.0), external_reward="rl_step:reward_fn")
    # No stop ids: every sample is new_tokens long, as TRL's (min_new_tokens) are.
    step = RLStep(policy, policy, config, stop_ids=[],
                  decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                  reference=reference)
    prompts = TextPrompts(ids=[prompt], teacher=[prompt], rows=[{}])
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    loaded_rss = current_rss_mib()
    records = []
    for index in range(args.steps):
        wall, cpu = time.perf_counter(), cpu_seconds()
        experience, stats = step.rollout(prompts, seeds=[stable_seed(0, index)])
        start = time.perf_counter()
        loss, metrics = step.loss(prompts, experience)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_s = time.perf_counter() - start
        records.append({
            "step_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
            "rollout_s": stats.rollout_s, "scoring_s": stats.scoring_s, "update_s": update_s,
            "tokens": int(experience.lengths.sum())})
        print(f"rba beta={args.beta} step {index + 1}: {records[-1]['step_s']:.2f} s",
              file=sys.stderr, flush=True)
    return {"steps": records, "prompt_tokens": int(prompt.numel()),
            "rss_after_load_mib": loaded_rss}


def side_trl(args) -> dict:
    """TRL's GRPOTrainer on the same folder, CPU float32, one generation batch per step."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    folder = llm_folder(args.model)
    records: list[dict] = []
    phase: dict[str, float] = {}

    def on_step(total: float, cpu: float) -> None:
        records.append({
            "step_s": total, "cpu_s": cpu, "rollout_s": phase.get("generate", 0.0),
            "scoring_s": phase.get("prepare", 0.0) - phase.get("generate", 0.0),
            "update_s": total - phase.get("prepare", 0.0), "tokens": phase.get("tokens", 0.0)})
        print(f"trl beta={args.beta} gc={args.trl_gc} step {len(records)}: {total:.2f} s",
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as out:
        config = cpu_grpo_config(
            out, group=args.group, new_tokens=args.new_tokens, beta=args.beta,
            steps=args.steps, loss_type=args.loss_type, epsilon_high=0.2,
            gradient_checkpointing=args.trl_gc == "on")
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        dataset = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": PROMPT}]}] * args.steps)
        trainer = GRPOTrainer(model=str(folder), reward_funcs=trl_reward, args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[trl_step_timer(phase, on_step)])
        torch.set_num_threads(args.threads)  # in case anything above changed it

        # The step's parts: generation (HF generate of G copies of the prompt, plus decoding),
        # then the rest of _generate_and_score_completions (reference log-probs, rewards,
        # advantages); what remains of the step is the loss forward, backward and optimizer.
        prepare = timed(phase, "prepare", trainer._generate_and_score_completions)

        def counted_prepare(*a, **k):
            result = prepare(*a, **k)
            phase["tokens"] = float(result["completion_mask"].sum())
            return result

        trainer._generate = timed(phase, "generate", trainer._generate)
        trainer._generate_and_score_completions = counted_prepare
        prompt_tokens = len(tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
            return_dict=False))
        loaded_rss = current_rss_mib()
        trainer.train()
    return {"steps": records, "prompt_tokens": prompt_tokens, "rss_after_load_mib": loaded_rss,
            "trl_version": trl.__version__}


def side_speech(args) -> dict:
    """The speech task at its packaged config, through the real trainer."""
    import torch

    import rba_core
    from rba_core.tasks import build_task, load_task_config
    from rba_core.train import Trainer, read_metrics, seed_everything

    package = Path(rba_core.__file__).resolve().parent
    adapter = package / "assets" / "speechlm-default"
    with tempfile.TemporaryDirectory() as out:
        config = load_task_config(package / "tasks" / "configs" / "rba.yaml", [
            f"data.dir={args.speech_data}", f"model.adapter={adapter}",
            f"run.output_dir={out}", f"run.max_steps={args.steps}", "run.max_epochs=0",
            "run.checkpoint_every=0", "run.progress=false", "run.plot=false",
            "run.log_every=1", "run.device=cpu", "run.resume=never"])
        seed_everything(config.seed)
        task = build_task(config, torch.device("cpu"))
        loaded_rss = current_rss_mib()
        cpu = cpu_seconds()
        Trainer(config, task).train()
        cpu = cpu_seconds() - cpu
        metrics = read_metrics(Path(out) / "metrics.jsonl")
    records = []
    for m in metrics:
        step_s = 1.0 / m["steps_per_s"]
        records.append({"step_s": step_s, "rollout_s": m["rollout_s"],
                        "scoring_s": m["scoring_s"],
                        "update_s": step_s - m["rollout_s"] - m["scoring_s"],
                        "tokens": m.get("response_length", 0.0) * config.data.batch_size
                        * config.rba.group_size,
                        "response_length": m.get("response_length", 0.0),
                        "stopped_share": m.get("stopped_share", 0.0)})
    return {"steps": records, "rss_after_load_mib": loaded_rss, "cpu_s_total": cpu,
            "config": {"prompts": config.data.batch_size, "group_size": config.rba.group_size,
                       "max_new_tokens": config.rba.max_new_tokens,
                       "loss_type": config.rba.loss_type, "beta": config.rba.beta,
                       "rows": len(task.dataset)}}


def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = {"rba": side_rba, "trl": side_trl, "speech": side_speech}[args.side](args)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------- driver
def run_child(args, side: str, **extra) -> dict:
    cmd = ["--side", side, "--threads", str(args.threads), "--steps", str(args.steps),
           "--group", str(args.group), "--new-tokens", str(args.new_tokens),
           "--loss-type", args.loss_type]
    if args.model:
        cmd += ["--model", args.model]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    label = " ".join([side, *(f"{k}={v}" for k, v in extra.items())])
    result = run_side(__file__, cmd, threads=args.threads, label=label)
    result["summary"] = summarize(result["steps"])
    return result


def synthesize(folder: Path, threads: int) -> None:
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(threads)
    cmd = ["rba", "synth", "--task", "qa", "--num", "8", "--out", str(folder),
           "--batch-size", "32", "--max-instruction-tokens", "40", "--max-words", "25",
           "--max-response-tokens", "48", "--no-progress"]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="LLM folder (default: the prepared "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / OpenMP threads of every child (default 1: on a shared "
                             "machine more threads wait on descheduled peers)")
    parser.add_argument("--steps", type=int, default=6,
                        help="steps per side; the median is over steps 2..N")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.04, 0.0])
    parser.add_argument("--group", type=int, default=8, help="generations per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--loss-type", default="grpo", choices=("grpo", "dapo"))
    parser.add_argument("--trl-gc", default="both", choices=("both", "on", "off"),
                        help="TRL's gradient checkpointing (its default is on)")
    parser.add_argument("--speech-data", default=None,
                        help="an `rba synth` dataset for the speech row (default: synthesize "
                             "8 spoken questions into a temp folder)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-speech", action="store_true")
    parser.add_argument("--skip-text", action="store_true", help="only the speech row")
    parser.add_argument("--side", choices=("rba", "trl", "speech"), help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.04, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        if args.side == "trl" and args.trl_gc == "both":
            args.trl_gc = "on"
        return child(args)

    import torch
    import transformers

    llm_folder(args.model)  # fails early, with instructions, when the model is not prepared
    load_start = os.getloadavg()
    results: dict[tuple, dict] = {}
    gcs = [] if args.skip_trl else (["off", "on"] if args.trl_gc == "both" else [args.trl_gc])
    started = time.time()
    if args.skip_text:
        args.betas = []
    for beta in args.betas:
        results[("rba", beta, None)] = run_child(args, "rba", beta=beta)
        for gc in gcs:
            results[("trl", beta, gc)] = run_child(args, "trl", beta=beta, trl_gc=gc)
    speech = None
    if not args.skip_speech:
        with tempfile.TemporaryDirectory() as tmp:
            data = args.speech_data
            if data is None:
                data = str(Path(tmp) / "data")
                synthesize(Path(data), args.threads)
            speech = run_child(args, "speech", speech_data=data)
    load_end = os.getloadavg()
    minutes = (time.time() - started) / 60

    trl_version = next((r["trl_version"] for r in results.values() if "trl_version" in r),
                       None)
    first = next(iter(results.values()), speech)
    prompt_tokens = sorted({r["prompt_tokens"] for r in results.values()})
    print(f"RL step, text mode: {'/'.join(map(str, prompt_tokens)) or '-'}-token chat prompt x "
          f"{args.group} samples x {args.new_tokens} new tokens, SmolLM2-135M-Instruct full "
          f"fine-tune, float32, CPU, {first['threads']} thread(s) per side, loss "
          f"{args.loss_type}, median of steps 2-{args.steps}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl_version or '-'}; {os.cpu_count()} cores, load average {load_start[0]:.1f} "
          f"at start, {load_end[0]:.1f} at end; {minutes:.1f} min")
    header = ("side", "beta", "s/step", "CPU s/step", "rollout s", "scoring s", "update s",
              "peak RSS MiB", "TRL s / ours", "ours / TRL RSS")
    rows = []
    ratios: dict[str, float] = {}
    for beta in args.betas:
        ours = results[("rba", beta, None)]
        trl_runs = {gc: results[("trl", beta, gc)] for gc in gcs}
        fastest = min(trl_runs.values(), key=lambda r: r["summary"]["step_s"], default=None)
        leanest = min(trl_runs.values(), key=lambda r: r["peak_rss_mib"], default=None)
        for name, run in [("rba", ours)] + [(f"trl (grad ckpt {gc})", r)
                                            for gc, r in trl_runs.items()]:
            s = run["summary"]
            time_ratio = rss_ratio = "-"
            if name.startswith("trl"):
                time_ratio = f"{s['step_s'] / ours['summary']['step_s']:.2f}x"
                rss_ratio = f"{ours['peak_rss_mib'] / run['peak_rss_mib']:.2f}"
            rows.append((name, f"{beta:g}", f"{s['step_s']:.2f}", f"{s['cpu_s']:.2f}",
                         f"{s['rollout_s']:.2f}", f"{s['scoring_s']:.2f}",
                         f"{s['update_s']:.2f}", f"{run['peak_rss_mib']:.0f}", time_ratio,
                         rss_ratio))
        key = f"beta{beta:g}"
        ratios[f"rba_s_per_step_{key}"] = round(ours["summary"]["step_s"], 3)
        ratios[f"rba_peak_rss_mib_{key}"] = round(ours["peak_rss_mib"], 1)
        for gc, run in trl_runs.items():
            ratios[f"trl_gc_{gc}_s_per_step_{key}"] = round(run["summary"]["step_s"], 3)
            ratios[f"trl_gc_{gc}_peak_rss_mib_{key}"] = round(run["peak_rss_mib"], 1)
        if fastest is not None:
            ratios[f"rl_step_vs_trl_time_{key}"] = round(
                fastest["summary"]["step_s"] / ours["summary"]["step_s"], 3)
            ratios[f"rl_step_vs_trl_cpu_time_{key}"] = round(
                min(r["summary"]["cpu_s"] for r in trl_runs.values())
                / ours["summary"]["cpu_s"], 3)
            ratios[f"rl_step_vs_trl_peak_rss_{key}"] = round(
                ours["peak_rss_mib"] / leanest["peak_rss_mib"], 3)
    if speech is not None:
        s = speech["summary"]
        c = speech["config"]
        rows.append((f"rba speech ({c['prompts']}x{c['group_size']}x{c['max_new_tokens']})",
                     f"{c['beta']:g}", f"{s['step_s']:.2f}", "-", f"{s['rollout_s']:.2f}",
                     f"{s['scoring_s']:.2f}", f"{s['update_s']:.2f}",
                     f"{speech['peak_rss_mib']:.0f}", "-", "-"))
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, width)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |")
    print("rollout: sampling (rba: shared-prefix engine; TRL: HF generate of G prompt copies); "
          "scoring: the reference log-probs (and the teacher's when a reward reads them, which "
          "this one does not); update: loss forward, backward, clip, AdamW. "
          "TRL's best setting per measure gives the ratios in the JSON.")
    if speech is not None:
        s = speech["summary"]
        print(f"speech: packaged rba.yaml (dense teacher reward, loss {c['loss_type']}), "
              f"{c['rows']} synthesized clips, mean response {s['response_length']:.1f} of "
              f"{c['max_new_tokens']} tokens, {100 * s['stopped_share']:.0f}% stopped at EOS; "
              "times from the trainer's metrics (update = step - rollout - scoring)")
        ratios.update({"speech_s_per_step": round(s["step_s"], 3),
                       "speech_rollout_s": round(s["rollout_s"], 3),
                       "speech_scoring_s": round(s["scoring_s"], 3),
                       "speech_update_s": round(s["update_s"], 3),
                       "speech_peak_rss_mib": round(speech["peak_rss_mib"], 1)})
    headline = f"beta{args.betas[0]:g}" if args.betas else None
    if f"rl_step_vs_trl_time_{headline}" in ratios:
        ratios = {"rl_step_vs_trl_time": ratios[f"rl_step_vs_trl_time_{headline}"],
                  "rl_step_vs_trl_peak_rss": ratios[f"rl_step_vs_trl_peak_rss_{headline}"],
                  **ratios}
    ratios.update({"threads": first["threads"], "trl_version": trl_version,
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "load_average_start": round(load_start[0], 2),
                   "load_average_end": round(load_end[0], 2)})
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
