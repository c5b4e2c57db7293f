"""One TRL GRPOTrainer step with TRL's own loss, with Liger-Kernel's and with rba's, same run.

    python bench/trl_backend.py [--threads 1] [--steps 6] [--beta 0.04] [--model DIR]

trl.GRPOTrainer (TRL 1.16) on the SmolLM2-135M-Instruct that `rba prepare` converts: 1 prompt x
8 generations x 64 new tokens (EOS suppressed, so every completion is 64 tokens), full
fine-tune, float32, CPU, loss grpo, beta 0.04 (a frozen reference model; TRL's default
bias-corrected KL), clip eps 0.2, temperature 1, AdamW at lr 1e-6, gradient clipping at 1,
TRL's default gradient checkpointing, one reward (distinct words / words). Only the loss differs:

  trl          trl.GRPOTrainer as it is: log-probs from TRL 1.16's chunked fused LM head.
  trl+liger    TRL's own Liger switch, GRPOConfig(use_liger_kernel=True). In 1.16 it swaps only
               Liger's Triton layer kernels (RMSNorm, RoPE, SwiGLU), not the loss, and they need
               a GPU: on the CPU the row says how it failed.
  liger        Liger's chunked loss, LigerFusedLinearGRPOLoss (plain PyTorch, torch.compile'd,
               one sequence per chunk), on the backbone's hidden states and the LM head, plugged
               in where TRL's former use_liger_loss path plugged it (the loss method, here
               _compute_loss); the reference log-probs stay TRL's, as they were there.
  rba          rba_core.integrations.trl.RbaGRPOTrainer: rba's fused policy loss, and rba's
               fused log-probs for the reference.

Each side runs in its own subprocess (`--side`), so its peak RSS (getrusage ru_maxrss at the
child's end) is its own; all children get the same thread settings. Seconds per step are the
median of steps 2..N (step 1 compiles and warms up). Prints a table; the last line is one JSON
object with the ratios rba / peer (lower is better).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from sides import (  # bench/sides.py, beside this script
    PROMPT, completion_texts, cpu_grpo_config, distinct_word_ratio, peak_rss_mib, run_side, timed,
    trl_step_timer,
)

SIDES = ("trl", "trl+liger", "liger", "rba")


def trl_reward(completions, **kwargs) -> list[float]:
    """The one reward every side gets (TRL's reward signature)."""
    return [distinct_word_ratio(text) for text in completion_texts(completions)]


def trainer_class(side: str):
    """The GRPOTrainer (sub)class a side runs."""
    from trl import GRPOTrainer

    if side == "rba":
        from rba_core.integrations.trl import RbaGRPOTrainer

        return RbaGRPOTrainer
    if side != "liger":
        return GRPOTrainer
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    class LigerLossGRPOTrainer(GRPOTrainer):
        """Liger's chunked GRPO loss at the loss method (TRL's former compute_liger_loss)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.liger_loss = LigerFusedLinearGRPOLoss(
                beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                temperature=self.temperature, use_ref_model=self.beta != 0.0,
                loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                use_bias_correction_kl=self.args.use_bias_correction_kl)

        def _compute_loss(self, model, inputs):
            lm = self.accelerator.unwrap_model(model)
            completion_ids = inputs["completion_ids"]
            hidden = lm.base_model(
                input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]],
                                         dim=1),
                use_cache=False).last_hidden_state[:, -completion_ids.size(1) - 1:-1]
            head = lm.get_output_embeddings()
            loss, _ = self.liger_loss(
                hidden, head.weight, completion_ids, inputs["completion_mask"],
                inputs["advantages"], bias=head.bias,
                ref_per_token_logps=inputs.get("ref_per_token_logps"),
                old_per_token_logps=inputs.get("old_per_token_logps"))
            return loss / self.current_gradient_accumulation_steps

    return LigerLossGRPOTrainer


def child(args) -> dict:
    """One side's training run; returns its per-step records and peak RSS."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    from rba_core.weights.prepare import DEFAULT_LLM, resolve_model_dir

    torch.set_num_threads(args.threads)
    folder = resolve_model_dir(args.model, DEFAULT_LLM, "--model")
    records: list[dict] = []
    phase: dict[str, float] = {}

    def on_step(total: float, cpu: float) -> None:
        records.append({"step_s": total, "cpu_s": cpu, "prepare_s": phase.get("prepare", 0.0),
                        "update_s": total - phase.get("prepare", 0.0)})
        print(f"{args.side} step {len(records)}: {total:.2f} s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as out:
        config = cpu_grpo_config(out, group=args.group, new_tokens=args.new_tokens,
                                 beta=args.beta, steps=args.steps,
                                 use_liger_kernel=args.side == "trl+liger")
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT}]}]
                                    * args.steps)
        try:
            trainer = trainer_class(args.side)(
                model=str(folder), reward_funcs=trl_reward, args=config,
                train_dataset=dataset, processing_class=tokenizer,
                callbacks=[trl_step_timer(phase, on_step)])
            torch.set_num_threads(args.threads)
            # Generation, rewards and the reference pass are _generate_and_score_completions;
            # what remains of a step is the loss forward and backward and the optimizer.
            trainer._generate_and_score_completions = timed(
                phase, "prepare", trainer._generate_and_score_completions)
            trainer.train()
        except (ImportError, RuntimeError) as exc:
            # TRL's Liger switch fails where its Triton kernels cannot run: that is its row.
            if args.side != "trl+liger":
                raise
            return {"na": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}",
                    "trl_version": trl.__version__}
    return {"steps": records, "trl_version": trl.__version__, "threads": torch.get_num_threads(),
            "peak_rss_mib": peak_rss_mib()}


