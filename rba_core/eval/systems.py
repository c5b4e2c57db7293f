"""The systems ``rba eval`` compares, all answering the same items through the one decode path
(``rba_core.rollout.generate``): the teacher reading the text (the ceiling) and the SpeechLM
hearing the audio with a named adapter, or with a fresh (untrained) one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rba_core.data.prompts import (
    split_student_prompt, student_messages, teacher_messages, teacher_prompt_ids,
)
from rba_core.errors import ConfigError
from rba_core.models.lora import lora_disabled

if TYPE_CHECKING:
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.models.speechlm import SpeechLM
    from rba_core.rollout import RolloutEngine, SamplingConfig


@dataclass
class Item:
    """One prompt of a suite: ``text`` is what the teacher reads and the audio says, ``prompt``
    the task prompt beside it (both systems see it), ``group`` the TTS engine (results are
    also given per engine), ``gold`` what the suite scores against."""

    id: str
    text: str
    prompt: str
    audio: Path | None
    group: str
    gold: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, prompt: str | None = None) -> dict[str, str]:
        """The chat row ``rba_core.data.prompts`` renders; ``prompt`` replaces the task prompt
        (the repeat check)."""
        return {"instruction": self.text, "prompt": self.prompt if prompt is None else prompt}


def _batches(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


class System(ABC):
    """Something that answers items: ``answer_ids`` gives new token ids per item (ending at the
    stop id when it stopped)."""

    name: str

    @abstractmethod
    def answer_ids(self, items: Sequence[Item], sampling: "SamplingConfig", *,
                   prompt: str | None = None, batch_size: int = 8, seed: int = 0,
                   progress: Any = None) -> list[list[int]]:
        """New token ids per item, in order."""

    def close(self) -> None:
        """Drop the model (the runner keeps one SpeechLM in memory at a time)."""


class TeacherText(System):
    """The teacher LLM reading each item's text (with LoRA off when it carries one)."""

    def __init__(self, name: str, teacher: "LlamaForCausalLM", tokenizer: "Tokenizer") -> None:
        self.name = name
        self.teacher = teacher
        self.tokenizer = tokenizer
        self._engine: "RolloutEngine | None" = None

    def answer_ids(self, items, sampling, *, prompt=None, batch_size=8, seed=0, progress=None):
        from rba_core.rollout import RolloutEngine, generate

        out: list[list[int]] = []
        for start, batch in enumerate(_batches(items, batch_size)):
            prompts = [teacher_prompt_ids(self.tokenizer, teacher_messages(item.row(prompt)))
                       for item in batch]
            longest = max(len(p) for p in prompts)
            if self._engine is None or self._engine.max_prompt_len < longest \
                    or self._engine.max_new_tokens < sampling.max_new_tokens:
                self._engine = RolloutEngine(self.teacher, max_prompt_len=max(longest, 1024),
                                             max_new_tokens=max(sampling.max_new_tokens, 256))
            with torch.no_grad(), lora_disabled(self.teacher):
                out += generate(self.teacher, prompts, sampling,
                                seed=seed + start * batch_size, engine=self._engine)
            if progress is not None:
                progress.update(len(batch))
        return out


class SpeechSystem(System):
    """The SpeechLM hearing each item's audio; ``adapter`` None is a fresh adapter drawn from
    the seed (the untrained line)."""

    def __init__(self, name: str, speechlm: "SpeechLM", adapter: Path | None) -> None:
        self.name = name
        self.speechlm = speechlm
        self.adapter = adapter

    def answer_ids(self, items, sampling, *, prompt=None, batch_size=8, seed=0, progress=None):
        from rba_core.data.audio import load_speech

        slm = self.speechlm
        slm.eval()
        out: list[list[int]] = []
        for start, batch in enumerate(_batches(items, batch_size)):
            if any(item.audio is None for item in batch):
                raise ConfigError("a SpeechLM system needs audio for every item; the suite "
                                  "should have left out the items without")
            waves = [load_speech(item.audio) for item in batch]
            features, lengths = slm.features(waves)
            pieces = [split_student_prompt(slm.tokenizer, student_messages(item.row(prompt)))
                      for item in batch]
            out += slm.generate_pieces(features, lengths, [p[0] for p in pieces],
                                       [p[1] for p in pieces], sampling,
                                       seed=seed + start * batch_size)
            if progress is not None:
                progress.update(len(batch))
        return out

    def close(self) -> None:
        self.speechlm = None  # type: ignore[assignment]


@dataclass
class ModelPaths:
    """The folders the systems are built from (resolved by the command)."""

    encoder: Path
    llm: Path
    teacher: Path | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")


def load_teacher(paths: ModelPaths) -> tuple["LlamaForCausalLM", "Tokenizer"]:
    """The text teacher: the SpeechLM's own LLM folder, or ``paths.teacher`` (checked to share
    the LLM's vocabulary, since the teacher scores the SpeechLM's token ids)."""
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.models.speechlm import load_teacher as load_other

    tokenizer = Tokenizer.from_pretrained(paths.llm)
    if paths.teacher is None:
        llm = LlamaForCausalLM.from_pretrained(paths.llm, dtype=paths.dtype, device=paths.device)
        llm.requires_grad_(False)
        return llm.eval(), tokenizer
    teacher, _ = load_other(paths.teacher, tokenizer, dtype=paths.dtype, device=paths.device)
    return teacher.eval(), tokenizer


def load_speech_system(name: str, paths: ModelPaths, adapter: Path | None, *,
                       seed: int) -> SpeechSystem:
    """A fresh SpeechLM per system: an adapter folder may carry LoRA, which must not leak into
    the next system's LLM. The untrained adapter is drawn after seeding with ``seed``."""
    from rba_core.models.speechlm import SpeechLM

    torch.manual_seed(seed)
    slm = SpeechLM.from_pretrained(paths.encoder, paths.llm, adapter, dtype=paths.dtype,
                                   device=paths.device)
    return SpeechSystem(name, slm.eval(), adapter)


def with_stops(sampling: "SamplingConfig", tokenizer: "Tokenizer") -> "SamplingConfig":
    """``sampling`` stopping at the tokenizer's stop ids when it names none."""
    if sampling.stop_ids:
        return sampling
    return replace(sampling, stop_ids=tuple(int(t) for t in tokenizer.stop_ids))
