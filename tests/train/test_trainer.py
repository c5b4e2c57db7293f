"""The generic trainer on a toy regression task: exact resume, NaN skipping, accumulation,
configuration errors, atomic checkpoints, the logged learning rates and the metrics files."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from helpers import Killed
from rba_core.errors import CheckpointError, ConfigError
from rba_core.files import is_temp_name
from rba_core.train import (
    Trainer,
    TrainerConfig,
    build_config,
    config_to_dict,
    load_config,
    lr_multiplier,
    read_metrics,
)
from rba_core.train import checkpoint as ckpt
from rba_core.train.config import ScheduleConfig
from rba_core.train.metrics import plot_metrics
from rba_core.train.toy import ToyRegressionTask

def make_config(output_dir: Path, *overrides: str) -> TrainerConfig:
    base = [f"run.output_dir={output_dir}", "run.progress=false", "run.plot=false",
            "run.max_epochs=0", "run.device=cpu", "run.dtype=float32"]
    return build_config(TrainerConfig, {}, [*base, *overrides])


def weights(task: ToyRegressionTask) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.model.parameters()]


class DiesAfter(ToyRegressionTask):
    def __init__(self, losses_before_death: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.remaining = losses_before_death

    def loss(self, batch):
        if self.remaining == 0:
            raise Killed
        self.remaining -= 1
        return super().loss(batch)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    # 24 samples / batch 4 = 6 batches = 3 steps of 2 micro-batches per epoch, so 10 steps
    # cross three epoch boundaries; the checkpoint at step 4 sits mid-epoch.
    settings = ["run.max_steps=10", "optim.grad_accum=2", "run.checkpoint_every=4",
                "schedule.warmup_steps=3", "optim.weight_decay=0.01", "optim.grad_clip=0.5",
                "seed=7"]
    reference = ToyRegressionTask(samples=24, init_seed=1)
    Trainer(make_config(tmp_path / "whole", *settings), reference).train()

    dying = DiesAfter(2 * 6 + 1, samples=24, init_seed=1)
    with pytest.raises(Killed):
        Trainer(make_config(tmp_path / "killed", *settings), dying).train()
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step_00000004"

    # A fresh process: the frozen weights load as before, but the trainable ones and every
    # RNG start elsewhere; the checkpoint must restore them all.
    torch.manual_seed(999)
    resumed = ToyRegressionTask(samples=24, init_seed=1)
    with torch.no_grad():
        for param in resumed.trainable_parameters():
            param.copy_(torch.randn_like(param))
    result = Trainer(make_config(tmp_path / "killed", *settings), resumed).train()

    assert result.step == 10
    for got, want in zip(weights(resumed), weights(reference)):
        assert torch.equal(got, want)
    assert resumed.batches_seen == reference.batches_seen == 20
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == list(range(1, 11))
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    again = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in whole]


class TakesTime(ToyRegressionTask):
    """A task on a fake clock: drawing a batch takes ``draw`` seconds (as an RL task's rollout
    does when its batch is drawn) and its loss ``loss_s``."""

    def __init__(self, now: list[float], draw: float = 20.0, loss_s: float = 5.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.now, self.draw, self.loss_s = now, draw, loss_s

    def train_batches(self, epoch, rank, world_size, seed):
        for batch in super().train_batches(epoch, rank, world_size, seed):
            self.now[0] += self.draw
            yield batch

    def loss(self, batch):
        self.now[0] += self.loss_s
        return super().loss(batch)


def test_time_budget_counts_drawing_batches_and_a_resume_spends_what_is_left(tmp_path,
                                                                            monkeypatch):
    import rba_core.train.trainer as trainer_module

    now = [0.0]
    monkeypatch.setattr(trainer_module, "_step_clock", lambda: now[0])
    # 25 s a step: one minute is spent during step 3 (75 s). Counting only the loss (5 s a
    # step) would run 12 steps.
    settings = ["run.max_steps=20", "run.time_budget_minutes=1", "run.checkpoint_every=0"]
    result = Trainer(make_config(tmp_path / "run", *settings),
                     TakesTime(now, samples=16, init_seed=1)).train()
    assert (result.step, result.stopped_by_budget) == (3, True)
    assert result.train_seconds == pytest.approx(75.0)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000003"

    # A larger budget on resume continues from the 75 s spent: 2 minutes stop at step 5.
    # (Replaying the drawn batches is free here, so only the new steps' 25 s count.)
    resumed_task = TakesTime(now, draw=0.0, loss_s=25.0, samples=16, init_seed=1)
    resumed = Trainer(make_config(tmp_path / "run", "run.max_steps=20",
                                  "run.time_budget_minutes=2", "run.checkpoint_every=0"),
                      resumed_task).train()
    assert (resumed.step, resumed.stopped_by_budget) == (5, True)

    # Relaunching the finished run with the same budget takes no step and moves no weight.
    relaunched = TakesTime(now, samples=16, init_seed=1)
    again = Trainer(make_config(tmp_path / "run", "run.max_steps=20",
                                "run.time_budget_minutes=2", "run.checkpoint_every=0"),
                    relaunched).train()
    assert (again.step, again.stopped_by_budget) == (5, True)
    assert relaunched.batches_seen == resumed_task.batches_seen == 5  # restored, none added
    for got, want in zip(weights(relaunched), weights(resumed_task)):
        assert torch.equal(got, want)

    # No budget: max_steps ends the run, and the result says so.
    whole = Trainer(make_config(tmp_path / "whole", "run.max_steps=4", "run.checkpoint_every=0"),
                    TakesTime(now, samples=16, init_seed=1)).train()
    assert (whole.step, whole.stopped_by_budget) == (4, False)


def test_without_resume_the_run_differs(tmp_path):
    # Guards the test above: restarting from scratch after the kill would not match.
    settings = ["run.max_steps=6", "run.checkpoint_every=0", "seed=3"]
    first = ToyRegressionTask(samples=16, init_seed=1)
    Trainer(make_config(tmp_path / "a", *settings), first).train()
    other_seed = ToyRegressionTask(samples=16, init_seed=1)
    Trainer(make_config(tmp_path / "b", "run.max_steps=6", "seed=4"), other_seed).train()
    assert not all(torch.equal(a, b) for a, b in zip(weights(first), weights(other_seed)))


def test_nan_loss_batch_is_skipped_and_reported(tmp_path, caplog):
    settings = ["run.max_steps=3", "schedule.kind=constant", "run.checkpoint_every=0"]
    clean = ToyRegressionTask(samples=16, dropout=0.0, noise=False)
    Trainer(make_config(tmp_path / "one", "run.max_steps=1", "schedule.kind=constant"),
            clean).train()
    after_one = weights(clean)

    poisoned = ToyRegressionTask(samples=16, dropout=0.0, noise=False,
                                 poison=((0, 1), (0, 2)))
    with caplog.at_level(logging.WARNING, logger="rba.train"), \
            pytest.warns(RuntimeWarning, match="update skipped"):
        result = Trainer(make_config(tmp_path / "nan", *settings), poisoned).train()
    assert result.skipped_steps == 2 and result.nonfinite_loss == 2
    for got, want in zip(weights(poisoned), after_one):
        assert torch.equal(got, want)
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]
    assert "loss" in records[0] and "loss" not in records[1]
    assert "update skipped" in caplog.text


class InfiniteGradient(ToyRegressionTask):
    """A finite loss (0) whose gradient is NaN: sqrt at 0."""

    def loss(self, batch):
        loss, metrics = super().loss(batch)
        return torch.sqrt(loss * 0.0), metrics


def test_nonfinite_gradient_is_skipped(tmp_path):
    task = InfiniteGradient(samples=8, dropout=0.0, noise=False)
    before = weights(task)
    with pytest.warns(RuntimeWarning, match="update skipped"):
        result = Trainer(make_config(tmp_path, "run.max_steps=2"), task).train()
    assert result.nonfinite_grad == 2 and result.skipped_steps == 2
    for got, want in zip(weights(task), before):
        assert torch.equal(got, want)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    small = ToyRegressionTask(samples=32, batch_size=4, dropout=0.0, noise=False)
    Trainer(make_config(tmp_path / "accum", "run.max_steps=3", "optim.grad_accum=2"),
            small).train()
    large = ToyRegressionTask(samples=32, batch_size=8, dropout=0.0, noise=False)
    # Batch j of size 8 is not the concatenation of batches 2j, 2j+1 of size 4 in the toy's
    # ordering; feed the large run the same pairs through the same permutation instead.
    large.train_batches = lambda epoch, rank, world, seed: [
        (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), False)
        for a, b in zip(*[iter(small.train_batches(epoch, rank, world, seed))] * 2)]
    Trainer(make_config(tmp_path / "large", "run.max_steps=3"), large).train()
    for got, want in zip(weights(small), weights(large)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class UnevenBatches(ToyRegressionTask):
    """Micro-batches of 2 and 6 rows, each loss a mean over its rows."""

    def train_batches(self, epoch, rank, world_size, seed):
        rows = super().train_batches(epoch, rank, world_size, seed)
        x = torch.cat([r[0] for r in rows])
        y = torch.cat([r[1] for r in rows])
        return [(x[i:i + n], y[i:i + n], False) for i, n in ((0, 2), (2, 6), (8, 2), (10, 6))]



class WeightedUnevenBatches(UnevenBatches):
    """The same, weighted by rows: the step then optimises the mean over all 8 rows."""

    def batch_weight(self, batch):
        return float(len(batch[0]))


def test_batch_weight_makes_accumulation_a_mean_over_the_whole_step(tmp_path):
    settings = ["run.max_steps=2", "optim.grad_accum=2", "optim.grad_clip=0"]
    weighted = WeightedUnevenBatches(samples=16, dropout=0.0, noise=False)
    Trainer(make_config(tmp_path / "w", *settings), weighted).train()
    plain = UnevenBatches(samples=16, dropout=0.0, noise=False)
    Trainer(make_config(tmp_path / "p", *settings), plain).train()

    whole = ToyRegressionTask(samples=16, dropout=0.0, noise=False)
    batches = UnevenBatches(samples=16).train_batches(0, 0, 1, 0)
    whole.train_batches = lambda *args: [
        (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), False)
        for a, b in (batches[:2], batches[2:])]
    Trainer(make_config(tmp_path / "one", "run.max_steps=2", "optim.grad_clip=0"),
            whole).train()
    for got, want in zip(weights(weighted), weights(whole)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                   for a, b in zip(weights(plain), weights(whole)))


@pytest.mark.parametrize("override, field", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("schedule.kind=linear", "schedule.kind"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
    ("run.max_steps=2.5", "run.max_steps"),
    ("run.dtype=float16", "run.dtype"),
    ("run.device=tpu", "run.device"),
    ("run.strategy=zero3", "run.strategy"),
    ("run.keep_last=0", "run.keep_last"),
    ("run.time_budget_minutes=-1", "run.time_budget_minutes"),
    ("run.time_budget_minutes=nan", "run.time_budget_minutes"),
    ("run.progress=maybe", "run.progress"),
    ("run.resume=/no/such/checkpoint", "run.resume"),
    ("seed=-1", "seed"),
])
def test_bad_config_values_are_rejected(override, field):
    with pytest.raises(ConfigError) as error:
        build_config(TrainerConfig, {}, [override])
    assert str(error.value).startswith(field + " must be"), str(error.value)


def test_config_structure_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field 'optim.lrr'.*'optim.lr'"):
        build_config(TrainerConfig, {}, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        build_config(TrainerConfig, {}, ["optim.lr"])
    with pytest.raises(ConfigError, match="run.max_steps / run.max_epochs"):
        build_config(TrainerConfig, {}, ["run.max_steps=0", "run.max_epochs=0"])
    # The generic trainer's config has no task sections: those belong to rba_core.tasks.
    with pytest.raises(ConfigError, match="unknown config field 'task'"):
        build_config(TrainerConfig, {"task": "kd"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        load_config(nested)


def test_a_key_set_twice_in_a_config_file_is_refused(tmp_path):
    file = tmp_path / "twice.yaml"
    file.write_text("optim:\n  lr: 1e-3\n  grad_clip: 0.5\n  lr: 3e-4\nrun:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: .*'lr' is set twice in one section "
                                          r"\(lines 2 and 4\).*delete one") as raised:
        load_config(file)
    assert "\n" not in str(raised.value)
    # A merge key's mapping overridden in place is no repetition.
    file.write_text("optim:\n  <<: {lr: 1e-3, grad_clip: 0.5}\n  lr: 2e-3\nrun:\n"
                    "  max_steps: 3\n")
    config = load_config(file)
    assert config.optim.lr == pytest.approx(2e-3) and config.optim.grad_clip == 0.5
    with pytest.raises(ConfigError, match="set twice"):
        build_config(TrainerConfig, {}, ["optim.betas={a: 1, a: 2}"])


def test_config_file_overrides_and_round_trip(tmp_path):
    file = tmp_path / "trainer.yaml"
    file.write_text("seed: 3\noptim:\n  lr: 3e-4\nrun:\n  max_steps: 5\n")
    config = load_config(file, ["optim.betas=[0.8, 0.95]", "run.tensorboard=true"])
    # YAML 1.1 reads 3e-4 (no dot) as a string; the float field takes it as the number.
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.95) and config.seed == 3
    assert config.run.max_steps == 5 and config.run.tensorboard is True
    written = tmp_path / "round.yaml"
    written.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(written) == config


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer(make_config(out, "run.max_steps=4", "run.checkpoint_every=2"),
            ToyRegressionTask(samples=16)).train()
    previous = ckpt.latest_checkpoint(out)
    assert previous.name == "step_00000004"
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    real_save = torch.save

    def dies_half_way(obj, path, *args, **kwargs):
        if Path(path).name == ckpt.RNG_NAME:
            Path(path).write_bytes(b"half a file")
            raise OSError("No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        Trainer(make_config(out, "run.max_steps=6", "run.checkpoint_every=2"),
                ToyRegressionTask(samples=16)).train()
    monkeypatch.undo()

    assert ckpt.latest_checkpoint(out) == previous
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert not [p for p in (out / ckpt.CHECKPOINTS).iterdir() if is_temp_name(p.name)]
    result = Trainer(make_config(out, "run.max_steps=6", "run.checkpoint_every=2"),
                     ToyRegressionTask(samples=16)).train()
    assert result.step == 6


def test_keep_last_and_resume_errors(tmp_path):
    out = tmp_path / "run"
    Trainer(make_config(out, "run.max_steps=6", "run.checkpoint_every=1", "run.keep_last=2"),
            ToyRegressionTask(samples=16)).train()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000005", "step_00000006"]
    before = ckpt.latest_checkpoint(out)
    with pytest.warns(UserWarning, match="optim.lr differ from the checkpoint"):
        Trainer(make_config(out, "run.max_steps=7", "optim.lr=0.5"),
                ToyRegressionTask(samples=16)).train()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(make_config(out, "run.max_steps=8", "run.resume=never"),
                ToyRegressionTask(samples=16)).train()
    with pytest.raises(CheckpointError, match="shape"):
        Trainer(make_config(out, "run.max_steps=8"),
                ToyRegressionTask(samples=16, hidden=5)).train()
    (before / ckpt.STATE_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Trainer(make_config(out, "run.max_steps=8", f"run.resume={before}"),
                ToyRegressionTask(samples=16)).train()


class NoParameters(ToyRegressionTask):
    def trainable_parameters(self):
        return []


class VectorLoss(ToyRegressionTask):
    def loss(self, batch):
        x, y, _ = batch
        return (self.model(x) - y).pow(2).squeeze(1), {}


def test_task_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="trainable_parameters\\(\\) is empty"):
        Trainer(make_config(tmp_path / "a", "run.max_steps=1"), NoParameters()).train()
    with pytest.raises(ConfigError, match="scalar tensor"):
        Trainer(make_config(tmp_path / "b", "run.max_steps=1"), VectorLoss()).train()
    with pytest.raises(ConfigError, match="fewer than optim.grad_accum"):
        Trainer(make_config(tmp_path / "c", "run.max_steps=1", "optim.grad_accum=5"),
                ToyRegressionTask(samples=16)).train()
    with pytest.raises(ConfigError, match="fsdp_modules"):
        task = ToyRegressionTask(samples=16)
        task.fsdp_modules = lambda: []
        Trainer(make_config(tmp_path / "d", "run.max_steps=1", "run.strategy=fsdp"),
                task).train()


def test_logged_learning_rates_follow_the_schedule(tmp_path):
    # The schedule itself is tested in test_schedule.py; here, that the trainer applies it.
    Trainer(make_config(tmp_path, "run.max_steps=6", "optim.lr=0.01",
                        "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.2"),
            ToyRegressionTask(samples=32)).train()
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    schedule = ScheduleConfig(warmup_steps=2, min_lr_ratio=0.2)
    assert logged == pytest.approx([0.01 * lr_multiplier(s, 6, schedule) for s in range(6)])
    assert logged[0] == pytest.approx(0.005) and logged[1] == pytest.approx(0.01)


def test_metrics_file_and_plot(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rba.train"):
        result = Trainer(make_config(tmp_path, "run.max_steps=4", "run.log_every=2",
                                     "run.tensorboard=true"),
                         ToyRegressionTask(samples=32)).train()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in caplog.text
    else:
        assert any((tmp_path / "tensorboard").iterdir())
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert {"loss", "lr", "grad_norm", "mse", "tokens_per_s", "skipped_steps"} <= set(record)
    assert records[-1]["tokens_seen"] == 4 * 4
    assert result.last_metrics["step"] == 4
    png = tmp_path / "curves.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with caplog.at_level(logging.WARNING, logger="rba.train"):
            assert plot_metrics(tmp_path / "metrics.jsonl", png) is False
        assert "matplotlib is not installed" in caplog.text and not png.exists()
    else:
        assert plot_metrics(tmp_path / "metrics.jsonl", png) is True
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["run"]["max_steps"] == 4


class SkipsSamples(ToyRegressionTask):
    """Its data leaves out one sample at the start and a bad one each time batch 1 is
    loaded (the same sample on every epoch), as a speech dataset does."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.skipped = [("manifest.jsonl:3", "bad_json")]

    def train_batches(self, epoch, rank, world_size, seed):
        batches = super().train_batches(epoch, rank, world_size, seed)

        def loading():
            for index, batch in enumerate(batches):
                if index == 1:
                    self.skipped.append(("row 7", "unreadable_audio"))
                yield batch
        return loading()

    def skipped_samples(self):
        return list(self.skipped)