def run_child(args, side: str) -> dict:
    cmd = ["--side", side, "--threads", str(args.threads), "--steps", str(args.steps),
           "--beta", str(args.beta), "--group", str(args.group), "--new-tokens",
           str(args.new_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    result = run_side(__file__, cmd, threads=args.threads, label=side)
    if "steps" in result:
        steps = result["steps"][1:] or result["steps"]
        result["summary"] = {key: statistics.median(s[key] for s in steps)
                             for key in steps[0]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="LLM folder (default: the prepared "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / OpenMP threads of every child (default 1)")
    parser.add_argument("--steps", type=int, default=6,
                        help="steps per side; the median is over steps 2..N")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--group", type=int, default=8, help="generations per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(child(args)))
        return 0

    import torch
    import transformers

    load_start = os.getloadavg()
    started = time.time()
    results = {side: run_child(args, side) for side in args.sides}
    load_end = os.getloadavg()
    trl_version = next(iter(results.values()))["trl_version"]
    print(f"TRL GRPOTrainer step, 1 chat prompt x {args.group} generations x {args.new_tokens} "
          f"new tokens, {args.model or 'SmolLM2-135M-Instruct'} full fine-tune, float32, CPU, "
          f"{args.threads} thread(s) per side, loss grpo, beta {args.beta:g}, median of steps "
          f"2-{args.steps}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl_version}; {os.cpu_count()} cores, load average {load_start[0]:.1f} at start, "
          f"{load_end[0]:.1f} at end; {(time.time() - started) / 60:.1f} min")
    ours = results.get("rba", {})
    header = ("loss", "s/step", "CPU s/step", "generate+score s", "update s", "peak RSS MiB",
              "rba time / this", "rba RSS / this")
    rows, notes = [], []
    ratios: dict[str, object] = {}
    for side, run in results.items():
        if "summary" not in run:
            rows.append((side, "n/a", *[""] * (len(header) - 2)))
            notes.append(f"{side}: {run['na']}")
            continue
        s = run["summary"]
        time_ratio = rss_ratio = ""
        if side != "rba" and "summary" in ours:
            t = ours["summary"]["step_s"] / s["step_s"]
            m = ours["peak_rss_mib"] / run["peak_rss_mib"]
            time_ratio, rss_ratio = f"{t:.2f}", f"{m:.3f}"
            ratios[f"rba_vs_{side}_time"] = round(t, 3)
            ratios[f"rba_vs_{side}_update_time"] = round(
                ours["summary"]["update_s"] / s["update_s"], 3)
            ratios[f"rba_vs_{side}_peak_rss"] = round(m, 4)
        ratios[f"{side}_s_per_step"] = round(s["step_s"], 3)
        ratios[f"{side}_peak_rss_mib"] = round(run["peak_rss_mib"], 1)
        rows.append((side, f"{s['step_s']:.2f}", f"{s['cpu_s']:.2f}", f"{s['prepare_s']:.2f}",
                     f"{s['update_s']:.2f}", f"{run['peak_rss_mib']:.0f}", time_ratio,
                     rss_ratio))
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, width)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |")
    for note in notes:
        print(note)
    print("generate+score: HF generate, rewards and the reference log-probs; update: the loss "
          "forward and backward, clipping and AdamW (where the sides differ, bar rba's "
          "reference pass).")
    ratios.update({"threads": args.threads, "trl_version": trl_version,
                   "torch": torch.__version__, "load_average_start": round(load_start[0], 2),
                   "load_average_end": round(load_end[0], 2)})
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
