"""SpeechDataset: bad rows are skipped and counted (never fatal, never a good row lost),
collation, deterministic length-bucketed batches, sharding and resume."""
from __future__ import annotations

import json
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import soundfile
import torch

from helpers import ROWS, random_wave, write_dataset, write_long_wav, write_tiny_llm
from rba_core.data.audio import batch_features, load_audio
from rba_core.data.speech import (
    SpeechDataset, collate, length_bucketed_batches, shard_batch,
)
from rba_core.errors import ConfigError
from rba_core.data.prompts import student_messages
from rba_core.data.tokenizer import Tokenizer


@pytest.fixture()
def tokenizer(tmp_path):
    return Tokenizer.from_pretrained(write_tiny_llm(tmp_path / "llm"))


def _append(folder, *lines):
    with open(folder / "manifest.jsonl", "a", encoding="utf-8") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def test_bad_rows_are_counted_and_skipped(tmp_path, tokenizer):
    folder = write_dataset(tmp_path / "data")
    good = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    template = dict(good[0])
    rng = np.random.default_rng(0)
    soundfile.write(folder / "audio" / "held.flac", random_wave(0.6, rng), 16000)
    (folder / "audio" / "empty.flac").write_bytes(b"")
    (folder / "audio" / "garbage.flac").write_bytes(b"this is not audio" * 20)
    soundfile.write(tmp_path / "outside.flac", random_wave(0.6, rng), 16000)
    _append(folder,
            '{"id": "truncated", "instruction": "what',                     # bad_json
            {**template, "id": "no-response", "response": None},            # bad_fields
            ["not", "a", "row"],                                            # bad_fields
            {**template, "id": "gone", "audio": "audio/missing.flac"},      # missing_audio
            {**template, "id": "empty", "audio": "audio/empty.flac"},       # missing_audio
            {**template, "id": good[1]["id"]},                              # duplicate_id
            {**template, "id": "long", "duration": 31.0},                   # too_long
            {**template, "id": "zero", "duration": 0},                      # bad_duration
            {**template, "id": "escape", "audio": "../outside.flac"},       # audio_outside_folder
            {**template, "id": "garbage", "audio": "audio/garbage.flac"},   # decodes badly
            {**template, "id": "held", "audio": "audio/held.flac", "split": "heldout"},
            "")
    dataset = SpeechDataset(folder, "train", tokenizer)
    assert dataset.skipped == Counter({"bad_json": 1, "bad_fields": 2, "missing_audio": 2,
                                       "duplicate_id": 1, "too_long": 1, "bad_duration": 1,
                                       "audio_outside_folder": 1})
    assert [row["id"] for row in dataset.rows] == [r["id"] for r in good] + ["garbage"]
    assert sum(dataset.skipped.values()) == len(dataset.skipped_rows)

    seen: list[str] = []
    for epoch in range(2):
        for batch in dataset.iter_batches(2, seed=3, epoch=epoch):
            if batch is not None:
                seen.extend(batch.ids)
    # Every good row, once per epoch; the undecodable one counted once, not per epoch.
    assert Counter(seen) == Counter({r["id"]: 2 for r in good})
    assert dataset.skipped["unreadable_audio"] == 1
    assert dataset.batch([len(dataset) - 1]) is None

    heldout = SpeechDataset(folder, "heldout", tokenizer)
    assert [row["id"] for row in heldout.rows] == ["held"]
    everything = SpeechDataset(folder, None, tokenizer)
    assert len(everything) == len(dataset) + 1


def test_a_long_file_behind_a_short_duration_is_skipped_before_decoding(tmp_path, tokenizer):
    folder = write_dataset(tmp_path / "data")
    template = json.loads((folder / "manifest.jsonl").read_text().splitlines()[0])
    write_long_wav(folder / "audio" / "lecture.wav", 2 * 3600)
    _append(folder, {**template, "id": "lecture", "audio": "audio/lecture.wav", "duration": 4.0})
    dataset = SpeechDataset(folder, "train", tokenizer)
    index = [row["id"] for row in dataset.rows].index("lecture")
    tracemalloc.start()
    try:
        start = time.perf_counter()
        assert dataset.load(index) is None
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 4 * 2**20
    assert dataset.skipped == Counter({"too_long": 1})


def test_dataset_errors(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="manifest.jsonl"):
        SpeechDataset(tmp_path, "train", tokenizer)
    folder = write_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match="split"):
        SpeechDataset(folder, "test", tokenizer)
    with pytest.raises(ConfigError, match="max_duration"):
        SpeechDataset(folder, "train", tokenizer, max_duration=40)


