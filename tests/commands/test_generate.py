"""`rba generate`: a prompt the model cannot take, or a chat template the sandbox refuses, is
one line before any weights load."""
from __future__ import annotations

import json
import time
import tracemalloc

from helpers import write_tiny_llm
from rba_core.cli import main


def test_a_prompt_past_the_context_is_one_line_before_the_model_loads(tmp_path, capsys,
                                                                      monkeypatch):
    from rba_core.weights import loading

    folder = write_tiny_llm(tmp_path / "llm")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded for a prompt the model cannot take")

    monkeypatch.setattr(loading, "load_model", no_weights)
    prompt = " ".join(["hello"] * 20001)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        status = main(["generate", "--model", str(folder), "--prompt", prompt])
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 2 and elapsed < 5.0 and peak < 64 * 2**20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--prompt is 20006 tokens in the chat template; with --max-new-tokens 64 that " \
           "passes the model's context of 8192 tokens" in err
    assert "shorten --prompt or lower --max-new-tokens" in err


def test_a_template_the_sandbox_refuses_is_one_line(tmp_path, capsys):
    folder = write_tiny_llm(tmp_path / "llm")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"the chat template of {folder} was refused by the sandbox" in err
    assert "tokenizer_config.json" in err
