"""Synthesized speech datasets (``rba synth`` folders) as training batches for the SpeechLM.

    dataset = SpeechDataset(folder, "train", tokenizer)
    for batch in dataset.iter_batches(batch_size=16, seed=0, epoch=0):
        loss, metrics = kd_loss(speechlm, teacher, batch)
    print(dataset.skipped)       # Counter of rows left out, by reason

A bad row never stops training and never costs a good one: rows that cannot be parsed, lack
fields, repeat an id, point outside the folder or at a missing/empty file, or are too long are
left out when the manifest is read; audio that fails to decode is left out when it is first
loaded. Each is counted once in ``skipped`` (by reason) and listed in ``skipped_rows``.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rba_core.errors import AudioError, AudioTooLong, ConfigError
from rba_core.data.prompts import (
    response_ids, split_student_prompt, student_messages, teacher_messages, teacher_prompt_ids,
)
from rba_core.data.tokenizer import Tokenizer

MANIFEST_NAME = "manifest.jsonl"
SAMPLE_RATE = 16000
# Whisper's encoder takes at most 30 s per clip.
MAX_DURATION_S = 30.0
REQUIRED_FIELDS = {"id": str, "instruction": str, "response": str, "audio": str}
SPLITS = ("train", "heldout")


@dataclass
class SpeechSample:
    """One loaded row: its 16 kHz wave and the token ids of every text piece."""

    index: int
    row: dict[str, Any]
    wave: np.ndarray
    prompt_before: list[int]
    prompt_after: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class SpeechBatch:
    """A collated batch.

    features ``[B, n_mels, T]`` (unpadded log-mel, zero past each clip) and frame_lengths
    ``[B]``; prompt_before / prompt_after: the student chat prompt's token ids before and after
    the audio, per row; teacher_prompt_ids: the transcript chat prompt per row (teacher's
    template); response_ids ``[B, R]`` right-padded with ``pad_id`` and response_mask ``[B, R]``
    (bool, True at real tokens); ids and rows: the manifest rows. ``augmented``: the clips went
    through training's augmentation, so their features must not be cached as the clips' own.
    """

    ids: list[str]
    rows: list[dict[str, Any]]
    features: torch.Tensor
    frame_lengths: torch.Tensor
    prompt_before: list[list[int]]
    prompt_after: list[list[int]]
    teacher_prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    indices: list[int] = field(default_factory=list)
    augmented: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        """Response tokens in the batch (what the losses average over)."""
        return int(self.response_mask.sum())

    def to(self, device: str | torch.device) -> "SpeechBatch":
        return replace(self, features=self.features.to(device),
                       frame_lengths=self.frame_lengths.to(device),
                       response_ids=self.response_ids.to(device),
                       response_mask=self.response_mask.to(device))


def collate(samples: Sequence[SpeechSample], *, n_mels: int = 80, pad_id: int = 0) -> SpeechBatch:
    """Stack loaded samples: features per clip (each featurised alone), padded responses."""
    from rba_core.data.audio import batch_features

    if not samples:
        raise ConfigError("collate: no samples; a batch needs at least one loaded sample")
    features, frame_lengths = batch_features([s.wave for s in samples], n_mels=n_mels)
    width = max(1, max(len(s.response_ids) for s in samples))
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for b, sample in enumerate(samples):
        ids[b, : len(sample.response_ids)] = torch.as_tensor(sample.response_ids, dtype=torch.long)
        mask[b, : len(sample.response_ids)] = True
    return SpeechBatch(
        ids=[str(s.row["id"]) for s in samples], rows=[s.row for s in samples],
        features=features, frame_lengths=frame_lengths,
        prompt_before=[s.prompt_before for s in samples],
        prompt_after=[s.prompt_after for s in samples],
        teacher_prompt_ids=[s.teacher_prompt_ids for s in samples],
        response_ids=ids, response_mask=mask, indices=[s.index for s in samples])


def length_bucketed_batches(lengths: Sequence[float], batch_size: int, *, seed: int,
                            epoch: int = 0, window_batches: int = 32, shuffle: bool = True,
                            drop_last: bool = False) -> list[list[int]]:
    """Batches of indices into ``lengths`` with similar lengths, the same for the same
    (seed, epoch): indices are shuffled, cut into windows of ``window_batches * batch_size``,
    sorted by length within each window and cut into batches, and the batch order is
    shuffled. Sorting only within windows keeps batches random across the epoch while padding
    stays small. ``shuffle=False`` sorts the whole set (for evaluation)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(window_batches, bool) or not isinstance(window_batches, int) \
            or window_batches < 1:
        raise ConfigError(f"window_batches must be an integer >= 1, got {window_batches!r}")
    order = list(range(len(lengths)))
    rng = random.Random(f"rba-batches:{seed}:{epoch}")
    if shuffle:
        rng.shuffle(order)
        window = window_batches * batch_size
        windows = [order[i: i + window] for i in range(0, len(order), window)]
    else:
        windows = [order]
    batches: list[list[int]] = []
    for chunk in windows:
        chunk = sorted(chunk, key=lambda i: (lengths[i], i))
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard_batch(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of a global batch: every ``world_size``-th index from ``rank``
    (the global batch is length-sorted, so every rank gets similar lengths)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return list(batch[rank::world_size])


class SpeechDataset:
    """The rows of one split of a dataset folder's ``manifest.jsonl`` (split None: all).

    ``tokenizer`` is the student's (chat template with the audio placeholder, response ids);
    ``teacher_tokenizer`` renders the transcript prompt (default: the same). Rows longer than
    ``max_duration`` seconds are left out; responses longer than ``max_response_tokens`` are
    cut (their end-of-turn token is lost, so set it above the synthesis limit)."""

    def __init__(self, root: str | os.PathLike, split: str | None, tokenizer: Tokenizer, *,
                 teacher_tokenizer: Tokenizer | None = None,
                 max_duration: float = MAX_DURATION_S, max_response_tokens: int | None = None,
                 n_mels: int = 80) -> None:
        self.root = Path(root)
        if split is not None and split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)} or None (all rows), got "
                              f"{split!r}")
        if not 0 < max_duration <= MAX_DURATION_S:
            raise ConfigError(f"max_duration must be in (0, {MAX_DURATION_S}] seconds (Whisper's "
                              f"window), got {max_duration!r}")
        if max_response_tokens is not None and max_response_tokens < 1:
            raise ConfigError(f"max_response_tokens must be >= 1 or None, got "
                              f"{max_response_tokens!r}")
        manifest = self.root / MANIFEST_NAME
        if not manifest.is_file():
            raise ConfigError(f"{manifest}: missing; pass a folder written by `rba synth` (it "
                              "holds manifest.jsonl and audio/)")
        self.split = split
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer or tokenizer
        self.max_duration = float(max_duration)
        self.max_response_tokens = max_response_tokens
        self.n_mels = n_mels
        self.pad_id = next((int(t) for t in (tokenizer.pad_id, tokenizer.eos_id)
                            if t is not None), 0)
        self.skipped: Counter[str] = Counter()
        self.skipped_rows: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self.rows: list[dict[str, Any]] = []
        self._read_manifest(manifest)
        self.durations = [float(row["duration"]) for row in self.rows]

    def _skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_rows.append((where, reason))

    def _read_manifest(self, manifest: Path) -> None:
        seen: set[str] = set()
        root = self.root.resolve()
        with open(manifest, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{manifest.name}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    self._skip(where, "bad_json")
                    continue
                if not isinstance(row, dict) or any(
                        not isinstance(row.get(name), kind)
                        for name, kind in REQUIRED_FIELDS.items()) \
                        or not isinstance(row.get("prompt", ""), str):
                    self._skip(where, "bad_fields")
                    continue
                where = f"{where} (id {row['id']})"
                if self.split is not None and row.get("split", "train") != self.split:
                    continue
                if row["id"] in seen:
                    self._skip(where, "duplicate_id")
                    continue
                duration = row.get("duration")
                if isinstance(duration, bool) or not isinstance(duration, (int, float)) \
                        or not math.isfinite(duration) or duration <= 0:
                    self._skip(where, "bad_duration")
                    continue
                if duration > self.max_duration:
                    self._skip(where, "too_long")
                    continue
                path = (self.root / row["audio"]).resolve()
                if Path(row["audio"]).is_absolute() or not path.is_relative_to(root):
                    self._skip(where, "audio_outside_folder")
                    continue
                if not path.is_file() or path.stat().st_size == 0:
                    self._skip(where, "missing_audio")
                    continue
                seen.add(row["id"])
                self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> SpeechSample | None:
        """Row ``index`` with its audio and token ids, or None (counted) when its audio cannot
        be decoded or is longer than ``max_duration``."""
        if index in self._bad:
            return None
        from rba_core.data.audio import load_speech

        row = self.rows[index]
        try:
            # The manifest's duration may be wrong: the file's own header is checked before
            # decoding, so a long file costs no decoding.
            wave = load_speech(self.root / row["audio"], max_seconds=self.max_duration)
        except AudioError as error:
            self._bad.add(index)
            self._skip(f"{MANIFEST_NAME} (id {row['id']})",
                       "too_long" if isinstance(error, AudioTooLong) else "unreadable_audio")
            return None
        before, after = split_student_prompt(self.tokenizer, student_messages(row))
        teacher_chat = teacher_messages(row)
        response = response_ids(self.tokenizer, teacher_chat, row["response"])
        if self.max_response_tokens is not None:
            response = response[: self.max_response_tokens]
        return SpeechSample(index=index, row=row, wave=wave, prompt_before=before,
                            prompt_after=after,
                            teacher_prompt_ids=teacher_prompt_ids(self.teacher_tokenizer,
                                                                  teacher_chat),
                            response_ids=response)

    def batch(self, indices: Sequence[int], *,
              augment: Callable[[np.ndarray, str], np.ndarray] | None = None
              ) -> SpeechBatch | None:
        """The collated batch of the loadable rows among ``indices`` (None if none loads).
        ``augment`` (training only: ``Augmenter.for_epoch``) maps each clip's wave and row id
        to the wave to featurise; the loaded clip itself is left as it was."""
        samples = [s for s in (self.load(i) for i in indices) if s is not None]
        if not samples:
            return None
        if augment is not None:
            samples = [replace(s, wave=augment(s.wave, str(s.row["id"]))) for s in samples]
        batch = collate(samples, n_mels=self.n_mels, pad_id=self.pad_id)
        batch.augmented = augment is not None
        return batch

    def batch_indices(self, batch_size: int, *, seed: int, epoch: int = 0,
                      window_batches: int = 32, shuffle: bool = True,
                      drop_last: bool = False) -> list[list[int]]:
        """Length-bucketed global batches of row indices (see ``length_bucketed_batches``)."""
        return length_bucketed_batches(self.durations, batch_size, seed=seed, epoch=epoch,
                                       window_batches=window_batches, shuffle=shuffle,
                                       drop_last=drop_last)

    def iter_batches(self, batch_size: int, *, seed: int, epoch: int = 0, rank: int = 0,
                     world_size: int = 1, start: int = 0, window_batches: int = 32,
                     shuffle: bool = True, drop_last: bool = False
                     ) -> Iterator[SpeechBatch | None]:
        """This rank's share of each global batch of ``batch_size`` rows, from global batch
        number ``start`` on (resume). Yields None for a batch none of whose rows loads, so
        that all ranks stay in step; a single process can simply skip it. Global batches with
        fewer rows than ``world_size`` are dropped so every rank gets a row."""
        batches = self.batch_indices(batch_size, seed=seed, epoch=epoch,
                                     window_batches=window_batches, shuffle=shuffle,
                                     drop_last=drop_last)
        for indices in batches[start:]:
            if len(indices) < world_size:
                continue
            yield self.batch(shard_batch(indices, rank, world_size))
