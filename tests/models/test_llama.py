"""Llama-family decoder against transformers on random tiny checkpoints of each family:
logits, hidden states, greedy generation with and without the KV cache, left-padded batches,
sampling controls, bad configs and checkpoints, and `rba generate` end to end."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import SESSION_SEED, reference_generate, relative_error
from rba_core.cli import main as cli_main
from rba_core.errors import CheckpointError, ConfigError
from rba_core.weights.loading import load_model
from rba_core.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from rba_core.rollout import SamplingConfig, generate

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False)),
    "llama3-rope-scaling-tied": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral-sliding-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                               dict(sliding_window=6, num_key_value_heads=1)),
    "qwen2-biases-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                          dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's random tiny transformers model, saved in Hugging Face layout."""
    generator = torch.Generator().manual_seed(SESSION_SEED)
    built = {}
    for name, (config_class, model_class, extra) in CASES.items():
        hf = model_class(config_class(**{**COMMON, **extra})).eval()
        with torch.no_grad():
            # Larger than the default init so that logits are far from uniform and greedy
            # choices are decided by clear margins.
            for parameter in hf.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder, safe_serialization=True)
        built[name] = (hf, folder)
    return built


def random_ids(batch: int, length: int) -> torch.Tensor:
    # Ids 3.. only: 0-2 are pad/BOS/EOS.
    return torch.randint(3, VOCAB, (batch, length))


@pytest.mark.parametrize("case", CASES)
def test_logits_and_hidden_match_transformers(checkpoints, case):
    hf, folder = checkpoints[case]
    ours = LlamaForCausalLM.from_pretrained(folder)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = random_ids(2, 20)
    with torch.no_grad():
        reference = hf(ids)
        reference_hidden = hf.model(ids).last_hidden_state
        logits = ours(ids)
        hidden = ours(ids, return_hidden=True)
        from_embeds = ours(inputs_embeds=ours.embed(ids))
    assert logits.shape == (2, 20, VOCAB)
    assert relative_error(logits, reference.logits) <= 1e-5
    assert relative_error(hidden, reference_hidden) <= 1e-5
    assert torch.equal(from_embeds, logits)
    assert torch.equal(ours.lm_head_weight, hf.lm_head.weight)


@pytest.mark.parametrize("case", ["llama", "mistral-sliding-window"])
def test_padded_logits_match_transformers(checkpoints, case):
    hf, folder = checkpoints[case]
    ours = LlamaForCausalLM.from_pretrained(folder)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        reference = hf(ids, attention_mask=mask, position_ids=positions).logits
        logits = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert relative_error(logits[real], reference[real]) <= 1e-5


