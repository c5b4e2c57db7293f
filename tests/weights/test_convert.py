"""GGUF and CTranslate2 converters on hand-built blocks and small synthetic files."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers

from rba_core.weights.convert.ctranslate2_whisper import (
    convert_ctranslate2_whisper,
    parse_ctranslate2,
    read_ctranslate2,
)
from rba_core.weights.convert.gguf_llama import (
    convert_gguf_llama,
    dequantize_bf16,
    dequantize_f16,
    dequantize_f32,
    dequantize_q4_1,
    dequantize_q8_0,
    unpermute_qk,
)
from rba_core.errors import ConversionError
from rba_core.data.tokenizer import Tokenizer


def _rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))


# --- dequantizers against blocks built by hand from ggml's layout ---------------------------

def test_q4_1_block_by_hand():
    rng = _rng()
    scale, minimum = np.float16(0.375), np.float16(-1.25)
    values = rng.integers(0, 16, size=32)
    packed = bytes(int(values[j]) | (int(values[j + 16]) << 4) for j in range(16))
    block = scale.tobytes() + minimum.tobytes() + packed
    expected = [float(scale) * int(v) + float(minimum) for v in values]
    second = np.float16(-0.5).tobytes() + np.float16(2.0).tobytes() + bytes([0x1F] * 16)
    got = dequantize_q4_1(np.frombuffer(block + second, dtype=np.uint8))
    np.testing.assert_array_equal(got[:32], np.array(expected, dtype=np.float32))
    # 0x1F: low nibble 15 fills the first half of the block, high nibble 1 the second.
    np.testing.assert_array_equal(got[32:48], np.full(16, -0.5 * 15 + 2.0, dtype=np.float32))
    np.testing.assert_array_equal(got[48:], np.full(16, -0.5 * 1 + 2.0, dtype=np.float32))


def test_q8_0_block_by_hand():
    rng = _rng()
    scale = np.float16(0.0625)
    values = rng.integers(-128, 128, size=32).astype(np.int8)
    block = scale.tobytes() + values.tobytes()
    got = dequantize_q8_0(np.frombuffer(block, dtype=np.uint8))
    np.testing.assert_array_equal(got, values.astype(np.float32) * np.float32(scale))


def test_float_dequantizers_by_hand():
    values = np.array([1.5, -2.25, 0.0, 65280.0], dtype=np.float32)  # exact in f16 and bf16
    np.testing.assert_array_equal(dequantize_f32(values.view(np.uint8)), values)
    np.testing.assert_array_equal(dequantize_f16(values.astype(np.float16).view(np.uint8)), values)
    top_halves = (values.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(dequantize_bf16(top_halves.view(np.uint8)), values)


@pytest.mark.parametrize("kind, ours", [(QT.Q4_1, dequantize_q4_1), (QT.Q8_0, dequantize_q8_0),
                                        (QT.BF16, dequantize_bf16)])
def test_dequantizers_match_gguf_reference(kind, ours):
    data = _rng().standard_normal((6, 96)).astype(np.float32)
    packed = gguf_quantize(data, kind)
    np.testing.assert_array_equal(ours(packed).reshape(6, 96), gguf_dequantize(packed, kind))


def test_truncated_quantized_data_is_an_error():
    with pytest.raises(ConversionError, match="20-byte blocks"):
        dequantize_q4_1(np.zeros(30, dtype=np.uint8))


# --- a synthetic GGUF Llama --------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
TOKENS = SPECIALS + ALPHABET + ["Ġt", "he"]
MERGES = ["Ġ t", "h e"]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what the converter must undo)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, arch="llama", q_type=QT.F32):
    """A 2-layer Llama GGUF; returns the unpermuted originals of the checked tensors."""
    rng = _rng()
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def weight(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    originals = {}
    embed = weight(len(TOKENS), HIDDEN)
    writer.add_tensor("token_embd.weight", gguf_quantize(embed, QT.Q8_0), raw_dtype=QT.Q8_0)
    originals["model.embed_tokens.weight"] = gguf_dequantize(gguf_quantize(embed, QT.Q8_0), QT.Q8_0)
    writer.add_tensor("output_norm.weight", weight(HIDDEN) + 1)
    for i in range(LAYERS):
        q = weight(HEADS * HEAD_DIM, HIDDEN)
        k = weight(KV_HEADS * HEAD_DIM, HIDDEN)
        v = weight(KV_HEADS * HEAD_DIM, HIDDEN)
        o = weight(HIDDEN, HEADS * HEAD_DIM)
        permuted_q = llama_cpp_permute(q, HEADS)
        if q_type == QT.F32:
            writer.add_tensor(f"blk.{i}.attn_q.weight", permuted_q)
        else:
            writer.add_tensor(f"blk.{i}.attn_q.weight", gguf_quantize(permuted_q, q_type),
                              raw_dtype=q_type)
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          llama_cpp_permute(k, KV_HEADS).astype(np.float16))
        writer.add_tensor(f"blk.{i}.attn_v.weight", gguf_quantize(v, QT.Q4_1), raw_dtype=QT.Q4_1)
        writer.add_tensor(f"blk.{i}.attn_output.weight", gguf_quantize(o, QT.BF16),
                          raw_dtype=QT.BF16)
        for name, shape in (("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
                            ("ffn_down", (HIDDEN, FFN))):
            writer.add_tensor(f"blk.{i}.{name}.weight",
                              gguf_quantize(weight(*shape), QT.Q4_1), raw_dtype=QT.Q4_1)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weight(HIDDEN) + 1)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weight(HIDDEN) + 1)
        originals[f"model.layers.{i}.self_attn.q_proj.weight"] = q
        originals[f"model.layers.{i}.self_attn.k_proj.weight"] = k.astype(np.float16).astype(np.float32)
        originals[f"model.layers.{i}.self_attn.v_proj.weight"] = gguf_dequantize(
            gguf_quantize(v, QT.Q4_1), QT.Q4_1)
        originals[f"model.layers.{i}.self_attn.o_proj.weight"] = gguf_dequantize(
            gguf_quantize(o, QT.BF16), QT.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def test_unpermute_inverts_llama_cpp_permutation():
    weight = _rng().standard_normal((6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(weight, 6), 6), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 6), weight)


def test_synthetic_gguf_converts(tmp_path):
    originals = write_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf_llama(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    assert len(tensors) == 2 + LAYERS * 9
    for name, expected in originals.items():
        assert tensors[name].shape == expected.shape, name
        np.testing.assert_array_equal(tensors[name], expected, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["num_hidden_layers"]) == (HIDDEN, HEADS, KV_HEADS,
                                                                         FFN, LAYERS)
    assert config["vocab_size"] == len(TOKENS)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True

    tokenizer = Tokenizer.from_pretrained(out)
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2 and 2 in tokenizer.stop_ids
    the = tokenizer.encode(" the")
    assert the == [TOKENS.index("Ġt"), TOKENS.index("he")]
    # The smollm pre-tokenizer gives every digit its own token.
    assert tokenizer.encode("12") == [TOKENS.index("1"), TOKENS.index("2")]
    text = "Hi <|im_end|> the 42 héllo"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}])

    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                   dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight,
                               torch.from_numpy(originals["model.layers.1.self_attn.q_proj.weight"]),
                               rtol=0, atol=0)


def test_unsupported_tensor_type_is_an_error(tmp_path):
    write_gguf(tmp_path / "q4_0.gguf", q_type=QT.Q4_0)
    with pytest.raises(ConversionError, match=r"attn_q.weight.*Q4_0"):
        convert_gguf_llama(tmp_path / "q4_0.gguf", tmp_path / "hf", progress=False)


def test_unsupported_architecture_is_an_error(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ConversionError, match="architecture 'gpt2'"):
        convert_gguf_llama(tmp_path / "gpt2.gguf", tmp_path / "hf", progress=False)


def test_missing_or_garbage_gguf_is_an_error(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_gguf_llama(tmp_path / "none.gguf", tmp_path / "hf", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="junk.gguf"):
        convert_gguf_llama(tmp_path / "junk.gguf", tmp_path / "hf", progress=False)


# --- a synthetic CTranslate2 Whisper -----------------------------------------------------------

D, WHEADS, WFFN, MELS, VOCAB, SRC_POS, TGT_POS = 32, 4, 64, 80, 60, 16, 8
WHISPER_SPECIALS = {"<|endoftext|>": 50, "<|startoftranscript|>": 51, "<|notimestamps|>": 52}


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6,
              spec: str = "WhisperSpec") -> bytes:
    """Serialize like ctranslate2's ModelSpec.save (format version 6)."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
             np.dtype(np.int32): 3, np.dtype(np.float16): 4}
    out = [struct.pack("<I", version), _ct2_string(spec), struct.pack("<I", 3),
           struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        value = np.asarray(value)
        out += [_ct2_string(name), struct.pack("<B", value.ndim),
                struct.pack(f"<{value.ndim}I", *value.shape), struct.pack("<B", codes[value.dtype]),
                struct.pack("<I", value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_ct2_string(alias), _ct2_string(target)]
    return b"".join(out)


def ct2_whisper_variables(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float16)

    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(WHEADS, np.int16),
        "decoder/num_heads": np.array(WHEADS, np.int16),
        "decoder/activation": np.array(3, np.int8),
        "decoder/pre_norm": np.array(1, np.int8),
        "decoder/alibi": np.array(0, np.int8),
        "encoder/conv1/weight": w(D, MELS, 3), "encoder/conv1/bias": w(D),
        "encoder/conv2/weight": w(D, D, 3), "encoder/conv2/bias": w(D),
        "encoder/position_encodings/encodings": w(SRC_POS, D),
        "encoder/layer_norm/gamma": w(D), "encoder/layer_norm/beta": w(D),
        "decoder/embeddings/weight": w(VOCAB, D),
        "decoder/position_encodings/encodings": w(TGT_POS, D),
        "decoder/layer_norm/gamma": w(D), "decoder/layer_norm/beta": w(D),
    }

    def block(prefix, names_out):
        for name, rows in names_out:
            v[f"{prefix}/{name}/weight"] = w(rows, D if "ffn/linear_1" not in f"{prefix}/{name}" else WFFN)
            v[f"{prefix}/{name}/bias"] = w(rows)

    for stack in ("encoder", "decoder"):
        p = f"{stack}/layer_0"
        block(p, [("self_attention/linear_0", 3 * D), ("self_attention/linear_1", D)])
        v[f"{p}/self_attention/linear_0/bias"][D:2 * D] = 0
        block(p, [("ffn/linear_0", WFFN), ("ffn/linear_1", D)])
        for norm in ("self_attention/layer_norm", "ffn/layer_norm"):
            v[f"{p}/{norm}/gamma"], v[f"{p}/{norm}/beta"] = w(D), w(D)
    p = "decoder/layer_0"
    block(p, [("attention/linear_0", D), ("attention/linear_1", 2 * D), ("attention/linear_2", D)])
    v[f"{p}/attention/layer_norm/gamma"], v[f"{p}/attention/layer_norm/beta"] = w(D), w(D)
    return v


def write_whisper_tokenizer(folder):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {f"t{i}": i for i in range(50)}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.add_special_tokens(list(WHISPER_SPECIALS))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [3, 4],
                                                    "suppress_ids_begin": [5, 50]}))


