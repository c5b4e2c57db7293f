"""The SpeechLM training tasks through the trainer on tiny random models: a KD run killed
and resumed ends on the same weights as an uninterrupted one, and `rba train` trains, exports
the adapter, resumes, prints its config and refuses bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from helpers import (CONFIG_DIR, adapter_weights, killed_then_resumed, rba_train, speech_config,
                     uninterrupted_run)
from rba_core.errors import CheckpointError, ConfigError
from rba_core.train import read_metrics
from rba_core.train import checkpoint as ckpt


def test_kd_run_killed_and_resumed_matches_on_a_tiny_speechlm(tiny_models, tmp_path):
    settings = ["task=kd", "kd.kind=jsd", "run.max_steps=5", "run.checkpoint_every=2",
                "schedule.warmup_steps=1", "model.lora_rank=2"]
    whole, start, result = uninterrupted_run(speech_config(tiny_models, tmp_path / "whole",
                                                           *settings))
    assert result.step == 5 and result.skipped_steps == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 5

    resumed = killed_then_resumed(speech_config(tiny_models, tmp_path / "killed", *settings),
                                  die_on_call=4)
    for got, want, initial in zip(adapter_weights(resumed), adapter_weights(whole), start):
        assert torch.equal(got, want)
        assert not torch.equal(got, initial)


def test_rba_train_command_trains_saves_and_resumes(tiny_models, tmp_path, capsys):
    from rba_core.models.speechlm import SpeechLM

    out = tmp_path / "run"
    common = [f"model.encoder={tiny_models['encoder']}", f"model.llm={tiny_models['llm']}",
              f"data.dir={tiny_models['data']}", "data.batch_size=3", f"run.output_dir={out}",
              "run.progress=false", "run.max_epochs=0", "task=sft", "run.checkpoint_every=2",
              "run.log_every=1"]
    config_file = CONFIG_DIR / "sft.yaml"
    assert rba_train(["--config", str(config_file), *common, "run.max_steps=2"]) == 0
    assert "2 steps (0 skipped)" in capsys.readouterr().out
    assert rba_train(["--config", str(config_file), "--resume", *common,
                       "run.max_steps=4"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    state = json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_NAME).read_text())
    assert state["step"] == 4 and state["epoch"] == 1
    # The exported adapter is the trained one: it loads into a fresh SpeechLM and equals the
    # checkpoint's trainable tensors.
    slm = SpeechLM.from_pretrained(tiny_models["encoder"], tiny_models["llm"], out / "adapter")
    saved = ckpt.read_params(ckpt.latest_checkpoint(out),
                             [tuple(p.shape) for p in slm.trainable_parameters()])
    for got, want in zip(slm.trainable_parameters(), saved):
        assert torch.equal(got.detach(), want)

    assert rba_train(["--print-config", "optim.lr=0.5", "task=sft"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["task"] == "sft"
    with pytest.raises(ConfigError, match="^optim.lr must be"):
        rba_train(["optim.lr=-1"])
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        rba_train(["--resume", *common, "run.max_steps=1",
                    f"run.output_dir={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="manifest.jsonl"):
        rba_train([*common, "run.max_steps=1", f"data.dir={tmp_path}",
                    f"run.output_dir={tmp_path / 'x'}"])


def test_an_unreadable_clip_is_reported_in_the_summary_and_metrics(tiny_models, tmp_path,
                                                                   capsys):
    data = tiny_models["data"]
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    # A text file named .flac: listed, non-empty, so only decoding finds it out.
    (data / rows[2]["audio"]).write_text("not audio at all " * 20)
    with open(data / "manifest.jsonl", "a") as handle:
        handle.write('{"id": "torn", "instruction": "wh\n')
    out = tmp_path / "run"
    common = [f"model.encoder={tiny_models['encoder']}", f"model.llm={tiny_models['llm']}",
              f"data.dir={data}", "data.batch_size=2", f"run.output_dir={out}",
              "run.progress=false", "run.plot=false", "run.max_epochs=0", "task=sft",
              "run.checkpoint_every=3"]
    # Three steps are one epoch of the six rows; the resumed run meets the bad clip again.
    assert rba_train([*common, "run.max_steps=3"]) == 0
    assert "2 samples skipped (bad_json 1, unreadable_audio 1)" in capsys.readouterr().out
    assert rba_train([*common, "run.max_steps=6"]) == 0
    assert "2 samples skipped (bad_json 1, unreadable_audio 1)" in capsys.readouterr().out
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["skipped_samples"] == {"bad_json": 1, "unreadable_audio": 1}
    assert all(r["skipped_samples"]["bad_json"] == 1 for r in records)


def test_resuming_with_another_batch_size_warns(tiny_models, tmp_path):
    config = speech_config(tiny_models, tmp_path / "run", "task=sft", "run.max_steps=1")
    uninterrupted_run(config)
    changed = speech_config(tiny_models, tmp_path / "run", "task=sft", "run.max_steps=2",
                            "data.batch_size=3")
    with pytest.warns(UserWarning, match=r"data.batch_size: 2 -> 3\).*data order.*not "
                                         r"replayed exactly"):
        uninterrupted_run(changed)
