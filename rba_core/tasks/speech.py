"""What every SpeechLM training task shares: the ``task`` / ``model`` / ``data`` config sections,
the SpeechLM and dataset builders, and :class:`SpeechTask`, the base of the align, sft/kd (and
rba) tasks.

A :class:`SpeechTask` hands each rank its share of length-bucketed batches (:class:`EpochBatches`),
weights each batch by the tokens its loss is a per-token mean over, returns a zero loss for a
batch none of whose rows loaded, names the layers FSDP shards, and exports the trained adapter
(and LoRA). A subclass supplies the loss and the token count.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from torch import nn

from rba_core.data.augment import AugmentConfig
from rba_core.errors import ConfigError
from rba_core.train.config import (
    TrainerConfig, check_at_least, check_choice, check_finite, invalid,
)

if TYPE_CHECKING:
    from rba_core.data.augment import Augmenter
    from rba_core.data.speech import SpeechBatch, SpeechDataset
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.models.speechlm import SpeechLM


@dataclass
class ModelConfig:
    """The SpeechLM's parts. ``None`` paths mean the models that ``rba prepare`` converts, the
    student's own LLM as teacher, and a fresh adapter. ``lora_rank`` 0 leaves the LLM frozen."""

    encoder: str | None = None
    llm: str | None = None
    teacher: str | None = None
    adapter: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def validate(self, prefix: str = "model") -> None:
        for name in ("encoder", "llm", "teacher", "adapter"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                invalid(f"{prefix}.{name}", "an existing path or null (the default model)", value)
        check_at_least(f"{prefix}.lora_rank", self.lora_rank, 0)
        check_finite(f"{prefix}.lora_alpha", self.lora_alpha, 0.0, low_open=True,
                     allowed="a finite number > 0")
        if not self.lora_targets or not all(self.lora_targets):
            invalid(f"{prefix}.lora_targets", "a non-empty list of projection names such as "
                    "[q_proj, v_proj]", list(self.lora_targets))


@dataclass
class DataConfig:
    """The dataset folder written by ``rba synth`` (manifest.jsonl + audio/), and the
    augmentation of its clips while training (``augment``, off by default)."""

    dir: str = "data/speech"
    split: str = "train"
    batch_size: int = 8
    max_duration: float = 30.0
    max_response_tokens: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, prefix: str = "data") -> None:
        if not self.dir:
            invalid(f"{prefix}.dir", "a dataset folder holding manifest.jsonl", self.dir)
        check_choice(f"{prefix}.split", self.split, ("train", "heldout"))
        check_at_least(f"{prefix}.batch_size", self.batch_size, 1)
        check_finite(f"{prefix}.max_duration", self.max_duration, 0.0, 30.0, low_open=True,
                     allowed="a number of seconds in (0, 30] (Whisper's window)")
        if self.max_response_tokens is not None:
            check_at_least(f"{prefix}.max_response_tokens", self.max_response_tokens, 1)
        self.augment.validate(f"{prefix}.augment")


@dataclass
class SpeechTaskConfig(TrainerConfig):
    """The trainer's sections plus what every SpeechLM task reads. A task's config subclasses
    this, lists the task names it serves in ``TASKS`` and sets ``task``'s default to one."""

    TASKS: ClassVar[tuple[str, ...]] = ()

    task: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        # Through the registry the name picked this class; built directly, it may not match.
        check_choice("task", self.task, self.TASKS)
        super().validate()
        self.model.validate()
        self.data.validate()


