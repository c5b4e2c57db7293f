"""Builders and stand-ins that more than one test module uses: tiny random models saved as
Hugging Face folders (an LLM with a ChatML word-level tokenizer, a Whisper encoder), the tiny
SpeechLM, a dataset folder in the synthesis contract's layout, a tone-generating TTS, the
killed-then-resumed SpeechLM run and the `rba train` runner.

Test modules import these as ``from helpers import ...``: tests/ is on sys.path because
tests/conftest.py lives there and no test folder has an ``__init__.py``. Fixtures built on
them live in conftest.py; no test module imports another.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import soundfile
import torch

# rba_core is imported inside each helper, so that conftest (which imports this module) and the
# tests that need none of it still load while one library module is broken or being moved.
if TYPE_CHECKING:
    from rba_core.models.lora import LoraConfig
    from rba_core.models.speechlm import SpeechLM
    from rba_core.train import TrainerConfig

# Fresh random inputs on every run, yet any failure reproduces: conftest prints the seed in
# the header and RBA_TEST_SEED=<seed> replays it.
SESSION_SEED = int(os.environ.get("RBA_TEST_SEED", random.SystemRandom().randrange(2**31)))

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "rba_core" / "tasks" / "configs"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# ------------------------------------------------------------------ tiny models and data
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("what is the capital of france paris answer translate audio into french question "
         "briefly hello world red green blue one two three yes no it sky color say").split()
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
HIDDEN = 32


def write_tiny_llm(folder: Path, words=WORDS, *, seed: int = 0, padded_rows: int = 0) -> Path:
    """A random 2-layer Llama with a ChatML word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    from rba_core.models.llama import LlamaConfig, LlamaForCausalLM
    from rba_core.weights.safetensors_io import save_pretrained

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in ("<unk>", "user", "assistant", "system", ".", ",", "?", *words):
        vocab.setdefault(word, len(vocab))
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": len(vocab) + padded_rows, "hidden_size": HIDDEN,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    with torch.no_grad():
        # Smaller embeddings than N(0, 1) keep the tied head's logits in a trainable range.
        model.model.embed_tokens.weight.mul_(0.3)
        # At the default init, random attention is nearly uniform, so a prefix can barely steer
        # a frozen random LLM; sharper attention makes it as steerable as a trained one.
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.mul_(3.0)
    torch.random.set_rng_state(generator_state)
    save_pretrained(folder, model.state_dict(), config, kind="full")
    return folder


