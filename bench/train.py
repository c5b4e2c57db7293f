"""Training throughput of a KD step: fused kernels against the unfused reference, same run.

    python bench/train.py [--tiny] [--batch-size 4] [--response-tokens 64] [--steps 3]

Both variants run the real trainer loop (rba_core.train.Trainer: autocast, AdamW, clipping)
on the same synthetic batches and the same SpeechLM weights:
  fused:   FusedAudioAdapter + fused_linear_distill_loss (no [N, V] logits)
  unfused: AudioAdapter (eager reference) + eager KL over materialised logits
and each fused kernel alone, to attribute the difference.
Uses the default Whisper tiny.en + SmolLM2-135M when `rba prepare` has converted them,
otherwise (or with --tiny) a tiny random SpeechLM. Throughput counts response tokens (the
tokens the loss is taken over). Prints a table; the last line is one JSON object of ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def tiny_model_dirs(root: Path) -> tuple[Path, Path]:
    """A random 2-layer Llama (with a word-level ChatML tokenizer) and a 1-layer Whisper."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from rba_core.weights.safetensors_io import save_pretrained
    from rba_core.models.llama import LlamaConfig, LlamaForCausalLM
    from rba_core.models.whisper import WhisperConfig, WhisperEncoder

    llm_dir, encoder_dir = root / "llm", root / "encoder"
    llm_dir.mkdir(parents=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + ["<unk>", "user", "assistant"])}
    for i in range(2000):
        vocab[f"w{i}"] = len(vocab)
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(llm_dir / "tokenizer.json"))
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")
    (llm_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": template}))
    llm_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                  "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    llm = LlamaForCausalLM(LlamaConfig.from_dict(llm_config))
    save_pretrained(llm_dir, llm.state_dict(), llm_config, kind="full")
    encoder_config = {"model_type": "whisper", "d_model": 32, "encoder_layers": 1,
                      "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 80,
                      "max_source_positions": 1500}
    encoder = WhisperEncoder(WhisperConfig.from_dict(encoder_config))
    save_pretrained(encoder_dir, {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                    encoder_config, kind="full")
    return encoder_dir, llm_dir


def synthetic_batches(count: int, batch_size: int, seconds: float, response_tokens: int,
                      vocab: int, n_mels: int, seed: int) -> list:
    """Speech batches of the collated layout with random log-mels and token ids (the step's
    cost does not depend on what the audio says)."""
    from rba_core.data.speech import SpeechBatch

    generator = torch.Generator().manual_seed(seed)
    frames = int(seconds * 100)
    batches = []
    for index in range(count):
        ids = torch.randint(10, vocab, (batch_size, response_tokens), generator=generator)

        def words(n: int) -> list[list[int]]:
            return torch.randint(10, vocab, (batch_size, n), generator=generator).tolist()

        batches.append(SpeechBatch(
            ids=[f"b{index}-{b}" for b in range(batch_size)], rows=[{}] * batch_size,
            features=torch.randn(batch_size, n_mels, frames, generator=generator),
            frame_lengths=torch.full((batch_size,), frames, dtype=torch.long),
            prompt_before=words(12), prompt_after=words(6), teacher_prompt_ids=words(40),
            response_ids=ids, response_mask=torch.ones_like(ids, dtype=torch.bool)))
    return batches


class KDBench:
    """A TrainTask over fixed batches: KD of the SpeechLM against its own LLM."""

    def __init__(self, speechlm, batches: list, fused: bool) -> None:
        self.speechlm, self.batches, self.fused = speechlm, batches, fused
        self.teacher, _ = speechlm.load_teacher()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.speechlm.trainable_parameters()

    def train_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> list:
        return self.batches

    def loss(self, batch):
        from rba_core.tasks.distill import kd_loss

        return kd_loss(self.speechlm, self.teacher, batch.to(self.speechlm.device),
                       fused=self.fused)


def with_adapter(speechlm, fused: bool):
    """The same SpeechLM with the fused adapter or the unfused reference, same weights."""
    from rba_core.kernels import AudioAdapter, FusedAudioAdapter

    cls = FusedAudioAdapter if fused else AudioAdapter
    adapter = cls(speechlm.adapter.config, device=speechlm.device,
                  dtype=speechlm.adapter.ln_pre.weight.dtype)
    adapter.load_state_dict(speechlm.adapter.state_dict())
    speechlm.adapter = adapter
    return speechlm


def measure(speechlm, batches, fused_adapter: bool, fused_loss: bool, warmup: int, out: Path,
            device: str) -> dict:
    from rba_core.train import Trainer, TrainerConfig, build_config, read_metrics

    task = KDBench(with_adapter(speechlm, fused_adapter), batches, fused_loss)
    steps = len(batches)
    config = build_config(TrainerConfig, {}, [
        f"run.output_dir={out}", f"run.max_steps={steps}", "run.max_epochs=0",
        "run.checkpoint_every=0", "run.progress=false", "run.plot=false", "run.log_every=1",
        f"run.device={device}", "run.resume=never", "optim.lr=1e-4"])
    on_gpu = torch.cuda.is_available() and device != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    Trainer(config, task).train()
    records = read_metrics(out / "metrics.jsonl")[warmup:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None}


# (name, fused adapter, fused loss): the two ends, and each kernel alone for attribution.
VARIANTS = (("fused", True, True), ("unfused", False, False),
            ("adapter-only", True, False), ("loss-only", False, True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="use a tiny random SpeechLM")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="audio length per clip")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate fused/unfused this many times (median over rounds)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    from rba_core.models.speechlm import SpeechLM
    from rba_core.train.distributed import pick_device
    from rba_core.weights.prepare import DEFAULT_ENCODER, DEFAULT_LLM, default_model_dir

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder_dir = default_model_dir(DEFAULT_ENCODER)
        llm_dir = default_model_dir(DEFAULT_LLM)
        models = f"{DEFAULT_ENCODER} + {DEFAULT_LLM}"
        if args.tiny or not ((encoder_dir / "config.json").is_file()
                             and (llm_dir / "config.json").is_file()):
            encoder_dir, llm_dir = tiny_model_dirs(root / "models")
            models = "tiny random"
        torch.manual_seed(0)
        speechlm = SpeechLM.from_pretrained(encoder_dir, llm_dir, device=device)
        batches = synthetic_batches(args.warmup + args.steps, args.batch_size, args.seconds,
                                    args.response_tokens, speechlm.llm.config.vocab_size,
                                    speechlm.n_mels, seed=0)
        initial = {k: v.clone() for k, v in speechlm.adapter.state_dict().items()}
        results: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
        for round_index in range(args.rounds):
            for name, fused_adapter, fused_loss in VARIANTS:
                # Every variant starts from the same adapter weights.
                speechlm.adapter.load_state_dict(initial)
                results[name].append(measure(speechlm, batches, fused_adapter, fused_loss,
                                             args.warmup, root / f"{name}-{round_index}",
                                             str(device.type)))
    speed = {name: statistics.median(r["tokens_per_s"] for r in runs)
             for name, runs in results.items()}
    peaks = {name: runs[-1]["peak_mib"] for name, runs in results.items()}
    print(f"KD training step on {models}, {device}; batch {args.batch_size} x "
          f"{args.seconds:g} s audio, {args.response_tokens} response tokens; "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s)")
    print(f"{'variant':<13} {'adapter':<8} {'loss':<8} {'tokens/s':>10} {'vs unfused':>11} "
          f"{'peak MiB':>9}")
    for name, fused_adapter, fused_loss in VARIANTS:
        peak = "-" if peaks[name] is None else f"{peaks[name]:.0f}"
        print(f"{name:<13} {'fused' if fused_adapter else 'eager':<8} "
              f"{'fused' if fused_loss else 'eager':<8} {speed[name]:>10.1f} "
              f"{speed[name] / speed['unfused']:>10.2f}x {peak:>9}")
    ratios = {"kd_step_tokens_per_s_fused_over_unfused": speed["fused"] / speed["unfused"],
              "adapter_only_over_unfused": speed["adapter-only"] / speed["unfused"],
              "loss_only_over_unfused": speed["loss-only"] / speed["unfused"],
              "fused_tokens_per_s": speed["fused"], "unfused_tokens_per_s": speed["unfused"],
              "models": models, "device": str(device)}
    if peaks["fused"] is not None and peaks["unfused"]:
        ratios["peak_memory_fused_over_unfused"] = peaks["fused"] / peaks["unfused"]
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
