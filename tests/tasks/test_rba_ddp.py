"""``torchrun --nproc_per_node=2`` (gloo): RBA's step on two ranks, each rolling out half of the
spoken prompts, takes the same steps as one process on all of them (the dapo loss is a mean
over the global active tokens). The test launches this file as the torchrun worker script."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from helpers import ROWS, run_torchrun, write_dataset, write_tiny_encoder, write_tiny_llm

SETTINGS = ["task=rba", "rba.group_size=2", "rba.max_new_tokens=4", "rba.beta=0.05",
            "rba.inner_epochs=2", "run.max_steps=3", "run.max_epochs=0", "run.device=cpu",
            "run.dtype=float32", "run.progress=false", "run.plot=false", "seed=3",
            "schedule.kind=constant", "schedule.warmup_steps=1", "optim.lr=1e-2",
            "optim.eps=1.0"]


def run(root: Path, output: Path, batch_size: int) -> list[torch.Tensor]:
    from rba_core.tasks import build_task, build_task_config
    from rba_core.train import Trainer
    from rba_core.train.distributed import full_tensor

    config = build_task_config({}, [
        *SETTINGS, f"model.encoder={root / 'encoder'}", f"model.llm={root / 'llm'}",
        f"data.dir={root / 'data'}", f"data.batch_size={batch_size}",
        f"run.output_dir={output}"])
    torch.manual_seed(0)
    task = build_task(config, torch.device("cpu"))
    Trainer(config, task).train()
    return [full_tensor(p.detach()).clone() for p in task.trainable_parameters()]


def worker(root: Path) -> None:
    from rba_core.train import init_distributed, shutdown

    info = init_distributed("cpu")
    weights = run(root, root / "ranks", batch_size=1)
    if info.rank == 0:
        torch.save(weights, root / "ranks.pt")
    shutdown(info)


def test_two_ranks_equal_one_process_on_the_combined_prompts(tmp_path):
    write_tiny_encoder(tmp_path / "encoder")
    write_tiny_llm(tmp_path / "llm")
    write_dataset(tmp_path / "data", ROWS * 2)
    run_torchrun(__file__, str(tmp_path))
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    single = run(tmp_path, tmp_path / "single", batch_size=2)
    torch.manual_seed(0)
    from rba_core.tasks import build_task, build_task_config

    start = build_task(build_task_config({}, [
        *SETTINGS, f"model.encoder={tmp_path / 'encoder'}", f"model.llm={tmp_path / 'llm'}",
        f"data.dir={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'start'}"]),
        torch.device("cpu")).trainable_parameters()
    for got, want, initial in zip(ranks, single, start):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, initial.detach())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