def test_collate_features_prompts_and_responses(tmp_path, tokenizer):
    folder = write_dataset(tmp_path / "data")
    dataset = SpeechDataset(folder, "train", tokenizer)
    batch = dataset.batch([2, 0])
    assert batch.ids == [dataset.rows[2]["id"], dataset.rows[0]["id"]]
    waves = [load_audio(folder / dataset.rows[i]["audio"]) for i in (2, 0)]
    features, lengths = batch_features(waves)
    assert torch.equal(batch.features, features) and torch.equal(batch.frame_lengths, lengths)

    im_end = tokenizer.token_to_id("<|im_end|>")
    for b, index in enumerate((2, 0)):
        row = ROWS[index]
        response = batch.response_ids[b, batch.response_mask[b]].tolist()
        assert response == tokenizer.encode(row["response"]) + [im_end]
        assert not batch.response_mask[b, len(response):].any()
        teacher = tokenizer.decode(batch.teacher_prompt_ids[b], skip_special_tokens=False)
        assert row["instruction"].split()[0] in teacher
        rendered = tokenizer.apply_chat_template(student_messages(row))
        before, _, after = rendered.partition("<|audio|>")
        assert batch.prompt_before[b] == tokenizer.encode(before)
        assert batch.prompt_after[b] == tokenizer.encode(after)
    # The task prompt of row 2 is in its student prompt, before the audio.
    assert tokenizer.encode("answer the question briefly .")[0] in batch.prompt_before[0]
    assert batch.num_tokens == int(batch.response_mask.sum())
    assert batch.to("cpu").response_ids is not None

    cut = SpeechDataset(folder, "train", tokenizer, max_response_tokens=2)
    assert cut.batch([0]).response_ids.shape == (1, 2)
    with pytest.raises(ConfigError, match="no samples"):
        collate([])


def test_length_bucketed_batches_are_deterministic_and_bucketed():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    lengths = rng.uniform(0.5, 20.0, size=103).tolist()
    batches = length_bucketed_batches(lengths, 4, seed=7, epoch=0, window_batches=5)
    assert batches == length_bucketed_batches(lengths, 4, seed=7, epoch=0, window_batches=5)
    assert batches != length_bucketed_batches(lengths, 4, seed=7, epoch=1, window_batches=5)
    assert batches != length_bucketed_batches(lengths, 4, seed=8, epoch=0, window_batches=5)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert sum(len(b) < 4 for b in batches) <= -(-103 // 20)   # one short batch per window
    # Batches of length-sorted windows pad far less than random batches.
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    random_spread = np.mean([max(lengths[i: i + 4]) - min(lengths[i: i + 4])
                             for i in range(0, 100, 4)])
    assert spread < 0.5 * random_spread
    full = length_bucketed_batches(lengths, 4, seed=7, drop_last=True)
    assert all(len(b) == 4 for b in full) and len(full) == 103 // 4
    ordered = length_bucketed_batches(lengths, 10, seed=0, shuffle=False)
    flat = [i for b in ordered for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths)
    with pytest.raises(ConfigError, match="batch_size"):
        length_bucketed_batches(lengths, 0, seed=0)


def test_sharding_and_resume(tmp_path, tokenizer):
    rows = [{"instruction": f"say {w}", "prompt": "", "response": f"{w} ."}
            for w in ("one", "two", "three", "red", "green", "blue", "yes")]
    dataset = SpeechDataset(write_dataset(tmp_path / "data", rows), "train", tokenizer)
    assert shard_batch([5, 1, 4, 2, 0], 0, 2) == [5, 4, 0]
    assert shard_batch([5, 1, 4, 2, 0], 1, 2) == [1, 2]
    with pytest.raises(ConfigError, match="rank"):
        shard_batch([1], 2, 2)
    global_batches = dataset.batch_indices(4, seed=1, epoch=2)
    per_rank = [[b.ids for b in dataset.iter_batches(4, seed=1, epoch=2, rank=r, world_size=2)]
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(global_batches)
    for step, indices in enumerate(global_batches):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == \
            sorted(dataset.rows[i]["id"] for i in indices)
    resumed = [b.ids for b in dataset.iter_batches(4, seed=1, epoch=2, start=1)]
    whole = [b.ids for b in dataset.iter_batches(4, seed=1, epoch=2)]
    assert resumed == whole[1:]
