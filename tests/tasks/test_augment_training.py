"""`data.augment` in the training tasks: the train clips are augmented only when it is on, the
same on every rank and after a resume, anew each epoch; never in evaluation (the held-out
checks), and never served from or written into align's cache of clean encoder frames."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import (
    ROWS, adapter_weights, killed_then_resumed, speech_config, uninterrupted_run, write_dataset,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("audiomentations") is None,
                                reason="audiomentations is not installed (pip install -e "
                                "'.[augment]')")

CPU = torch.device("cpu")
# Every transform on every clip, so that an augmented clip cannot come out clean.
ALL_ON = ["data.augment.enabled=true",
          *(f"data.augment.{name}.p=1.0"
            for name in ("speed", "pitch", "reverb", "noise", "band_limit", "gain"))]


def clips(batches) -> dict[str, torch.Tensor]:
    """Each clip's own features (to its frame length), by row id, over ``batches``."""
    found = {}
    for batch in batches:
        for row, clip_id in enumerate(batch.ids):
            found[clip_id] = batch.features[row, :, : int(batch.frame_lengths[row])]
    return found


def epoch_clips(task, epoch: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    return clips(b for b in task.train_batches(epoch, rank, world_size, 0) if b is not None)


def test_train_clips_are_augmented_only_when_switched_on(tiny_models, tmp_path):
    from rba_core.tasks import build_task

    plain = build_task(speech_config(tiny_models, tmp_path / "p", "task=sft", "run.max_steps=1"), CPU)
    augmented = build_task(speech_config(tiny_models, tmp_path / "a", "task=sft", "run.max_steps=1",
                                             *ALL_ON), CPU)
    assert plain.augment is None and augmented.augment is not None
    assert plain.describe()["augment"] is None and "speed p=1" in augmented.describe()["augment"]

    clean = {i: plain.dataset.batch([i]) for i in range(len(plain.dataset))}
    clean = clips(clean.values())
    assert not any(b.augmented for b in plain.train_batches(0, 0, 1, 0))
    off = epoch_clips(plain, 0)
    assert off.keys() == clean.keys() and all(torch.equal(off[k], clean[k]) for k in clean)

    on = epoch_clips(augmented, 0)
    assert on.keys() == clean.keys()
    for clip_id, features in on.items():
        assert features.shape != clean[clip_id].shape or not torch.allclose(
            features, clean[clip_id], atol=1e-3), clip_id


def test_augmentation_is_the_same_on_every_rank_and_run_and_new_each_epoch(tiny_models,
                                                                           tmp_path):
    from rba_core.tasks import build_task

    config = speech_config(tiny_models, tmp_path / "a", "task=kd", "run.max_steps=1", *ALL_ON)
    first = build_task(config, CPU)
    epoch0 = epoch_clips(first, 0)
    # Another process (a resumed run) draws the same clips, bit for bit.
    assert all(torch.equal(epoch_clips(build_task(config, CPU), 0)[k], v)
               for k, v in epoch0.items())
    # Two ranks: each clip exactly as one process draws it, whichever rank it lands on.
    ranks = {**epoch_clips(first, 0, 0, 2), **epoch_clips(first, 0, 1, 2)}
    assert ranks and all(torch.equal(ranks[k], epoch0[k]) for k in ranks)
    epoch1 = epoch_clips(first, 1)
    assert all(epoch1[k].shape != v.shape or not torch.equal(epoch1[k], v)
               for k, v in epoch0.items())


def test_an_augmented_sft_run_killed_and_resumed_matches_the_whole_run(tiny_models, tmp_path):
    # 3 batches an epoch: the 7 steps cross into epochs 1 and 2, whose draws differ.
    settings = ["task=sft", "run.max_steps=7", "run.checkpoint_every=2",
                "schedule.warmup_steps=1", *ALL_ON]
    whole, start, result = uninterrupted_run(speech_config(tiny_models, tmp_path / "whole",
                                                           *settings))
    assert result.step == 7 and result.skipped_steps == 0
    resumed = killed_then_resumed(speech_config(tiny_models, tmp_path / "killed", *settings),
                                  die_on_call=5)
    for got, want, initial in zip(adapter_weights(resumed), adapter_weights(whole), start):
        assert torch.equal(got, want)
        assert not torch.equal(got, initial)


def test_align_never_caches_augmented_frames(tiny_models, tmp_path):
    from rba_core.tasks import build_task

    task = build_task(speech_config(tiny_models, tmp_path / "a", "task=align", "run.max_steps=1",
                                         *ALL_ON), CPU)
    batch = next(iter(task.train_batches(0, 0, 1, 0)))
    assert batch.augmented
    task.loss(batch)
    assert task.encoder_cache == {}
    # The clips as recorded are cached as before, and an augmented batch is not served
    # from that cache: its loss is that of its own (augmented) frames.
    clean = task.dataset.batch(batch.indices)
    task.loss(clean)
    assert set(task.encoder_cache) == set(batch.ids)
    with torch.no_grad():
        fresh, _ = task.batch_loss(batch)
        served, _ = task.batch_loss(clean)
        task.encoder_cache.clear()
        clean_fresh, _ = task.batch_loss(clean)
    assert torch.equal(served, clean_fresh) and not torch.allclose(fresh, clean_fresh)


def test_held_out_checks_hear_the_clips_unaugmented_even_when_training_augments(
        tiny_models, tmp_path, monkeypatch):
    from rba_core.data.augment import Augmenter
    from rba_core.tasks import build_task

    data = write_dataset(tmp_path / "data", ROWS * 2)
    manifest = data / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows[4:]:
        row["split"] = "heldout"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = speech_config({**tiny_models, "data": data}, tmp_path / "run", "task=rba",
                           "rba.group_size=2", "rba.max_new_tokens=3", "rba.eval_every=1",
                           "rba.eval_rows=2", "run.max_steps=1", *ALL_ON)
    task = build_task(config, CPU)
    assert task.augment is not None and task.describe()["augment"]

    applied = []
    real_apply = Augmenter.apply
    monkeypatch.setattr(Augmenter, "apply",
                        lambda self, wave, draw: applied.append(draw) or real_apply(self, wave,
                                                                                    draw))
    scores = task.evaluate()
    assert scores["eval_rows"] == 2.0 and applied == []
    # The held-out split and the train split are read without augmentation outside training.
    assert not task.heldout.batch([0, 1]).augmented

    unit = next(iter(task.train_batches(0, 0, 1, 0)))
    assert len(applied) == len(unit.prompts.rows) and unit.prompts.batch.augmented
