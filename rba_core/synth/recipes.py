"""Task recipes: what each task speaks, what prompt goes beside the audio, and which extra
checks its spoken text must pass. All three share the Magpie + answer + TTS machinery.

- ``instruct``: a Magpie user request is spoken; the teacher's answer is the reference.
- ``qa``: a Magpie user turn started with a question word (drawn per group) must come out as
  one question; the prompt asks for a brief answer, and the teacher's short answer is the
  reference.
- ``translate``: a short Magpie user sentence is spoken; the prompt asks for a translation into
  the target language, and the teacher's translation is the reference.
- ``read`` and ``continue`` (``rba_core.synth.read``): a sentence of the teacher's answers in a
  dataset is spoken, and the reference is the sentence itself (``read``) or the teacher's
  continuation of it (``continue``), the warm start that hears the words (BLSP, Ultravox).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rba_core.errors import ConfigError
from rba_core.data.prompts import teacher_messages
from rba_core.synth.text import sentence_count

QA_PROMPT = "Answer the question in the audio briefly."
READ_PROMPT = "Repeat exactly what was said."
# BLSP's continuation instruction, aimed at the audio. The wording matters for the 135M default
# teacher, which tends to echo the text back: over 24 answer sentences it echoed (fewer than 4
# words of its own) 13 times after "Continue the text in the audio.", 17-21 times after "Write
# the next sentence ..." or "Finish the text ...", and 7 times after this wording.
CONTINUE_PROMPT = "Continue the text in the audio in a coherent and engaging style."
QA_OPENERS = ("What", "Who", "Where", "When", "Which", "How many", "Why", "How")


def translate_prompt(language: str) -> str:
    return f"Translate the audio into {language}."


def teacher_user_message(prompt: str, instruction: str) -> str:
    """The user turn the teacher answers, exactly as training will show it to the teacher."""
    return teacher_messages({"prompt": prompt, "instruction": instruction})[0]["content"]


def _single_question(text: str) -> str | None:
    if not text.endswith("?") or text.count("?") != 1:
        return "not_a_question"
    return None


@dataclass(frozen=True)
class TaskRecipe:
    """``min_words``/``max_words``/``max_sentences`` bound the spoken text; ``openers`` are
    words a user turn may be started with (one drawn per group; empty = none);
    ``response_tokens`` is the default cap on the teacher's answer."""

    name: str
    min_words: int
    max_words: int
    max_sentences: int
    response_tokens: int
    openers: tuple[str, ...] = ()
    check: Callable[[str], str | None] | None = None
    prompt_for: Callable[[str], str] = field(default=lambda language: "")

    def prompt(self, target_language: str) -> str:
        return self.prompt_for(target_language)


RECIPES: dict[str, TaskRecipe] = {
    "instruct": TaskRecipe("instruct", min_words=3, max_words=60, max_sentences=4,
                           response_tokens=256),
    "qa": TaskRecipe("qa", min_words=3, max_words=30, max_sentences=1, response_tokens=64,
                     openers=QA_OPENERS, check=_single_question,
                     prompt_for=lambda language: QA_PROMPT),
    "translate": TaskRecipe("translate", min_words=3, max_words=30, max_sentences=2,
                            response_tokens=128, prompt_for=translate_prompt),
    # Sentences of the teacher's answers, spoken (rba_core.synth.read); no teacher call.
    "read": TaskRecipe("read", min_words=4, max_words=30, max_sentences=1, response_tokens=64,
                       prompt_for=lambda language: READ_PROMPT),
    # The same sentences, and the teacher's continuation of each as the reference.
    "continue": TaskRecipe("continue", min_words=4, max_words=30, max_sentences=1,
                           response_tokens=64, prompt_for=lambda language: CONTINUE_PROMPT),
}


def recipe(task: str) -> TaskRecipe:
    if task not in RECIPES:
        raise ConfigError(f"--task must be one of {', '.join(RECIPES)}, got {task!r}")
    return RECIPES[task]


def sentence_reason(text: str, max_sentences: int) -> str | None:
    return "too_many_sentences" if sentence_count(text) > max_sentences else None