def test_skipped_samples_are_counted_once_per_reason_in_metrics_and_result(tmp_path):
    settings = ["run.max_steps=8", "run.log_every=1", "run.checkpoint_every=2"]
    result = Trainer(make_config(tmp_path / "whole", *settings), SkipsSamples(samples=16)).train()
    # Met in both epochs (4 batches each), counted once.
    assert result.skipped_samples == {"bad_json": 1, "unreadable_audio": 1}
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert records[0]["skipped_samples"] == {"bad_json": 1}
    assert all(r["skipped_samples"] == {"bad_json": 1, "unreadable_audio": 1}
               for r in records[1:])
    # A run killed before it meets the bad sample again keeps the count it had (checkpointed).
    out = tmp_path / "killed"
    Trainer(make_config(out, "run.max_steps=4", *settings[1:]), SkipsSamples(samples=16)).train()
    task = SkipsSamples(samples=16)
    task.skipped = []
    result = Trainer(make_config(out, "run.max_steps=5", *settings[1:]), task).train()
    assert result.skipped_samples == {"bad_json": 1, "unreadable_audio": 1}
    assert read_metrics(out / "metrics.jsonl")[-1]["skipped_samples"] == result.skipped_samples


def test_resuming_with_changed_settings_warns_naming_them(tmp_path):
    out = tmp_path / "run"
    Trainer(make_config(out, "run.max_steps=2"), ToyRegressionTask(samples=16)).train()
    with pytest.warns(UserWarning, match=r"settings that differ from the checkpoint's "
                                         r"\(optim.grad_clip: 1.0 -> 0.5; seed: 0 -> 3\)"):
        Trainer(make_config(out, "run.max_steps=3", "optim.grad_clip=0.5", "seed=3"),
                ToyRegressionTask(samples=16)).train()
    # How long it runs and how it reports may change without a word.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(make_config(out, "run.max_steps=4", "optim.grad_clip=0.5", "seed=3",
                            "run.log_every=2", "run.keep_last=1"),
                ToyRegressionTask(samples=16)).train()


