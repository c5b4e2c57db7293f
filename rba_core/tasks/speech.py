"""CTC alignment, SFT and KD of the SpeechLM as :class:`rba_core.train.TrainTask` objects.

This module is the bridge between the audio-free trainer and the SpeechLM: it builds the model,
the teacher and the dataset from a :class:`TrainConfig`, hands out length-bucketed batches per
rank and computes ``ctc_align_loss`` / ``sft_loss`` / ``kd_loss``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from rba_core.errors import ConfigError
from rba_core.train.config import LossConfig, TrainConfig

if TYPE_CHECKING:
    from rba_core.data.speech import SpeechBatch, SpeechDataset
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.models.speechlm import SpeechLM

DEFAULT_ENCODER = "whisper-tiny.en"
DEFAULT_LLM = "smollm2-135m-instruct"


class EpochBatches:
    """One rank's batches of one epoch: ``data.batch_size`` rows per rank, cut from global
    length-bucketed batches of ``batch_size * world_size`` rows. Loads audio lazily."""

    def __init__(self, dataset: "SpeechDataset", batch_size: int, *, seed: int, epoch: int,
                 rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
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
            yield self.dataset.batch(shard_batch(indices, self.rank, self.world_size))


class SpeechDistillTask:
    """``task="sft"``: cross-entropy of the teacher's responses given the speech;
    ``task="kd"``: the fused distillation loss against ``teacher`` reading the transcript.
    ``fused=False`` uses the eager reference loss over materialised logits (benchmarks)."""

    TASKS: tuple[str, ...] = ("sft", "kd")

    def __init__(self, speechlm: "SpeechLM", dataset: "SpeechDataset", *, task: str,
                 batch_size: int, loss: LossConfig | None = None,
                 teacher: "LlamaForCausalLM | None" = None, fused: bool = True) -> None:
        if task not in self.TASKS:
            raise ConfigError(f"{type(self).__name__}: task must be one of "
                              f"{', '.join(self.TASKS)}, got {task!r}")
        if task == "kd" and teacher is None:
            raise ConfigError("task 'kd' needs a teacher LLM (SpeechLM.load_teacher())")
        if len(dataset) == 0:
            raise ConfigError(f"{dataset.root}: no usable rows in split {dataset.split!r} "
                              f"(skipped: {dict(dataset.skipped) or 'none'})")
        self.speechlm = speechlm
        self.dataset = dataset
        self.task = task
        self.batch_size = batch_size
        self.loss_config = loss or LossConfig()
        self.teacher = teacher
        self.fused = fused
        speechlm.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.speechlm.trainable_parameters()

    def fsdp_modules(self) -> list[nn.Module]:
        # The decoder and encoder layers hold nearly all weights; embeddings, norms and the
        # LM head are read outside any layer's forward (splicing, fused losses) and so stay
        # whole on every rank.
        return [*self.speechlm.llm.model.layers, *self.speechlm.encoder.layers]

    def train_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> EpochBatches:
        return EpochBatches(self.dataset, self.batch_size, seed=seed, epoch=epoch, rank=rank,
                            world_size=world_size)

    def batch_weight(self, batch: "SpeechBatch | None") -> float:
        """Response tokens: the losses are per-token means, so the trainer weights each
        micro-batch (and rank) by its tokens to optimise the mean over the whole step."""
        return 0.0 if batch is None else float(batch.num_tokens)

    def loss(self, batch: "SpeechBatch | None") -> tuple[torch.Tensor, dict[str, float]]:
        from rba_core.tasks.distill import kd_loss, sft_loss

        if batch is None:
            # No row of this rank's share loaded (the dataset counted why). A zero loss keeps
            # every rank stepping together and adds nothing to the gradient.
            zero = sum(p.sum() for p in self.trainable_parameters()) * 0.0
            return zero, {"empty_batches": 1.0}
        batch = batch.to(self.speechlm.device)
        if self.task == "sft":
            return sft_loss(self.speechlm, batch, fused=self.fused)
        return kd_loss(self.speechlm, self.teacher, batch, kind=self.loss_config.kind,
                       temperature=self.loss_config.temperature,
                       jsd_beta=self.loss_config.jsd_beta, fused=self.fused)


class SpeechAlignTask(SpeechDistillTask):
    """``task="align"``: CTC pre-alignment of the adapter to the LLM's token embeddings
    (:mod:`rba_core.tasks.align`). Batches, weighting and sharding are those of SFT/KD; the loss
    never runs the LLM, and the CTC head's blank vector and scale train beside the adapter
    (they are checkpointed, not exported)."""

    TASKS = ("align",)

    def __init__(self, speechlm: "SpeechLM", dataset: "SpeechDataset", *,
                 batch_size: int) -> None:
        from rba_core.tasks.align import CTCAlignHead, alignment_vocabulary, transcript_ids

        super().__init__(speechlm, dataset, task="align", batch_size=batch_size)
        # Every rank reads the same rows, so every rank builds the same vocabulary.
        self.transcripts = {str(row["id"]): transcript_ids(speechlm.tokenizer, row)
                            for row in dataset.rows}
        self.head = CTCAlignHead(alignment_vocabulary(self.transcripts.values()),
                                 dim=speechlm.llm.config.hidden_size, device=speechlm.device)
        self.encoder_cache: dict[str, torch.Tensor] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.speechlm.trainable_parameters(), *self.head.parameters()]

    def batch_weight(self, batch: "SpeechBatch | None") -> float:
        return 0.0 if batch is None else float(sum(len(self.transcripts[i]) for i in batch.ids))

    def _encoder_frames(self, batch: "SpeechBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's encoder frames, from the cache when every clip has been encoded. A
        frozen encoder gives every clip the same frames each epoch, and on the CPU it costs
        several times the rest of an alignment step."""
        if self.speechlm.train_encoder:
            return self.speechlm.encode(batch.features, batch.frame_lengths)
        if not all(i in self.encoder_cache for i in batch.ids):
            hidden, lengths = self.speechlm.encode(batch.features, batch.frame_lengths)
            for row, clip_id in enumerate(batch.ids):
                self.encoder_cache[clip_id] = hidden[row, : int(lengths[row])].detach()
        clips = [self.encoder_cache[i] for i in batch.ids]
        lengths = torch.tensor([c.shape[0] for c in clips], device=clips[0].device)
        return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths

    def loss(self, batch: "SpeechBatch | None") -> tuple[torch.Tensor, dict[str, float]]:
        from rba_core.tasks.align import ctc_align_loss

        if batch is None:
            return super().loss(batch)
        batch = batch.to(self.speechlm.device)
        audio, lengths = self.speechlm.adapt(*self._encoder_frames(batch))
        return ctc_align_loss(self.head, audio, lengths, [self.transcripts[i] for i in batch.ids],
                              self.speechlm.llm.model.embed_tokens.weight)