def write_tiny_encoder(folder: Path) -> Path:
    """A random 1-layer Whisper encoder (d_model 16), saved as an HF folder."""
    from rba_core.models.whisper import WhisperConfig, WhisperEncoder
    from rba_core.weights.safetensors_io import save_pretrained

    config = {"model_type": "whisper", "d_model": 16, "encoder_layers": 1,
              "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80,
              "max_source_positions": 1500}
    encoder = WhisperEncoder(WhisperConfig.from_dict(config))
    save_pretrained(folder, {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                    config, kind="full")
    return folder


def tiny_speechlm(folder: Path, *, lora: LoraConfig | None = None) -> SpeechLM:
    """The tiny LLM of ``folder`` (written there if missing) with a random encoder and adapter."""
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.kernels.audio_adapter import AudioAdapterConfig, FusedAudioAdapter
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.models.speechlm import SpeechLM
    from rba_core.models.whisper import WhisperConfig, WhisperEncoder

    if not (folder / "config.json").is_file():
        write_tiny_llm(folder)
    encoder = WhisperEncoder(WhisperConfig(d_model=16, encoder_layers=1,
                                           encoder_attention_heads=2, encoder_ffn_dim=32,
                                           num_mel_bins=80, max_source_positions=1500)).eval()
    adapter = FusedAudioAdapter(AudioAdapterConfig(encoder_dim=16, llm_dim=HIDDEN,
                                                   hidden_dim=48, stack_factor=8))
    llm = LlamaForCausalLM.from_pretrained(folder)
    return SpeechLM(encoder, adapter, llm, Tokenizer.from_pretrained(folder), lora=lora)


def random_wave(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    tone = np.sin(2 * np.pi * rng.uniform(150, 900) * t) * rng.uniform(0.2, 0.6)
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def write_long_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A 16-bit mono WAV of ``seconds`` of silence written as a sparse file: hours of audio
    for a header and a truncate, taking no disk space and no time."""
    data = int(seconds * rate) * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
              + b"data" + struct.pack("<I", data))
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + data)
    return path


ROWS = [
    {"instruction": "what is the capital of france ?", "prompt": "",
     "response": "paris is the capital of france ."},
    {"instruction": "say hello world", "prompt": "", "response": "hello world ."},
    {"instruction": "what color is the sky ?", "prompt": "answer the question briefly .",
     "response": "blue ."},
]


def write_dataset(folder: Path, rows=ROWS, *, seed: int = 0, split: str = "train") -> Path:
    """A dataset folder in the synthesis contract's layout with FLAC clips of tones."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, row in enumerate(rows):
        seconds = 0.5 + 0.15 * index
        audio = f"audio/{index:05d}.flac"
        soundfile.write(folder / audio, random_wave(seconds, rng), 16000)
        lines.append(json.dumps({
            "id": f"s{seed}-{index}", "task": "instruct", "audio": audio, "duration": seconds,
            "sample_rate": 16000, "voice": {"engine": "espeak", "voice": "en"}, "teacher": "tiny",
            "tts": "espeak", "seed": seed, "split": split, "response_truncated": False, **row}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------ the tiny SpeechLM
def speech_features(slm: SpeechLM, seconds=(0.9, 0.45)):
    """Log-mel features of random tones of the given lengths, drawn from the test's seed."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    return slm.features([random_wave(s, rng) for s in seconds])


def response_logits(slm: SpeechLM, features, lengths):
    """Logits of two fixed responses (the second padded after 3 tokens) after a speech prompt."""
    from rba_core.data.prompts import student_messages

    before, after = slm.split_prompt(student_messages({"instruction": ""}))
    ids = torch.tensor([slm.tokenizer.encode("paris is blue ."),
                        slm.tokenizer.encode("hello . a b")])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        hidden = slm.response_hidden(features, lengths, [before] * 2, [after] * 2, ids, mask)
        return torch.nn.functional.linear(hidden, slm.llm.lm_head_weight), mask


def randomize_lora(slm: SpeechLM) -> None:
    """Non-zero LoRA B matrices, so the adapters change the LLM's output."""
    from rba_core.models.lora import lora_modules

    with torch.no_grad():
        for module in lora_modules(slm.llm).values():
            module.lora_B.normal_(0, 0.2)


# ------------------------------------------------------------------ training runs
class Killed(Exception):
    """Stands in for the process dying mid-run."""


def speech_config(models, output: Path, *overrides: str) -> TrainerConfig:
    """A CPU training config (of the task the overrides name, default kd) over the
    ``tiny_models`` fixture's encoder, LLM and data."""
    from rba_core.tasks import build_task_config

    return build_task_config({}, [
        f"model.encoder={models['encoder']}", f"model.llm={models['llm']}",
        f"data.dir={models['data']}", "data.batch_size=2", f"run.output_dir={output}",
        "run.progress=false", "run.plot=false", "run.max_epochs=0", "run.device=cpu",
        "optim.lr=3e-3", *overrides])


def adapter_weights(task) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.trainable_parameters()]


def killed_then_resumed(config: TrainerConfig, *, die_on_call: int):
    """The SpeechLM task of ``config`` (built after seeding 0) trained until its loss is
    called the ``die_on_call``-th time, where the process "dies"; then a fresh task (seeded
    differently: the checkpoint must overwrite it) resumed to the end. Returns that task."""
    from rba_core.tasks import build_task
    from rba_core.train import Trainer

    torch.manual_seed(0)
    dying = build_task(config, torch.device("cpu"))
    real_loss, calls = dying.loss, []

    def dies(batch):
        calls.append(1)
        if len(calls) == die_on_call:
            raise Killed
        return real_loss(batch)

    dying.loss = dies
    with pytest.raises(Killed):
        Trainer(config, dying).train()
    torch.manual_seed(123)
    resumed = build_task(config, torch.device("cpu"))
    Trainer(config, resumed).train()
    return resumed


def rba_train(argv: list[str]) -> int:
    """`rba train ARGV` in this process; returns the command's exit status."""
    from rba_core.commands import train

    parser = argparse.ArgumentParser(prog="rba")
    train.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *argv])
    return args.handler(args)


# ------------------------------------------------------------------ synthesis
class ToneTTS:
    """A TTS engine that speaks a tone at the voice's pitch, 40 ms a word; text containing
    "failnow" fails."""

    name = "tone"

    def identifier(self):
        return "tone 1"

    def voices(self):
        return ["a+1", "a+2", "b+1", "b+2"]

    def draw(self, rng, voices):
        from rba_core.synth import Voice

        return Voice("tone", rng.choice(voices), 1.0, float(rng.randint(100, 300)))

    def synthesize(self, text, voice):
        if "failnow" in text:
            from rba_core.synth import SynthesisFailed

            raise SynthesisFailed("scripted failure")
        rate = 22050
        t = np.arange(int(rate * 0.04 * len(text.split()))) / rate
        return (0.3 * np.sin(2 * np.pi * voice.pitch * t)).astype(np.float32), rate


# ------------------------------------------------------------------ the decode oracle
@torch.no_grad()
def reference_generate(model, prompts, *, max_new_tokens: int, stop_ids=(),
                       use_cache: bool = True, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations by the plainest loop: left-padded prompts through the model's own
    forward, with its flat KVCache or (``use_cache=False``) the whole sequence every step.
    The oracle for the rollout engine, the one decode path of the package."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    stop = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = model.new_kv_cache(len(prompts), width + max_new_tokens) if use_cache else None
    step_ids, step_mask = ids, mask
    for _ in range(max_new_tokens):
        hidden = model(step_ids, attention_mask=step_mask, kv_cache=cache, return_hidden=True)
        token = (hidden[:, -1] @ model.lm_head_weight.T).argmax(-1)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                out[row].append(t)
                done[row] = t in stop
        if all(done):
            break
        if cache is not None:
            step_ids, step_mask = token[:, None], None
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids, step_mask = ids, mask
    return out


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240) -> None:
    """``torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGS`` on the CPU (gloo), one
    thread per rank, with tests/ on the workers' path (for helpers); fails showing the
    workers' output when any rank does."""
    import os
    import subprocess
    import sys

    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir,
                                                        os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def uninterrupted_run(config: TrainerConfig):
    """The task of ``config`` built after seeding 0 (as ``killed_then_resumed`` builds its
    first one) and trained to the end: (task, its trainable weights at the start, result)."""
    from rba_core.tasks import build_task
    from rba_core.train import Trainer

    torch.manual_seed(0)
    task = build_task(config, torch.device("cpu"))
    start = adapter_weights(task)
    return task, start, Trainer(config, task).train()