def greedy(model, prompts, max_new_tokens, stop_ids=()):
    """The package's one decode path: the rollout engine at group size 1."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                              stop_ids=tuple(stop_ids))
    return generate(model, prompts, sampling)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(checkpoints, case):
    hf, folder = checkpoints[case]
    ours = LlamaForCausalLM.from_pretrained(folder)
    prompt = random_ids(1, 7)
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=14, do_sample=False, pad_token_id=0,
                               eos_token_id=2)[0, 7:].tolist()
    cached = reference_generate(ours, [prompt[0].tolist()], max_new_tokens=14, stop_ids=[2])
    uncached = reference_generate(ours, [prompt[0].tolist()], max_new_tokens=14,
                                  stop_ids=[2], use_cache=False)
    assert cached == [expected]
    assert uncached == [expected]
    if not any(ours.config.sliding_windows):  # the engine refuses sliding windows
        assert greedy(ours, [prompt[0].tolist()], 14, stop_ids=[2]) == [expected]


@pytest.mark.parametrize("case", ["llama", "mistral-sliding-window", "qwen2-biases-tied"])
def test_left_padded_batch_equals_unbatched(checkpoints, case):
    hf, folder = checkpoints[case]
    ours = LlamaForCausalLM.from_pretrained(folder)
    prompts = [random_ids(1, n)[0].tolist() for n in (3, 9, 6)]
    batched = reference_generate(ours, prompts, max_new_tokens=10)
    single = [reference_generate(ours, [prompt], max_new_tokens=10)[0] for prompt in prompts]
    uncached = reference_generate(ours, prompts, max_new_tokens=10, use_cache=False)
    assert batched == single
    assert uncached == single
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[:, width:].tolist()
    assert batched == expected
    if not any(ours.config.sliding_windows):
        assert greedy(ours, prompts, 10) == expected


def test_kv_cache_decoding_equals_full_forward_without_reallocation(checkpoints):
    _, folder = checkpoints["mistral-sliding-window"]
    ours = LlamaForCausalLM.from_pretrained(folder)
    ids = random_ids(2, 14)
    cache = ours.new_kv_cache(batch_size=2, max_len=14)
    storage = cache.keys.data_ptr()
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :8], kv_cache=cache)]
        steps += [ours(ids[:, i:i + 1], kv_cache=cache) for i in range(8, 12)]
        steps.append(ours(ids[:, 12:], kv_cache=cache))
        with pytest.raises(ValueError, match="max_len"):
            ours(ids[:, :1], kv_cache=cache)
    assert cache.length == 14 and cache.keys.data_ptr() == storage
    assert relative_error(torch.cat(steps, dim=1), full) <= 1e-5


def test_forward_rejects_ambiguous_inputs(checkpoints):
    _, folder = checkpoints["llama"]
    ours = LlamaForCausalLM.from_pretrained(folder)
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(ids, inputs_embeds=ours.embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        ours()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(ids, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="batch 3"):
        ours(ids, kv_cache=KVCache(ours.config, 3, 8))


def test_bfloat16_load_keeps_rope_in_float32(checkpoints):
    hf, folder = checkpoints["llama3-rope-scaling-tied"]
    ours = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert ours.lm_head_weight.dtype == torch.bfloat16
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = random_ids(1, 10)
    with torch.no_grad():
        reference = hf(ids).logits
        logits = ours(ids).float()
    assert relative_error(logits, reference) < 0.05
    reloaded = load_model(folder).to(torch.bfloat16)
    assert reloaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)


def test_sharded_transformers_checkpoint_loads(checkpoints, tmp_path):
    hf, _ = checkpoints["qwen2-biases-tied"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path)
    assert isinstance(ours, LlamaForCausalLM)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert relative_error(ours(ids), hf(ids).logits) <= 1e-5


def copy_checkpoint(source, target):
    shutil.copytree(source, target)
    return target


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_missing_config_field_names_field_and_file(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["llama"][1], tmp_path / "ckpt")
    edit_config(folder, hidden_size=None)
    with pytest.raises(ConfigError, match=r"ckpt/config.json: missing field 'hidden_size'"):
        load_model(folder)


def test_unsupported_architecture_and_model_type(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["llama"][1], tmp_path / "ckpt")
    edit_config(folder, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ConfigError, match=r"ckpt/config.json: architecture "
                                          r"'LlamaForSequenceClassification' is not supported"):
        LlamaForCausalLM.from_pretrained(folder)
    edit_config(folder, model_type="gpt2", architectures=None)
    with pytest.raises(ConfigError, match=r"model_type 'gpt2'.*llama, mistral, qwen2, whisper"):
        load_model(folder)
    edit_config(folder, model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match=r"config.json: rope type 'yarn'"):
        LlamaConfig.from_pretrained(folder)


def test_checkpoint_mismatch_names_tensor(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["llama"][1], tmp_path / "ckpt")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in message
    edit_config(folder, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight "
                                              r"\(file \[96, 64\], model \[80, 64\]\)"):
        load_model(folder)


def write_word_tokenizer(folder) -> dict[str, int]:
    """A word-level tokenizer over the tiny vocabulary, with a ChatML-like template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant"] + [f"w{i}" for i in range(VOCAB - 6)]
    vocab = {token: index for index, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tokenizer.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
                "{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "pad_token": "<pad>"}))
    return vocab


def test_rba_generate_applies_chat_template(checkpoints, tmp_path, capsys):
    hf, source = checkpoints["llama"]
    folder = copy_checkpoint(source, tmp_path / "chat")
    vocab = write_word_tokenizer(folder)
    words = {index: token for token, index in vocab.items()}
    prompt = [vocab[t] for t in ["<|im_start|>", "system", "w1", "<|im_end|>", "<|im_start|>",
                                 "user", "w5", "w9", "w40", "<|im_end|>", "<|im_start|>",
                                 "assistant"]]
    with torch.no_grad():
        expected_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   pad_token_id=0, eos_token_id=vocab["<|im_end|>"])[0, 12:]
    expected = " ".join(words[i] for i in expected_ids.tolist() if i >= 3)
    code = cli_main(["generate", "--model", str(folder), "--prompt", "w5 w9 w40",
                     "--system", "w1", "--max-new-tokens", "8"])
    assert code == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--temperature", "nan"], "--temperature must be a number"),
])
def test_rba_generate_rejects_bad_flags(tmp_path, capsys, flags, fragment):
    code = cli_main(["generate", "--model", str(tmp_path), "--prompt", "hi", *flags])
    assert code == 2
    assert fragment in capsys.readouterr().err


def test_rba_generate_refuses_non_llm_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli_main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "model_type 'bert' is not supported" in capsys.readouterr().err
