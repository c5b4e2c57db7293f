"""The prompt contract (rba_core/data/prompts.py): the teacher reads the transcript where the
student hears the audio placeholder, the student prompt splits around that placeholder, the
teacher prompt and the response ids end where the chat template says, and rows with missing or
mistyped fields are ConfigErrors naming the field."""
from __future__ import annotations

import pytest

from helpers import write_tiny_llm
from rba_core.data.prompts import (
    AUDIO_PLACEHOLDER, response_ids, split_student_prompt, student_messages, teacher_messages,
    teacher_prompt_ids,
)
from rba_core.data.tokenizer import Tokenizer
from rba_core.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(write_tiny_llm(tmp_path_factory.mktemp("llm")))


def test_prompts_follow_the_contract():
    row = {"instruction": "what is it", "prompt": "translate the audio into french ."}
    assert teacher_messages(row) == [{"role": "user", "content":
                                      "translate the audio into french .\n\nwhat is it"}]
    assert student_messages(row) == [{"role": "user", "content":
                                      "translate the audio into french .\n\n" + AUDIO_PLACEHOLDER}]
    assert teacher_messages({"instruction": "hi", "prompt": ""})[0]["content"] == "hi"
    assert student_messages({"instruction": "hi"})[0]["content"] == AUDIO_PLACEHOLDER
    with pytest.raises(ConfigError, match="instruction"):
        teacher_messages({"prompt": ""})


@pytest.mark.parametrize("prompt", ["", None, "answer the question briefly ."])
def test_teacher_and_student_differ_only_where_the_instruction_is_spoken(prompt):
    row = {"id": "r1", "instruction": "what color is the sky ?", "prompt": prompt}
    teacher, student = teacher_messages(row), student_messages(row)
    assert [m["role"] for m in teacher] == [m["role"] for m in student] == ["user"]
    assert student[0]["content"].count(AUDIO_PLACEHOLDER) == 1
    assert student[0]["content"].replace(AUDIO_PLACEHOLDER, row["instruction"]) == \
        teacher[0]["content"]
    assert teacher[0]["content"].startswith(prompt or row["instruction"])
    # The student never sees the transcript it is meant to hear.
    assert row["instruction"] not in student[0]["content"]


def test_student_prompt_splits_around_the_placeholder(tokenizer):
    messages = student_messages({"instruction": "x", "prompt": "answer the question briefly ."})
    before, after = split_student_prompt(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    left, right = text.split(AUDIO_PLACEHOLDER)
    assert before == tokenizer.encode(left) and after == tokenizer.encode(right)
    im_start, im_end = (tokenizer.encode(t)[0] for t in ("<|im_start|>", "<|im_end|>"))
    assert before[0] == im_start and tokenizer.decode(before[1:]) == \
        "user answer the question briefly ."
    # After the audio: end of the user turn, then the generation prompt.
    assert after == [im_end, im_start, *tokenizer.encode("assistant")]
    # The instruction's words appear on neither side.
    assert tokenizer.encode("x")[0] not in before + after


def test_student_prompt_needs_exactly_one_placeholder(tokenizer):
    with pytest.raises(ConfigError, match="holds 0 audio placeholders"):
        split_student_prompt(tokenizer, teacher_messages({"instruction": "hello"}))
    doubled = [{"role": "user", "content": AUDIO_PLACEHOLDER + " " + AUDIO_PLACEHOLDER}]
    with pytest.raises(ConfigError, match="holds 2 audio placeholders"):
        split_student_prompt(tokenizer, doubled)


def test_teacher_prompt_ends_with_the_generation_prompt(tokenizer):
    messages = teacher_messages({"instruction": "say hello", "prompt": ""})
    ids = teacher_prompt_ids(tokenizer, messages)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages,
                                                                 add_generation_prompt=True))
    assert ids[-2:] == tokenizer.encode("<|im_start|>assistant\n")
    assert tokenizer.decode(ids, skip_special_tokens=True).split() == \
        ["user", "say", "hello", "assistant"]


def test_response_ids_end_with_the_end_of_turn_token(tokenizer):
    messages = teacher_messages({"instruction": "say hello"})
    ids = response_ids(tokenizer, messages, "hello world .")
    assert ids[:-1] == tokenizer.encode("hello world .")
    assert ids[-1] == tokenizer.encode("<|im_end|>")[0] and ids[-1] in tokenizer.stop_ids
    assert sum(token in tokenizer.stop_ids for token in ids) == 1


@pytest.mark.parametrize("build", [teacher_messages, student_messages])
def test_rows_with_mistyped_fields_are_config_errors(build):
    with pytest.raises(ConfigError, match="must be a mapping"):
        build(["instruction", "prompt"])
    with pytest.raises(ConfigError, match="'r7': field 'prompt' must be a string, got int"):
        build({"id": "r7", "instruction": "hi", "prompt": 3})


def test_missing_instruction_is_a_config_error_for_the_teacher_only():
    with pytest.raises(ConfigError, match="'r2': field 'instruction' must be a string, got "
                                          "NoneType"):
        teacher_messages({"id": "r2", "prompt": "answer briefly ."})
    with pytest.raises(ConfigError, match="field 'instruction' must be a string, got int"):
        teacher_messages({"instruction": 5})
    # The student hears the instruction instead of reading it, so it needs only the prompt.
    assert student_messages({"prompt": "answer briefly ."})[0]["content"] == \
        "answer briefly .\n\n" + AUDIO_PLACEHOLDER
