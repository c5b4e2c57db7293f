"""CTC pre-alignment of the audio adapter to the LLM's own token embeddings (``task=align``):
the CTC head and loss, and :class:`SpeechAlignTask`, which runs them under the trainer.

A fresh adapter emits vectors the frozen LLM has never seen, and distillation (SFT/KD) has to
find the words in them through the whole LLM, one answer at a time: a weak, expensive signal.
This stage gives the adapter a dense, cheap one first. Each adapter output is scored against
the LLM's *input* embeddings of the words the clip contains (plus a learned CTC blank), and a
CTC loss asks the sequence of outputs to spell the transcript's tokens in order. The LLM
itself never runs, so a step costs about as much as the adapter: on a CPU it is 10-30x cheaper
than a KD step. Afterwards, the LLM reads spoken words as (near) its own token embeddings with
blanks between them, and KD only has to teach it to ignore the blanks and answer.

The classes are the *alignment vocabulary*: the tokens the training transcripts use. Scoring
only those, not the LLM's whole vocabulary, makes the CTC softmax ~15x cheaper on SmolLM2 and
changes nothing for the rows trained on; the adapter's outputs stay free vectors in the
embedding space, so an unseen word still lands near related tokens.

    head = CTCAlignHead(alignment_vocabulary(transcripts), dim=llm.config.hidden_size)
    audio, lengths = speechlm.speech_embeddings(features, frame_lengths)
    loss, metrics = ctc_align_loss(head, audio, lengths, transcripts,
                                   llm.model.embed_tokens.weight)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rba_core.errors import ConfigError
from rba_core.tasks.speech import (
    SpeechTask, SpeechTaskConfig, load_augmenter, load_dataset, load_speechlm,
)
from rba_core.train.config import invalid

if TYPE_CHECKING:
    from rba_core.data.augment import Augmenter
    from rba_core.data.speech import SpeechBatch, SpeechDataset
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.models.speechlm import SpeechLM

BLANK = 0  # class 0 is the CTC blank; class i + 1 is vocabulary token i


@dataclass
class AlignConfig(SpeechTaskConfig):
    """``task=align``: the speech tasks' sections; alignment has no settings of its own."""

    TASKS: ClassVar[tuple[str, ...]] = ("align",)
    MOVED: ClassVar[dict[str, str]] = {
        "loss": "task=align has no loss settings (KD's are the 'kd' section now, read by "
                "task=kd only); remove the 'loss' section"}

    task: str = "align"

    def validate(self) -> None:
        super().validate()
        if self.model.lora_rank > 0:
            invalid("model.lora_rank", "0 with task=align (CTC alignment trains the adapter "
                    "only; the LLM does not run)", self.model.lora_rank)


def spoken_text(row: Mapping[str, Any]) -> str:
    """What the clip says: the TTS input (numbers and symbols spelled out) when the manifest
    keeps it, else the instruction."""
    text = row.get("spoken_text") or row.get("instruction")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"dataset row {row.get('id', '?')!r} has no transcript: CTC alignment "
                          "needs a non-empty 'spoken_text' or 'instruction'")
    return text


def transcript_ids(tokenizer: "Tokenizer", row: Mapping[str, Any]) -> list[int]:
    """The transcript's token ids, tokenized as the text teacher reads it (no chat markup)."""
    return tokenizer.encode(spoken_text(row))


def alignment_vocabulary(transcripts: Iterable[Sequence[int]]) -> list[int]:
    """Sorted distinct token ids of the transcripts: the head's classes besides the blank."""
    vocabulary = sorted({int(t) for ids in transcripts for t in ids})
    if not vocabulary:
        raise ConfigError("CTC alignment: the transcripts hold no tokens; the dataset needs rows "
                          "with non-empty spoken text")
    return vocabulary


