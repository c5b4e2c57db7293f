"""The teacher LLM as a writer of instructions (Magpie) and answers, batched through the
rollout engine.

Magpie: the chat template rendered up to the start of a user turn makes an instruction-tuned
model write a user message. SmolLM2's template adds its default system turn when the messages
start with a user turn; that turn has to stay (measured: with a bare user header 0 of 10
samples ended their turn, with the system turn 9 of 10 did), so the prefix is cut from a
rendered conversation rather than built by hand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from rba_core.errors import ConfigError, TokenizerError
from rba_core.rollout import RolloutEngine, SamplingConfig
from rba_core.rollout.engine import FINISH_STOP
from rba_core.data.tokenizer import Tokenizer

_MARK = "\u0000RBA-USER-TURN\u0000"


@dataclass
class Generation:
    """One sampled text; ``ended`` is True when the model closed its turn (a stop token)."""

    text: str
    ended: bool


class TeacherLike(Protocol):
    """What the pipeline needs from a teacher (tests pass a scripted one)."""

    name: str

    def user_turns(self, groups: list[tuple[str, int]], group_size: int, *, max_new_tokens: int,
                   temperature: float, top_p: float,
                   system: str | None) -> list[list[Generation]]: ...

    def respond(self, user_messages: list[str], seeds: list[int], *, max_new_tokens: int,
                temperature: float) -> list[Generation]: ...


def magpie_prefix(tokenizer: Tokenizer, system: str | None = None) -> str:
    """The rendered chat up to where a user message's text starts, with the template's default
    system turn (or ``system``) first."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": _MARK})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if rendered.count(_MARK) != 1:
        raise TokenizerError(f"{tokenizer.folder}: the chat template does not place the user "
                             "message verbatim, so Magpie cannot find where a user turn starts")
    return rendered.split(_MARK)[0]


class RolloutTeacher:
    """A Llama-family checkpoint with its tokenizer; all sampling goes through one
    RolloutEngine in batches."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, name: str, *,
                 max_prompt_len: int = 1024, max_new_tokens: int = 1024) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.engine = RolloutEngine(model, max_prompt_len=max_prompt_len,
                                    max_new_tokens=max_new_tokens)
        self.stop_ids = tuple(tokenizer.stop_ids)
        if not self.stop_ids:
            raise TokenizerError(f"{tokenizer.folder}: the tokenizer names no end-of-turn token, "
                                 "so a finished user turn cannot be told from a cut-off one")

    @classmethod
    def load(cls, folder: str | os.PathLike | None = None, *, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> "RolloutTeacher":
        """The checkpoint in ``folder`` (default: the prepared default LLM, ``DEFAULT_LLM``)."""
        from rba_core.models.llama import LlamaForCausalLM
        from rba_core.weights.loading import LLM_MODEL_TYPES, load_model
        from rba_core.weights.prepare import DEFAULT_LLM, resolve_model_dir

        path = resolve_model_dir(folder, DEFAULT_LLM, "--teacher")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--teacher {path}: no config.json; pass a Hugging Face-layout "
                              "LLM folder")
        model = load_model(path, dtype=dtype, device=device)
        if not isinstance(model, LlamaForCausalLM):
            raise ConfigError(f"--teacher {path}: needs an LLM checkpoint (model_type one of "
                              f"{', '.join(LLM_MODEL_TYPES)})")
        return cls(model, Tokenizer.from_pretrained(path), path.name)

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False),
                            dtype=torch.long, device=self.engine.device)

    def _texts(self, batch, b: int, g: int) -> Generation:  # type: ignore[no-untyped-def]
        length = int(batch.lengths[b, g])
        ids = batch.tokens[b, g, :length].tolist()
        ended = batch.finish_reasons[b][g] == FINISH_STOP
        return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), ended)

    def user_turns(self, groups: list[tuple[str, int]], group_size: int, *, max_new_tokens: int,
                   temperature: float, top_p: float,
                   system: str | None = None) -> list[list[Generation]]:
        """For each (opening words, seed) group, ``group_size`` user messages sampled after the
        Magpie prefix plus those opening words (returned with the opening words in front)."""
        prefix = magpie_prefix(self.tokenizer, system)
        prompts = [self._ids(prefix + opener) for opener, _ in groups]
        sampling = SamplingConfig(temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, stop_ids=self.stop_ids)
        batch = self.engine.generate(prompts, group_size, sampling,
                                     seeds=[seed for _, seed in groups])
        out = []
        for b, (opener, _) in enumerate(groups):
            row = []
            for g in range(group_size):
                sample = self._texts(batch, b, g)
                row.append(Generation((opener + sample.text).strip(), sample.ended))
            out.append(row)
        return out

    def respond(self, user_messages: list[str], seeds: list[int], *, max_new_tokens: int,
                temperature: float = 0.0) -> list[Generation]:
        """The teacher's reply to each single-turn user message (greedy when temperature is 0);
        ``ended`` False means the reply was cut at ``max_new_tokens``."""
        if not user_messages:
            return []
        prompts = [self._ids(self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}])) for message in user_messages]
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                                  stop_ids=self.stop_ids)
        batch = self.engine.generate(prompts, 1, sampling, seeds=list(seeds))
        replies = [self._texts(batch, b, 0) for b in range(len(user_messages))]
        return [Generation(reply.text.strip(), reply.ended) for reply in replies]
