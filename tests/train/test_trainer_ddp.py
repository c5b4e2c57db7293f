"""``torchrun --nproc_per_node=2`` (gloo): two ranks on half batches take the same steps as one
process on the combined batch, with data-parallel all-reduce and with FSDP2 sharding (including
a resume from a sharded checkpoint), a NaN on one rank skips the step on both, and the SpeechLM's
token-weighted SFT matches too, replicated and with its layers sharded by FSDP2.

The test launches this file as the torchrun worker script.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from helpers import (ROWS, rba_train, run_torchrun, tiny_speechlm, write_dataset,
                     write_tiny_encoder, write_tiny_llm)

SETTINGS = ["run.progress=false", "run.plot=false", "run.max_epochs=0", "run.device=cpu",
            "run.dtype=float32", "schedule.kind=constant", "schedule.warmup_steps=2",
            "optim.grad_clip=0.5", "optim.weight_decay=0.01", "seed=5"]
POISON = ((0, 1),)
# Padding makes the batched forward differ from the per-row one in the last bits, and Adam's
# first steps are nearly sign(gradient), which would magnify that for gradients near zero;
# a large eps makes the update proportional to the gradient, so the check stays sharp.
SPEECH = ("run.max_steps=2", "optim.lr=1e-2", "optim.eps=1.0")


def make_task(batch_size: int, poison=()):
    from rba_core.train.toy import ToyRegressionTask

    return ToyRegressionTask(samples=32, batch_size=batch_size, dropout=0.0, noise=False,
                             init_seed=1, poison=poison)


def command_args(root: Path) -> list[str]:
    return [f"model.encoder={root / 'encoder'}", f"model.llm={root / 'llm'}",
            f"data.dir={root / 'data'}", "data.batch_size=1", "model.lora_rank=2", "task=kd",
            "run.strategy=fsdp", "run.max_steps=2", "run.max_epochs=0", "run.device=cpu",
            "run.progress=false", "run.plot=false", f"run.output_dir={root / 'cmd'}"]


def write_speech_files(root: Path) -> None:
    write_tiny_llm(root / "llm")
    write_dataset(root / "data", ROWS * 2)


def speech_task(root: Path, batch_size: int):
    from rba_core.data.speech import SpeechDataset
    from rba_core.tasks.distill import SpeechDistillTask

    torch.manual_seed(0)
    speechlm = tiny_speechlm(root / "llm")
    dataset = SpeechDataset(root / "data", "train", speechlm.tokenizer)
    return SpeechDistillTask(speechlm, dataset, task="sft", batch_size=batch_size)


def run(output: Path, task, *overrides: str):
    from rba_core.train import Trainer, TrainerConfig, build_config

    config = build_config(TrainerConfig, {},
                          [*SETTINGS, f"run.output_dir={output}", *overrides])
    return Trainer(config, task).train()


def trained(task) -> list[torch.Tensor]:
    from rba_core.train.distributed import full_tensor

    return [full_tensor(p.detach()).clone() for p in task.trainable_parameters()]


def worker(out: Path) -> None:
    from rba_core.train import init_distributed, shutdown
    from rba_core.train.distributed import barrier

    info = init_distributed("cpu")
    results = {}

    task = make_task(4)
    summary = run(out / "ddp", task, "run.max_steps=4")
    results["ddp"] = (trained(task), summary.skipped_steps)

    # FSDP: two steps, then a fresh sharded task resumes from the whole-tensor checkpoint;
    # a save after every step must leave the live sharded optimizer state untouched.
    run(out / "fsdp", make_task(4), "run.max_steps=2", "run.strategy=fsdp",
        "run.checkpoint_every=1")
    task = make_task(4)
    summary = run(out / "fsdp", task, "run.max_steps=4", "run.strategy=fsdp",
                  "run.checkpoint_every=1")
    results["fsdp"] = (trained(task), summary.skipped_steps)

    task = make_task(4, poison=POISON if info.rank == 1 else ())
    summary = run(out / "nan", task, "run.max_steps=3")
    results["nan"] = (trained(task), summary.skipped_steps)

    # The SpeechLM's SFT: rows with different response lengths on the two ranks, weighted by
    # tokens, must give the per-token mean over the combined batch; also with its encoder and
    # LLM layers sharded by FSDP2. Rank 0 writes the model and data files first.
    if info.rank == 0:
        write_speech_files(out)
        write_tiny_encoder(out / "encoder")
    barrier(info)
    task = speech_task(out, batch_size=1)
    summary = run(out / "speech", task, *SPEECH)
    results["speech"] = (trained(task), summary.skipped_steps)
    task = speech_task(out, batch_size=1)
    summary = run(out / "speech-fsdp", task, *SPEECH, "run.strategy=fsdp")
    results["speech-fsdp"] = (trained(task), summary.skipped_steps)

    # `rba train` with LoRA inside the FSDP-sharded layers: the exported adapter is whole.
    assert rba_train(command_args(out)) == 0

    if info.rank == 0:
        torch.save(results, out / "results.pt")
        (out / "world.json").write_text(json.dumps({"world_size": info.world_size}))
    shutdown(info)


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    run_torchrun(__file__, str(tmp_path))
    assert json.loads((tmp_path / "world.json").read_text()) == {"world_size": 2}
    results = torch.load(tmp_path / "results.pt", weights_only=True)

    expected = {}
    for name, steps, poison in (("ddp", 4, ()), ("fsdp", 4, ()), ("nan", 3, POISON)):
        task = make_task(8, poison=poison)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore" if poison else "error", "step .*update skipped",
                                    RuntimeWarning)
            summary = run(tmp_path / f"single-{name}", task, f"run.max_steps={steps}")
        expected[name] = (trained(task), summary.skipped_steps)
    speech = speech_task(tmp_path, batch_size=2)
    speech_start = trained(speech)
    summary = run(tmp_path / "single-speech", speech, *SPEECH)
    expected["speech"] = expected["speech-fsdp"] = (trained(speech), summary.skipped_steps)
    start = trained(make_task(8))

    from rba_core.models.speechlm import SpeechLM
    from rba_core.train import checkpoint as ckpt

    exported = SpeechLM.from_pretrained(tmp_path / "encoder", tmp_path / "llm",
                                        tmp_path / "cmd" / "adapter")
    params = exported.trainable_parameters()
    assert any("lora" in name for name, p in exported.named_parameters() if p.requires_grad)
    saved = ckpt.read_params(ckpt.latest_checkpoint(tmp_path / "cmd"),
                             [tuple(p.shape) for p in params])
    for got, want in zip(params, saved):
        assert torch.equal(got.detach(), want)

    for name, initial_weights in (("ddp", start), ("fsdp", start), ("nan", start),
                                  ("speech", speech_start), ("speech-fsdp", speech_start)):
        got, skipped = results[name]
        want, want_skipped = expected[name]
        assert skipped == want_skipped == (1 if name == "nan" else 0), name
        assert len(got) == len(want)
        for a, b, initial in zip(got, want, initial_weights):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
            assert not torch.equal(a, initial), f"{name}: weights did not move"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