class CTCAlignHead(nn.Module):
    """Log-probabilities over blank + ``vocabulary`` for each adapter output.

    A class's logit is the dot product of the adapter output with the LLM's input embedding of
    that token (the frozen embedding matrix is passed to ``forward``, not copied here), times a
    learned scale; the blank has a learned vector of its own. Only the blank and the scale are
    parameters here; they exist for training and are not part of the adapter.
    """

    def __init__(self, vocabulary: Sequence[int], *, dim: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        vocabulary = list(vocabulary)
        if not vocabulary or min(vocabulary) < 0:
            raise ValueError("CTCAlignHead: vocabulary must be non-empty token ids >= 0 "
                             "(alignment_vocabulary)")
        self.register_buffer("vocabulary", torch.tensor(vocabulary, dtype=torch.long,
                                                        device=device), persistent=False)
        self.class_of = {token: index + 1 for index, token in enumerate(vocabulary)}
        self.largest_token = max(vocabulary)
        self.blank = nn.Parameter(torch.zeros(dim, device=device, dtype=torch.float32))
        self.log_scale = nn.Parameter(torch.zeros((), device=device, dtype=torch.float32))

    def classes(self, ids: Sequence[int]) -> list[int]:
        """CTC target classes of token ids; a token outside the vocabulary is an error."""
        try:
            return [self.class_of[int(t)] for t in ids]
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]} is not in the alignment vocabulary; "
                             "build it from every transcript the head will score "
                             "(alignment_vocabulary)") from None

    def forward(self, audio: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``audio [B, N, D]`` and the LLM's input embeddings ``[V, D]`` -> float32
        log-probabilities ``[B, N, 1 + K]``."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.blank.shape[0] \
                or self.largest_token >= embeddings.shape[0]:
            raise ValueError(f"CTCAlignHead: embeddings must be [V, {self.blank.shape[0]}] with "
                             f"V > {self.largest_token}, got {tuple(embeddings.shape)}")
        table = torch.cat([self.blank[None], embeddings.detach()[self.vocabulary].float()])
        logits = audio.float() @ table.T
        return (logits * self.log_scale.exp()).log_softmax(-1)


def ctc_align_loss(head: CTCAlignHead, audio: torch.Tensor, audio_lengths: torch.Tensor,
                   transcripts: Sequence[Sequence[int]], embeddings: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """CTC loss of adapter outputs ``audio [B, N, D]`` (``audio_lengths [B]`` valid each)
    spelling each clip's transcript token ids, scored against the LLM's input ``embeddings``.
    Summed over clips and divided by the transcript tokens (a per-token mean, so micro-batches
    weighted by their token counts average exactly). A clip with more tokens than adapter
    outputs cannot be aligned: it adds nothing and is counted in ``ctc_infeasible``."""
    if len(transcripts) != audio.shape[0]:
        raise ValueError(f"ctc_align_loss: {len(transcripts)} transcripts for a batch of "
                         f"{audio.shape[0]} clips")
    log_probs = head(audio, embeddings)
    device = log_probs.device
    targets = [head.classes(ids) for ids in transcripts]
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long, device=device)
    lengths = audio_lengths.to(device=device, dtype=torch.long)
    flat = torch.tensor([c for t in targets for c in t], dtype=torch.long, device=device)
    per_clip = F.ctc_loss(log_probs.transpose(0, 1), flat, lengths, target_lengths, blank=BLANK,
                          reduction="none", zero_infinity=True)
    tokens = int(target_lengths.sum())
    loss = per_clip.sum() / max(tokens, 1)
    with torch.no_grad():
        valid = torch.arange(log_probs.shape[1], device=device)[None] < lengths[:, None]
        is_blank = (log_probs.argmax(-1) == BLANK)[valid].float()
        blank_share = float(is_blank.mean()) if is_blank.numel() else 0.0
    metrics = {"loss": float(loss.detach()), "tokens": float(tokens),
               "ctc_infeasible": float((target_lengths > lengths).sum()),
               "blank_share": blank_share, "logit_scale": float(head.log_scale.detach().exp())}
    return loss, metrics


def greedy_decode(head: CTCAlignHead, log_probs: torch.Tensor, length: int) -> list[int]:
    """Best-path CTC decoding of one clip's log-probabilities: token ids, repeats and blanks
    removed (for inspecting what the adapter spells)."""
    best = log_probs[:length].argmax(-1).tolist()
    tokens, previous = [], BLANK
    for cls in best:
        if cls != previous and cls != BLANK:
            tokens.append(int(head.vocabulary[cls - 1]))
        previous = cls
    return tokens


class SpeechAlignTask(SpeechTask):
    """``task="align"``: CTC pre-alignment of the adapter to the LLM's token embeddings. The
    loss is a per-token mean over each clip's transcript tokens, which weight the batch; it
    never runs the LLM, and the CTC head's blank vector and scale train beside the adapter
    (they are checkpointed, not exported)."""

    TASKS = AlignConfig.TASKS

    def __init__(self, speechlm: "SpeechLM", dataset: "SpeechDataset", *,
                 batch_size: int, augment: "Augmenter | None" = None) -> None:
        super().__init__(speechlm, dataset, task="align", batch_size=batch_size,
                         augment=augment)
        # Every rank reads the same rows, so every rank builds the same vocabulary.
        self.transcripts = {str(row["id"]): transcript_ids(speechlm.tokenizer, row)
                            for row in dataset.rows}
        self.head = CTCAlignHead(alignment_vocabulary(self.transcripts.values()),
                                 dim=speechlm.llm.config.hidden_size, device=speechlm.device)
        self.encoder_cache: dict[str, torch.Tensor] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.speechlm.trainable_parameters(), *self.head.parameters()]

    def loss_tokens(self, batch: "SpeechBatch") -> float:
        return float(sum(len(self.transcripts[i]) for i in batch.ids))

    def _encoder_frames(self, batch: "SpeechBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's encoder frames, from the cache when every clip has been encoded. A
        frozen encoder gives every clip the same frames each epoch, and on the CPU it costs
        several times the rest of an alignment step. Augmented clips differ each epoch: they
        are encoded afresh and never cached (the cache holds the clips as recorded)."""
        if self.speechlm.train_encoder or batch.augmented:
            return self.speechlm.encode(batch.features, batch.frame_lengths)
        if not all(i in self.encoder_cache for i in batch.ids):
            hidden, lengths = self.speechlm.encode(batch.features, batch.frame_lengths)
            for row, clip_id in enumerate(batch.ids):
                self.encoder_cache[clip_id] = hidden[row, : int(lengths[row])].detach()
        clips = [self.encoder_cache[i] for i in batch.ids]
        lengths = torch.tensor([c.shape[0] for c in clips], device=clips[0].device)
        return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths

    def batch_loss(self, batch: "SpeechBatch") -> tuple[torch.Tensor, dict[str, float]]:
        audio, lengths = self.speechlm.adapt(*self._encoder_frames(batch))
        return ctc_align_loss(self.head, audio, lengths, [self.transcripts[i] for i in batch.ids],
                              self.speechlm.llm.model.embed_tokens.weight)


def build_align_task(config: AlignConfig, device: torch.device) -> SpeechAlignTask:
    """The SpeechLM and the dataset that ``config`` names, on ``device`` (no teacher: the
    targets are the LLM's own token embeddings)."""
    # Before the models load: a missing augmentation package fails at once.
    augment = load_augmenter(config.data)
    speechlm = load_speechlm(config.model, device)
    return SpeechAlignTask(speechlm, load_dataset(config.data, speechlm),
                           batch_size=config.data.batch_size, augment=augment)
