"""Shared test set-up: the session seed, the markers and the fixtures used by more than one
test module (the builders behind them are in helpers.py).

Markers:
  slow  runs the real default models (the converted SmolLM2 and Whisper, `rba prepare`) or real
        espeak-ng / piper synthesis. They run by default (CI runs them all); deselect them
        with ``-m "not slow"``.
  gpu   needs a CUDA device and runs the Triton kernels compiled, not interpreted. Skipped with
        the reason where torch.cuda.is_available() is False or TRITON_INTERPRET=1; on a GPU
        machine run them as ``TRITON_INTERPRET=0 python -m pytest -m gpu tests``.

Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
anything imports triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import (  # noqa: E402
    ROWS, SESSION_SEED, tiny_speechlm, write_dataset, write_tiny_encoder, write_tiny_llm,
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs the real default models or real TTS engines "
                   "(deselect with -m \"not slow\")")
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; runs the Triton kernels compiled "
                   "(TRITON_INTERPRET=0), skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = "gpu test: torch.cuda.is_available() is False (no CUDA device)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = ("gpu test: TRITON_INTERPRET=1 would interpret the kernels; run "
                  "TRITON_INTERPRET=0 python -m pytest -m gpu tests")
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def pytest_report_header(config):
    return f"rba test seed: {SESSION_SEED} (replay with RBA_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws from its own stream of the session seed."""
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture()
def slm(tmp_path):
    """A tiny random SpeechLM (its LLM saved under tmp_path/llm), only the adapter trainable."""
    return tiny_speechlm(tmp_path / "llm")


@pytest.fixture()
def slm_and_batch(tmp_path):
    """The tiny SpeechLM in training mode and one batch of all three ROWS."""
    from rba_core.data.speech import SpeechDataset

    speechlm = tiny_speechlm(tmp_path / "llm")
    speechlm.train()
    dataset = SpeechDataset(write_dataset(tmp_path / "data"), "train", speechlm.tokenizer)
    batch = dataset.batch(range(len(dataset)))
    assert batch is not None and len(batch) == 3
    return speechlm, batch


@pytest.fixture()
def tiny_models(tmp_path):
    """Folders of a tiny encoder, a tiny LLM and a 6-row dataset, for `speech_config`."""
    return {"encoder": write_tiny_encoder(tmp_path / "encoder"),
            "llm": write_tiny_llm(tmp_path / "llm"),
            "data": write_dataset(tmp_path / "data", ROWS * 2)}