def test_checkpoint_holds_trainable_weights_only(tmp_path):
    task = ToyRegressionTask(samples=16)
    Trainer(make_config(tmp_path, "run.max_steps=2"), task).train()
    folder = ckpt.latest_checkpoint(tmp_path)
    shapes = [tuple(p.shape) for p in task.trainable_parameters()]
    saved = ckpt.read_params(folder, shapes)
    assert len(saved) == len(task.trainable_parameters()) < len(list(task.model.parameters()))
    for got, want in zip(saved, task.trainable_parameters()):
        assert torch.equal(got, want.detach())
    state = json.loads((folder / ckpt.STATE_NAME).read_text())
    assert (state["step"], state["epoch"], state["position"]) == (2, 0, 2)


class RecordsDtype(ToyRegressionTask):
    def loss(self, batch):
        x, y, _ = batch
        self.seen = self.model(x).dtype
        return super().loss(batch)


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16),
                                             ("float32", torch.float32),
                                             ("auto", torch.float32)])
def test_autocast_follows_run_dtype(tmp_path, dtype, expected):
    # "auto" means bf16 only on a GPU; this runs on the CPU.
    task = RecordsDtype(samples=8)
    config = make_config(tmp_path, "run.max_steps=1")
    config.run.dtype = dtype
    Trainer(config, task).train()
    assert task.seen == expected
    assert all(p.dtype == torch.float32 for p in task.trainable_parameters())


