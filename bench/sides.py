"""What the benches that pit rba against TRL share: the prompt and reward both sides get, one
child process per side (so each side's peak RSS is its own, with the same thread settings),
and the per-step timer TRL's trainer is measured with."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("Explain in a few sentences why the sky is blue, and give one everyday example of "
          "the same effect.")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
REPO = Path(__file__).resolve().parents[1]


def distinct_word_ratio(text: str) -> float:
    """The shared reward: distinct words / words (0 for an empty answer). Cheap and
    deterministic, so no side's step time depends on a reward model."""
    words = text.lower().split()
    return len(set(words)) / len(words) if words else 0.0


def completion_texts(completions) -> list[str]:
    """TRL's completions as text (conversational prompts give message lists)."""
    return [c if isinstance(c, str) else c[-1]["content"] for c in completions]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_side(script: str, args: list[str], *, threads: int, label: str) -> dict:
    """``python SCRIPT ARGS`` with every thread pool at ``threads``; its last stdout line
    parsed as JSON. Its stderr passes through; a failure names the side."""
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(threads)
    print(f"[{time.strftime('%H:%M:%S')}] {label} (load {os.getloadavg()[0]:.1f})",
          file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env,
                          stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{Path(script).name}: the {label} child failed with exit status "
                         f"{proc.returncode}; its stderr is above")
    return json.loads(lines[-1])


def trl_step_timer(phase: dict[str, float], on_step):
    """A TrainerCallback that clears ``phase`` and notes the wall and CPU clocks when a step
    begins, and calls ``on_step(wall_s, cpu_s)`` when it ends (the methods the bench wraps add
    their own durations to ``phase`` in between)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            phase.clear()
            phase["wall"], phase["cpu"] = time.perf_counter(), cpu_seconds()

        def on_step_end(self, targs, state, control, **kwargs):
            on_step(time.perf_counter() - phase["wall"], cpu_seconds() - phase["cpu"])

    return StepTimer()


def timed(phase: dict[str, float], key: str, method):
    """``method`` wrapped to add its wall seconds to ``phase[key]`` (a TRL step's parts)."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        phase[key] = phase.get(key, 0.0) + time.perf_counter() - start
        return result

    return wrapper


def cpu_grpo_config(out: str, *, group: int, new_tokens: int, beta: float, steps: int,
                    **options):
    """TRL's GRPOConfig for one CPU float32 step per generation batch: ``group`` completions
    of exactly ``new_tokens`` (EOS suppressed until then), temperature 1, no top-k / top-p,
    clip 0.2, AdamW at lr 1e-6, gradient clipping at 1, nothing logged or saved; ``options``
    add or override fields (loss type, gradient checkpointing, TRL's Liger switch, ...)."""
    import torch
    from trl import GRPOConfig

    fields = dict(
        output_dir=out, use_cpu=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=group, num_generations=group,
        gradient_accumulation_steps=1, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=1.0, top_k=0, top_p=1.0, beta=beta, loss_type="grpo", epsilon=0.2,
        learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, shuffle_dataset=False, seed=0)
    fields.update(options)
    return GRPOConfig(**fields)
