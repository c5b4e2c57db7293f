"""`rba chat`: bad input refused before any model loads, dataset clips answered beside the
teacher on tiny models, and one end-to-end run on the real default models (slow)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ROWS, write_dataset, write_long_wav, write_tiny_encoder, write_tiny_llm
from rba_core.errors import ConfigError
from rba_core.models.speechlm import SpeechLM


def _run_command(module_name: str, argv: list[str], capsys) -> str:
    import importlib

    parser = argparse.ArgumentParser(prog="rba")
    importlib.import_module(module_name).register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_chat_on_real_default_models(tmp_path, capsys):
    from rba_core.weights.prepare import default_model_dir

    for name in ("whisper-tiny.en", "smollm2-135m-instruct"):
        assert (Path(default_model_dir(name)) / "config.json").is_file(), \
            f"{name} is not prepared: run `rba prepare`"
    assert shutil.which("espeak-ng"), "espeak-ng is missing: run `make install`"
    question = "What is the capital of France?"
    wav = tmp_path / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), question], check=True, capture_output=True)

    out = _run_command("rba_core.commands.chat", ["chat", "--audio", str(wav), "--transcript",
                                                  question, "--max-new-tokens", "12"], capsys)
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("speechlm: ") and lines[1].startswith("teacher:")
    assert lines[0][len("speechlm: "):].strip()
    teacher_answer = lines[1][len("teacher:"):].strip()
    direct = _run_command("rba_core.commands.generate", ["generate", "--prompt", question,
                                                         "--max-new-tokens", "12"], capsys)
    assert teacher_answer == direct.strip()
    assert "Paris" in teacher_answer


def test_chat_rejects_bad_input_before_loading_models(tmp_path, capsys):
    from rba_core.errors import AudioError

    with pytest.raises(AudioError, match="missing.wav"):
        _run_command("rba_core.commands.chat", ["chat", "--audio", str(tmp_path / "missing.wav")],
                     capsys)
    with pytest.raises(ConfigError, match="max-new-tokens"):
        _run_command("rba_core.commands.chat", ["chat", "--audio", "x.wav",
                                                "--max-new-tokens", "0"], capsys)


def test_chat_refuses_a_two_hour_file_in_one_line_before_loading_models(tmp_path, capsys,
                                                                       monkeypatch):
    from rba_core.cli import main

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for audio that cannot be used")

    monkeypatch.setattr(SpeechLM, "from_pretrained", no_models)
    long = write_long_wav(tmp_path / "lecture.wav", 2 * 3600)
    start = time.perf_counter()
    assert main(["chat", "--audio", str(long)]) == 2
    assert time.perf_counter() - start < 2.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "lecture.wav: 7200.0 s long; at most 30 s" in err


def test_chat_answers_dataset_clips_beside_the_teacher(tmp_path, capsys):
    from rba_core.rollout import SamplingConfig, generate
    from rba_core.data.prompts import teacher_messages, teacher_prompt_ids

    encoder, llm = write_tiny_encoder(tmp_path / "encoder"), write_tiny_llm(tmp_path / "llm")
    data = write_dataset(tmp_path / "data")
    models = ["--encoder", str(encoder), "--llm", str(llm), "--max-new-tokens", "3"]
    out = _run_command("rba_core.commands.chat", ["chat", "--data", str(data), "--split",
                                                  "train", "--limit", "2", *models], capsys)
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    slm = SpeechLM.from_pretrained(encoder, llm)
    for block, row in zip(blocks, ROWS):
        said, speech, teacher = block.splitlines()
        assert said.endswith(f"voice en] said: {row['instruction']}")
        assert speech.startswith("speechlm: ")
        reply = generate(slm.llm, [teacher_prompt_ids(slm.tokenizer, teacher_messages(row))],
                         SamplingConfig(temperature=0.0, max_new_tokens=3,
                                        stop_ids=tuple(slm.tokenizer.stop_ids)))[0]
        assert teacher == "teacher:  " + slm.tokenizer.decode(reply,
                                                              skip_special_tokens=True).strip()
    with pytest.raises(ConfigError, match="no rows in split 'heldout'"):
        _run_command("rba_core.commands.chat", ["chat", "--data", str(data), *models], capsys)
    with pytest.raises(ConfigError, match="go with --audio"):
        _run_command("rba_core.commands.chat", ["chat", "--data", str(data), "--transcript",
                                                "x", *models], capsys)
    with pytest.raises(ConfigError, match="--limit must be at least 1"):
        _run_command("rba_core.commands.chat", ["chat", "--data", str(data), "--limit", "0",
                                                *models], capsys)