class StepHook(ToyRegressionTask):
    """Per-step work through ``on_step_end``: a controller-like value that moves every step,
    is reported as a metric and must come back from the checkpoint on resume."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[int, int]] = []
        self.beta = 1.0

    def on_step_end(self, step, record):
        self.seen.append((step, record["skipped"]))
        self.beta *= 1.0 + 0.1 * record["mse"]
        return {"beta": self.beta}

    def state_dict(self):
        return {**super().state_dict(), "beta": self.beta}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.beta = state["beta"]


class StepHookDiesAfter(DiesAfter, StepHook):
    """The hooked task, dying as ``DiesAfter`` does."""


def test_on_step_end_metrics_are_logged_and_its_state_resumes(tmp_path):
    settings = ["run.max_steps=6", "run.checkpoint_every=2", "run.log_every=1"]
    whole = StepHook(samples=16)
    Trainer(make_config(tmp_path / "whole", *settings), whole).train()
    assert whole.seen == [(step, 0) for step in range(1, 7)]
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["beta"] for r in records][-1] == pytest.approx(whole.beta) and whole.beta > 1

    with pytest.raises(Killed):
        Trainer(make_config(tmp_path / "killed", *settings),
                StepHookDiesAfter(3, samples=16)).train()
    resumed = StepHook(samples=16)
    Trainer(make_config(tmp_path / "killed", *settings), resumed).train()
    assert resumed.seen == [(step, 0) for step in range(3, 7)]   # from the step-2 checkpoint
    assert resumed.beta == whole.beta
    for got, want in zip(weights(resumed), weights(whole)):
        assert torch.equal(got, want)
