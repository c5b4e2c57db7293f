"""The chat messages of a dataset row, for the teacher (transcript) and the student (speech).

Both sides see the same text except that the student's spoken instruction is replaced by
``AUDIO_PLACEHOLDER``; the SpeechLM splits the rendered chat prompt at that marker and splices
the audio embeddings there. Synthesis, training and evaluation all build prompts here, so the
teacher's answers and the student's prompts always agree.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rba_core.errors import ConfigError

if TYPE_CHECKING:
    from rba_core.data.tokenizer import Tokenizer

AUDIO_PLACEHOLDER = "<|audio|>"


def _field(row: Mapping[str, Any], name: str, *, required: bool) -> str:
    if not isinstance(row, Mapping):
        raise ConfigError(f"a dataset row must be a mapping with 'instruction' and 'prompt', got "
                          f"{type(row).__name__}")
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"dataset row {row.get('id', '?')!r}: field {name!r} must be a string, "
                          f"got {type(value).__name__}")
    return value


def _user_content(prompt: str, body: str) -> str:
    return body if not prompt else prompt + "\n\n" + body


def teacher_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The text-only chat the teacher answers: the task prompt (if any) and the transcript."""
    instruction = _field(row, "instruction", required=True)
    return [{"role": "user", "content": _user_content(_field(row, "prompt", required=False),
                                                      instruction)}]


def student_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat the SpeechLM answers: the task prompt (if any) and the audio placeholder."""
    return [{"role": "user", "content": _user_content(_field(row, "prompt", required=False),
                                                      AUDIO_PLACEHOLDER)}]


def split_student_prompt(tokenizer: "Tokenizer", messages: list[dict[str, Any]]
                         ) -> tuple[list[int], list[int]]:
    """Token ids of the rendered student chat prompt (with the generation prompt) before and
    after the audio placeholder; each side is tokenized on its own."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    count = text.count(AUDIO_PLACEHOLDER)
    if count != 1:
        raise ConfigError(f"the rendered student prompt holds {count} audio placeholders "
                          f"({AUDIO_PLACEHOLDER!r}); a SpeechLM prompt needs exactly one, e.g. "
                          "prompts.student_messages(row)")
    before, after = text.split(AUDIO_PLACEHOLDER)
    return tokenizer.encode(before), tokenizer.encode(after)


def teacher_prompt_ids(tokenizer: "Tokenizer", messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the rendered teacher chat prompt, ending with the generation prompt."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def response_ids(tokenizer: "Tokenizer", messages: list[dict[str, Any]], response: str
                 ) -> list[int]:
    """Token ids of ``response`` as the assistant's turn after ``messages``, ending with the
    template's end-of-turn token (the stop id the model must learn to emit). Taken from the
    template itself (full chat minus the prompt), so any chat format gets its own ending."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
    stops = set(tokenizer.stop_ids)
    if full.startswith(prompt) and full[len(prompt):].startswith(response):
        ids = tokenizer.encode(full[len(prompt):])
        for position, token in enumerate(ids):
            if token in stops:
                return ids[: position + 1]
    ids = tokenizer.encode(response)
    if tokenizer.eos_id is not None:
        ids.append(int(tokenizer.eos_id))
    return ids