def test_synthetic_ctranslate2_whisper_round_trip(tmp_path):
    variables = ct2_whisper_variables(_rng())
    blob = write_ct2(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    parsed = parse_ctranslate2(blob)
    assert parsed.spec == "WhisperSpec" and parsed.flag("encoder/num_heads") == WHEADS
    assert parsed.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    for name, value in variables.items():
        np.testing.assert_array_equal(parsed.variables[name], value)

    # Split in two parts, like the Whisper base packages.
    half = len(blob) // 2
    (tmp_path / "model.bin.part1").write_bytes(blob[:half])
    (tmp_path / "model.bin.part2").write_bytes(blob[half:])
    write_whisper_tokenizer(tmp_path / "tok")
    out = convert_ctranslate2_whisper([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"],
                                      tmp_path / "tok", tmp_path / "hf", progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    fused = variables["encoder/layer_0/self_attention/linear_0/weight"].astype(np.float32)
    np.testing.assert_array_equal(tensors["model.encoder.layers.0.self_attn.q_proj.weight"], fused[:D])
    np.testing.assert_array_equal(tensors["model.encoder.layers.0.self_attn.k_proj.weight"], fused[D:2 * D])
    np.testing.assert_array_equal(tensors["model.encoder.layers.0.self_attn.v_proj.weight"], fused[2 * D:])
    fused_bias = variables["decoder/layer_0/self_attention/linear_0/bias"].astype(np.float32)
    np.testing.assert_array_equal(tensors["model.decoder.layers.0.self_attn.v_proj.bias"], fused_bias[2 * D:])
    assert "model.decoder.layers.0.self_attn.k_proj.bias" not in tensors
    cross_kv = variables["decoder/layer_0/attention/linear_1/weight"].astype(np.float32)
    np.testing.assert_array_equal(tensors["model.decoder.layers.0.encoder_attn.k_proj.weight"], cross_kv[:D])
    np.testing.assert_array_equal(tensors["model.decoder.layers.0.encoder_attn.v_proj.weight"], cross_kv[D:])
    assert "proj_out.weight" not in tensors

    config = json.loads((out / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_attention_heads"],
            config["vocab_size"], config["max_source_positions"]) == (D, 1, WHEADS, VOCAB, SRC_POS)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 51 and generation["suppress_tokens"] == [3, 4]
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()

    from transformers import WhisperForConditionalGeneration

    model, info = WhisperForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_ctranslate2_bad_files_are_errors(tmp_path):
    variables = ct2_whisper_variables(_rng())
    blob = write_ct2(variables, {})
    with pytest.raises(ConversionError, match="truncated"):
        parse_ctranslate2(blob[:-100], "cut.bin")
    with pytest.raises(ConversionError, match="format version 5"):
        parse_ctranslate2(write_ct2(variables, {}, version=5))
    (tmp_path / "tok").mkdir()
    write_whisper_tokenizer(tmp_path / "tok")
    (tmp_path / "t5.bin").write_bytes(write_ct2(variables, {}, spec="TransformerSpec"))
    with pytest.raises(ConversionError, match="not a Whisper model"):
        convert_ctranslate2_whisper(tmp_path / "t5.bin", tmp_path / "tok", tmp_path / "hf",
                                    progress=False)
    del variables["decoder/layer_0/attention/linear_2/weight"]
    (tmp_path / "gap.bin").write_bytes(write_ct2(variables, {}))
    with pytest.raises(ConversionError, match="attention/linear_2/weight' is missing"):
        convert_ctranslate2_whisper(tmp_path / "gap.bin", tmp_path / "tok", tmp_path / "hf",
                                    progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        read_ctranslate2(tmp_path / "absent.bin")