def _model_dir(given: str | None, name: str, field: str) -> Path:
    from rba_core.weights.prepare import default_model_dir

    if given is not None:
        return Path(given)
    folder = Path(default_model_dir(name))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{field} is null (the default {name}) but that model is not prepared "
                          f"at {folder}; run `rba prepare` or set {field}=DIR")
    return folder


def build_speech_task(config: TrainConfig, device: torch.device) -> SpeechDistillTask:
    """The SpeechLM, its teacher (kd) and the dataset that ``config`` names, on ``device``.

    Weights load in float32; bf16 comes from the trainer's autocast on GPU.
    """
    from rba_core.data.speech import SpeechDataset
    from rba_core.models.lora import LoraConfig
    from rba_core.models.speechlm import SpeechLM

    model = config.model
    lora = None
    if model.lora_rank > 0:
        lora = LoraConfig(rank=model.lora_rank, alpha=model.lora_alpha,
                          targets=tuple(model.lora_targets))
    speechlm = SpeechLM.from_pretrained(
        _model_dir(model.encoder, DEFAULT_ENCODER, "model.encoder"),
        _model_dir(model.llm, DEFAULT_LLM, "model.llm"),
        model.adapter, device=device, lora=lora)
    teacher = None
    teacher_tokenizer = None
    if config.task == "kd":
        teacher, teacher_tokenizer = speechlm.load_teacher(model.teacher)
    dataset = SpeechDataset(config.data.dir, config.data.split, speechlm.tokenizer,
                            teacher_tokenizer=teacher_tokenizer,
                            max_duration=config.data.max_duration,
                            max_response_tokens=config.data.max_response_tokens,
                            n_mels=speechlm.n_mels)
    if config.task == "align":
        return SpeechAlignTask(speechlm, dataset, batch_size=config.data.batch_size)
    return SpeechDistillTask(speechlm, dataset, task=config.task,
                             batch_size=config.data.batch_size, loss=config.loss,
                             teacher=teacher)


def describe(task: SpeechDistillTask) -> dict[str, Any]:
    """Counts worth printing at the start of a run."""
    trainable = sum(p.numel() for p in task.trainable_parameters())
    total = sum(p.numel() for p in task.speechlm.parameters())
    return {"task": task.task, "rows": len(task.dataset),
            "skipped_rows": dict(task.dataset.skipped), "trainable_parameters": trainable,
            "parameters": total}
