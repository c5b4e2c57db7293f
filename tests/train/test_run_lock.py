"""One training run per output folder: a second run on a folder a live run holds is refused,
naming that run (through the API and as one line of `rba train`), on every rank together for
a torchrun launch; a run killed with SIGKILL leaves a lock the next run takes over, saying
so; and in a two-node launch only global rank 0 holds the lock.

The torchrun tests launch this file as the worker script.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_torchrun
from rba_core.errors import ConfigError

SETTINGS = ["run.progress=false", "run.plot=false", "run.max_epochs=0", "run.device=cpu",
            "run.dtype=float32"]

# A live training run that waits inside its first loss until RELEASE exists.
HOLDER = """
import sys, time
from pathlib import Path
from rba_core.train import Trainer, TrainerConfig, build_config
from rba_core.train.toy import ToyRegressionTask

out, release = Path(sys.argv[1]), Path(sys.argv[2])

class Waits(ToyRegressionTask):
    def loss(self, batch):
        while not release.exists():
            time.sleep(0.05)
        return super().loss(batch)

config = build_config(TrainerConfig, {}, [f"run.output_dir={out}", "run.max_steps=2",
                                          *sys.argv[3:]])
Trainer(config, Waits(samples=16)).train()
"""


def config(out: Path, *overrides: str):
    from rba_core.train import TrainerConfig, build_config

    return build_config(TrainerConfig, {}, [f"run.output_dir={out}", *SETTINGS, *overrides])


def start_holder(out: Path, release: Path) -> subprocess.Popen:
    """The holder started, once it holds ``out``."""
    from rba_core.train.run_lock import read_holder

    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(release),
                                *SETTINGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while (read_holder(out) or {}).get("pid") != process.pid:
        assert process.poll() is None, process.communicate()[0].decode()[-2000:]
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return process


def test_a_second_run_on_a_live_runs_folder_is_refused_naming_it(tmp_path, capsys):
    from rba_core.cli import main
    from rba_core.train import Trainer, read_metrics
    from rba_core.train.run_lock import read_holder
    from rba_core.train.toy import ToyRegressionTask

    out, release = tmp_path / "run", tmp_path / "release"
    holder = start_holder(out, release)
    try:
        with pytest.raises(ConfigError, match=f"run.output_dir {out} is in use by another "
                                              f"training run \\(pid {holder.pid} on "):
            Trainer(config(out, "run.max_steps=2"), ToyRegressionTask(samples=16)).train()
        # `rba train` is refused before it loads any model, in one line.
        start = time.perf_counter()
        assert main(["train", f"run.output_dir={out}", "run.device=cpu"]) == 2
        assert time.perf_counter() - start < 10
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"pid {holder.pid}" in err and "choose another run.output_dir" in err
    finally:
        release.touch()
        output = holder.communicate(timeout=120)[0].decode()
    assert holder.returncode == 0, output[-2000:]
    # The live run was left alone: its metrics hold each step once.
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    # Released cleanly: nothing left for the next run to take over.
    assert read_holder(out) is None
    Trainer(config(out, "run.max_steps=3"), ToyRegressionTask(samples=16)).train()


def test_a_killed_runs_lock_is_taken_over_with_a_message(tmp_path, caplog):
    from rba_core.train import Trainer
    from rba_core.train.toy import ToyRegressionTask

    out = tmp_path / "run"
    holder = start_holder(out, tmp_path / "never")
    holder.kill()  # SIGKILL: no handler runs, the lock file keeps its details
    holder.wait(timeout=60)
    with caplog.at_level("WARNING", logger="rba.train"):
        result = Trainer(config(out, "run.max_steps=2"), ToyRegressionTask(samples=16)).train()
    assert result.step == 2
    assert any(f"taking over the lock of a run that ended without releasing it (killed?): "
               f"pid {holder.pid} on " in record.getMessage() for record in caplog.records)


def test_every_rank_is_refused_together_while_another_run_holds_the_folder(tmp_path):
    from rba_core.train import DistInfo
    from rba_core.train.run_lock import run_lock

    import torch

    out = tmp_path / "run"
    # This process holds the folder; a torchrun launch on it must fail on both ranks, not
    # leave rank 1 waiting for a rank 0 that gave up.
    with run_lock(out, DistInfo(0, 1, 0, torch.device("cpu"))):
        run_torchrun(__file__, "refused", str(out), timeout=180)
    for rank in (0, 1):
        message = (out / f"refused-{rank}.txt").read_text()
        assert f"is in use by another training run (pid {os.getpid()} on " in message


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_take_one_lock_held_by_global_rank_0(tmp_path):
    from rba_core.train import read_metrics

    out = tmp_path / "run"
    port = _free_port()
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    # Two "nodes" of one process each sharing the output folder: both ranks are local rank 0.
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
         __file__, "two_nodes", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for node in (0, 1)]
    outputs = [node.communicate(timeout=240)[0].decode() for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    seen = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["local_rank"] for s in seen] == [0, 0]
    assert all(s["holder"] == seen[0]["pid"] for s in seen)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def worker(mode: str, out: Path) -> None:
    from rba_core.train import Trainer, init_distributed, shutdown
    from rba_core.train.run_lock import read_holder
    from rba_core.train.toy import ToyRegressionTask

    info = init_distributed("cpu")

    class Records(ToyRegressionTask):
        def on_step_end(self, step, record):
            (out / f"rank-{info.rank}.json").write_text(json.dumps({
                "pid": os.getpid(), "local_rank": info.local_rank,
                "holder": (read_holder(out) or {}).get("pid")}))

    try:
        Trainer(config(out, "run.max_steps=2"), Records(samples=16), dist_info=info).train()
    except ConfigError as error:
        if mode != "refused":
            raise
        (out / f"refused-{info.rank}.txt").write_text(str(error))
    finally:
        shutdown(info)
    if mode == "refused":
        assert (out / f"refused-{info.rank}.txt").is_file(), "the run was not refused"


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