class EpochBatches:
    """One rank's batches of one epoch: ``data.batch_size`` rows per rank, cut from global
    length-bucketed batches of ``batch_size * world_size`` rows. Loads audio lazily; with an
    ``augment``-er, each clip is augmented as drawn for (seed, epoch, its row id)."""

    def __init__(self, dataset: "SpeechDataset", batch_size: int, *, seed: int, epoch: int,
                 rank: int, world_size: int, augment: "Augmenter | None" = None) -> None:
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.augment = None if augment is None else augment.for_epoch(seed, epoch)
        batches = dataset.batch_indices(batch_size * world_size, seed=seed, epoch=epoch)
        # A global batch smaller than the world would leave some rank without a row.
        self.batches = [b for b in batches if len(b) >= world_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator["SpeechBatch | None"]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator["SpeechBatch | None"]:
        from rba_core.data.speech import shard_batch

        for indices in self.batches[start:]:
            yield self.dataset.batch(shard_batch(indices, self.rank, self.world_size),
                                     augment=self.augment)


class SpeechTask(ABC):
    """A :class:`rba_core.train.TrainTask` over a SpeechLM and a speech dataset.

    Subclasses list their task names in ``TASKS`` and implement :meth:`loss_tokens` (what the
    loss averages over, which weights the batch) and :meth:`batch_loss` (on a loaded batch).
    ``augment`` (``data.augment``) applies to the train batches only.
    """

    TASKS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, speechlm: "SpeechLM", dataset: "SpeechDataset", *, task: str,
                 batch_size: int, augment: "Augmenter | None" = None) -> None:
        if task not in self.TASKS:
            raise ValueError(f"{type(self).__name__}: task must be one of "
                             f"{', '.join(self.TASKS)}, got {task!r}")
        if len(dataset) == 0:
            raise ConfigError(f"{dataset.root}: no usable rows in split {dataset.split!r} "
                              f"(skipped: {dict(dataset.skipped) or 'none'})")
        self.speechlm = speechlm
        self.dataset = dataset
        self.task = task
        self.batch_size = batch_size
        self.augment = augment
        speechlm.train()

    @abstractmethod
    def loss_tokens(self, batch: "SpeechBatch") -> float:
        """The tokens of ``batch`` that :meth:`batch_loss` is a per-token mean over."""

    @abstractmethod
    def batch_loss(self, batch: "SpeechBatch") -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and metrics of a loaded batch, already on the SpeechLM's device."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.speechlm.trainable_parameters()

    def fsdp_modules(self) -> list[nn.Module]:
        return fsdp_layers(self.speechlm)

    def train_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> EpochBatches:
        return EpochBatches(self.dataset, self.batch_size, seed=seed, epoch=epoch, rank=rank,
                            world_size=world_size, augment=self.augment)

    def batch_weight(self, batch: "SpeechBatch | None") -> float:
        """The losses are per-token means, so the trainer weights each micro-batch (and rank)
        by its tokens to optimise the mean over the whole step."""
        return 0.0 if batch is None else float(self.loss_tokens(batch))

    def loss(self, batch: "SpeechBatch | None") -> tuple[torch.Tensor, dict[str, float]]:
        if batch is None:
            # No row of this rank's share loaded (the dataset counted why). A zero loss keeps
            # every rank stepping together and adds nothing to the gradient.
            zero = sum(p.sum() for p in self.trainable_parameters()) * 0.0
            return zero, {"empty_batches": 1.0}
        return self.batch_loss(batch.to(self.speechlm.device))

    def skipped_samples(self) -> list[tuple[str, str]]:
        """The dataset's left-out rows so far, ``(manifest line or row, reason)``: those of
        the manifest from the start, clips that fail to decode as training meets them."""
        return list(self.dataset.skipped_rows)

    def describe(self) -> dict[str, Any]:
        """Counts worth printing at the start of a run."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.speechlm.parameters())
        return {"task": self.task, "data": str(self.dataset.root), "rows": len(self.dataset),
                "skipped_rows": dict(self.dataset.skipped), "trainable_parameters": trainable,
                "parameters": total, "augment": describe_augment(self.augment)}

    def export(self, folder: str | os.PathLike) -> None:
        """Write what the run trained and inference loads: the adapter and its LoRA."""
        self.speechlm.save_trainable(folder)


def fsdp_layers(speechlm: "SpeechLM") -> list[nn.Module]:
    """What FSDP shards of a SpeechLM: the decoder and encoder layers hold nearly all weights;
    embeddings, norms and the LM head are read outside any layer's forward (splicing, fused
    losses) and so stay whole on every rank."""
    return [*speechlm.llm.model.layers, *speechlm.encoder.layers]


def load_speechlm(model: ModelConfig, device: torch.device) -> "SpeechLM":
    """The SpeechLM that ``model`` names, in float32 on ``device`` (bf16 comes from the
    trainer's autocast on GPU)."""
    from rba_core.models.lora import LoraConfig
    from rba_core.models.speechlm import SpeechLM
    from rba_core.weights.prepare import DEFAULT_ENCODER, DEFAULT_LLM, resolve_model_dir

    lora = None
    if model.lora_rank > 0:
        lora = LoraConfig(rank=model.lora_rank, alpha=model.lora_alpha,
                          targets=tuple(model.lora_targets))
    return SpeechLM.from_pretrained(
        resolve_model_dir(model.encoder, DEFAULT_ENCODER, "model.encoder"),
        resolve_model_dir(model.llm, DEFAULT_LLM, "model.llm"),
        model.adapter, device=device, lora=lora)


def load_augmenter(data: DataConfig) -> "Augmenter | None":
    """``data.augment``'s augmenter for the train clips (None when off). Evaluation and the
    held-out checks never take one: they see the clips as recorded."""
    from rba_core.data.augment import build_augmenter

    return build_augmenter(data.augment, max_seconds=data.max_duration)


def describe_augment(augment: "Augmenter | None") -> str | None:
    """The start-of-run line's account of the augmentation (None when off)."""
    return None if augment is None else augment.config.summary()


def load_dataset(data: DataConfig, speechlm: "SpeechLM", *,
                 teacher_tokenizer: "Tokenizer | None" = None) -> "SpeechDataset":
    """The split of ``data.dir`` that ``data`` names, tokenized for ``speechlm`` (and for a
    teacher with its own chat template, when given)."""
    from rba_core.data.speech import SpeechDataset

    return SpeechDataset(data.dir, data.split, speechlm.tokenizer,
                         teacher_tokenizer=teacher_tokenizer, max_duration=data.max_duration,
                         max_response_tokens=data.max_response_tokens, n_mels=speechlm.n_mels)
