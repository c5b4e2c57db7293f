"""SpeechLM on tiny random models: the splice, generation, LoRA (merge, save/load), the
teacher's vocabulary check; and one end-to-end `rba chat` run on the real default models.

The builders here (tiny tokenizer, LLM, encoder, dataset folder) are shared with
test_distill_training.py and test_data.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from rba_core.weights.safetensors_io import save_pretrained
from rba_core.errors import CheckpointError, ConfigError, TokenizerError
from rba_core.kernels.audio_adapter import AudioAdapterConfig, FusedAudioAdapter
from rba_core.models.lora import LoraConfig, apply_lora, lora_disabled, lora_modules, merge_lora
from rba_core.models.llama import LlamaForCausalLM
from rba_core.models.whisper import WhisperConfig, WhisperEncoder
from rba_core.data.prompts import AUDIO_PLACEHOLDER, student_messages, teacher_messages
from rba_core.models.speechlm import SpeechLM
from rba_core.data.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("what is the capital of france paris answer translate audio into french question "
         "briefly hello world red green blue one two three yes no it sky color say").split()
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
HIDDEN = 32


def write_tiny_llm(folder: Path, words=WORDS, *, seed: int = 0, padded_rows: int = 0) -> Path:
    """A random 2-layer Llama with a ChatML word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in ("<unk>", "user", "assistant", "system", ".", ",", "?", *words):
        vocab.setdefault(word, len(vocab))
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": len(vocab) + padded_rows, "hidden_size": HIDDEN,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    from rba_core.models.llama import LlamaConfig

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    with torch.no_grad():
        # Smaller embeddings than N(0, 1) keep the tied head's logits in a trainable range.
        model.model.embed_tokens.weight.mul_(0.3)
        # At the default init, random attention is nearly uniform, so a prefix can barely steer
        # a frozen random LLM; sharper attention makes it as steerable as a trained one.
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.mul_(3.0)
    torch.random.set_rng_state(generator_state)
    save_pretrained(folder, model.state_dict(), config, kind="full")
    return folder


def tiny_speechlm(folder: Path, *, lora: LoraConfig | None = None) -> SpeechLM:
    if not (folder / "config.json").is_file():
        write_tiny_llm(folder)
    encoder = WhisperEncoder(WhisperConfig(d_model=16, encoder_layers=1,
                                           encoder_attention_heads=2, encoder_ffn_dim=32,
                                           num_mel_bins=80, max_source_positions=1500)).eval()
    adapter = FusedAudioAdapter(AudioAdapterConfig(encoder_dim=16, llm_dim=HIDDEN,
                                                   hidden_dim=48, stack_factor=8))
    llm = LlamaForCausalLM.from_pretrained(folder)
    return SpeechLM(encoder, adapter, llm, Tokenizer.from_pretrained(folder), lora=lora)


def random_wave(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    tone = np.sin(2 * np.pi * rng.uniform(150, 900) * t) * rng.uniform(0.2, 0.6)
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


ROWS = [
    {"instruction": "what is the capital of france ?", "prompt": "",
     "response": "paris is the capital of france ."},
    {"instruction": "say hello world", "prompt": "", "response": "hello world ."},
    {"instruction": "what color is the sky ?", "prompt": "answer the question briefly .",
     "response": "blue ."},
]


def write_dataset(folder: Path, rows=ROWS, *, seed: int = 0, split: str = "train") -> Path:
    """A dataset folder in the synthesis contract's layout with FLAC clips of tones."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, row in enumerate(rows):
        seconds = 0.5 + 0.15 * index
        audio = f"audio/{index:05d}.flac"
        soundfile.write(folder / audio, random_wave(seconds, rng), 16000)
        lines.append(json.dumps({
            "id": f"s{seed}-{index}", "task": "instruct", "audio": audio, "duration": seconds,
            "sample_rate": 16000, "voice": {"engine": "espeak", "voice": "en"}, "teacher": "tiny",
            "tts": "espeak", "seed": seed, "split": split, "response_truncated": False, **row}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture()
def slm(tmp_path):
    return tiny_speechlm(tmp_path / "llm")


def _features(slm: SpeechLM, seconds=(0.9, 0.45)):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    return slm.features([random_wave(s, rng) for s in seconds])


def test_splice_puts_audio_exactly_at_the_placeholder(slm):
    features, lengths = _features(slm)
    prompts = [student_messages({"instruction": "x", "prompt": ""}),
               student_messages({"instruction": "x",
                                 "prompt": "translate the audio into french ."})]
    embeds, mask = slm.embed_speech_prompts(features, lengths, prompts)

    # Independent expectation: render, cut the string at the marker, embed each side by table
    # lookup, audio straight from encoder + adapter.
    hidden, enc_lengths = slm.encoder(features, lengths)
    audio, audio_lengths = slm.adapter(hidden, enc_lengths)
    assert audio_lengths.tolist() == [-(-int(n) // 8) for n in enc_lengths]
    table = slm.llm.model.embed_tokens.weight
    width = embeds.shape[1]
    for b, messages in enumerate(prompts):
        text = slm.tokenizer.apply_chat_template(messages)
        before, marker, after = text.partition(AUDIO_PLACEHOLDER)
        assert marker and AUDIO_PLACEHOLDER not in after
        left, right = slm.tokenizer.encode(before), slm.tokenizer.encode(after)
        n_audio = int(audio_lengths[b])
        real = len(left) + n_audio + len(right)
        pad = width - real
        assert mask[b].tolist() == [False] * pad + [True] * real
        assert torch.equal(embeds[b, :pad], torch.zeros_like(embeds[b, :pad]))
        assert torch.equal(embeds[b, pad: pad + len(left)], table[left])
        start = pad + len(left)
        torch.testing.assert_close(embeds[b, start: start + n_audio], audio[b, :n_audio],
                                   rtol=0, atol=0)
        assert torch.equal(embeds[b, start + n_audio:], table[right])
    # The rollout engine's unpadded rows are the same rows.
    pieces = [slm.split_prompt(m) for m in prompts]
    rows = slm.speech_prompt_rows(features, lengths, [p[0] for p in pieces],
                                  [p[1] for p in pieces])
    for b, row in enumerate(rows):
        assert torch.equal(row, embeds[b, mask[b]])


def test_prompt_needs_exactly_one_placeholder(slm):
    features, lengths = _features(slm, (0.5,))
    with pytest.raises(ConfigError, match="audio placeholder"):
        slm.embed_speech_prompts(features, lengths, [teacher_messages({"instruction": "hello"})])
    doubled = [{"role": "user", "content": AUDIO_PLACEHOLDER + " " + AUDIO_PLACEHOLDER}]
    with pytest.raises(ConfigError, match="2 audio placeholders"):
        slm.embed_speech_prompts(features, lengths, [doubled])
    with pytest.raises(ConfigError, match="prompt pieces"):
        slm.embed_speech_pieces(features, lengths, [[1], [1]], [[2], [2]])


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


def test_greedy_generation_equals_repeated_full_forwards(slm):
    features, lengths = _features(slm)
    prompts = [student_messages({"instruction": ""})] * 2
    generated = slm.generate(features, lengths, prompts, max_new_tokens=5)
    embeds, mask = slm.embed_speech_prompts(features, lengths, prompts)
    stops = set(slm.tokenizer.stop_ids)
    for b in range(2):
        row = embeds[b, mask[b]]
        expected = []
        with torch.no_grad():
            for _ in range(5):
                logits = slm.llm(inputs_embeds=row[None])[0, -1]
                token = int(logits.argmax())
                expected.append(token)
                if token in stops:
                    break
                row = torch.cat([row, slm.llm.embed(torch.tensor([token]))])
        assert generated[b] == expected


def test_only_the_adapter_trains_by_default(slm):
    trainable = {name for name, p in slm.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapter.") for name in trainable)
    assert trainable == {f"adapter.{n}" for n, _ in slm.adapter.named_parameters()}
    assert set(slm.trainable_state_dict()) == trainable
    features, lengths = _features(slm)
    embeds, _ = slm.embed_speech_prompts(features, lengths,
                                         [student_messages({"instruction": ""})] * 2)
    embeds.sum().backward()
    assert all(p.grad is None for p in slm.encoder.parameters())
    assert all(p.grad is None for p in slm.llm.parameters())
    assert slm.adapter.linear_1.weight.grad is not None


def _response_logits(slm: SpeechLM, features, lengths):
    before, after = slm.split_prompt(student_messages({"instruction": ""}))
    ids = torch.tensor([slm.tokenizer.encode("paris is blue ."),
                        slm.tokenizer.encode("hello . a b")])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        hidden = slm.response_hidden(features, lengths, [before] * 2, [after] * 2, ids, mask)
        return torch.nn.functional.linear(hidden, slm.llm.lm_head_weight), mask


def _randomize_lora(slm: SpeechLM) -> None:
    with torch.no_grad():
        for module in lora_modules(slm.llm).values():
            module.lora_B.normal_(0, 0.2)


def test_lora_merge_equals_unmerged_forward(slm):
    features, lengths = _features(slm)
    plain, mask = _response_logits(slm, features, lengths)
    targets = apply_lora(slm.llm, LoraConfig(rank=4, alpha=8,
                                             targets=("q_proj", "v_proj", "down_proj")))
    assert len(targets) == 6
    assert {n for n, p in slm.llm.named_parameters() if p.requires_grad} == \
        {f"{t}.lora_{x}" for t in targets for x in "AB"}
    # B starts at zero: LoRA changes nothing until trained.
    torch.testing.assert_close(_response_logits(slm, features, lengths)[0], plain)
    _randomize_lora(slm)
    unmerged, _ = _response_logits(slm, features, lengths)
    assert (unmerged - plain)[mask].abs().max() > 1e-2
    with lora_disabled(slm.llm):
        torch.testing.assert_close(_response_logits(slm, features, lengths)[0], plain)
    assert merge_lora(slm.llm) == 6
    assert not lora_modules(slm.llm)
    merged, _ = _response_logits(slm, features, lengths)
    torch.testing.assert_close(merged[mask], unmerged[mask], rtol=1e-4, atol=1e-4)


def test_lora_bad_targets_and_config(slm):
    with pytest.raises(ConfigError, match="match no linear projection"):
        apply_lora(slm.llm, LoraConfig(targets=("qkv",)))
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="alpha"):
        LoraConfig(alpha=-1.0)
    apply_lora(slm.llm, LoraConfig())
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(slm.llm, LoraConfig())


def test_save_and_load_trainable_with_lora(tmp_path):
    slm = tiny_speechlm(tmp_path / "llm", lora=LoraConfig(rank=2, targets=("q_proj", "up_proj")))
    _randomize_lora(slm)
    with torch.no_grad():
        slm.adapter.linear_2.weight.normal_()
    features, lengths = _features(slm)
    expected, mask = _response_logits(slm, features, lengths)
    slm.save_trainable(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == \
        {"adapter.safetensors", "lora.safetensors", "config.json"}

    fresh = tiny_speechlm(tmp_path / "llm")     # no LoRA, new random adapter
    assert not lora_modules(fresh.llm)
    fresh.encoder.load_state_dict(slm.encoder.state_dict())
    fresh.load_trainable(tmp_path / "saved")
    assert fresh.lora_config == slm.lora_config
    got, _ = _response_logits(fresh, features, lengths)
    torch.testing.assert_close(got[mask], expected[mask])
    state = slm.trainable_state_dict()
    assert set(state) == set(fresh.trainable_state_dict())
    for name, tensor in state.items():
        assert torch.equal(fresh.trainable_state_dict()[name], tensor)

    # from_pretrained reads the adapter and LoRA configs from the saved folder.
    encoder_dir = tmp_path / "whisper"
    config = slm.encoder.config
    save_pretrained(encoder_dir, {f"model.encoder.{k}": v
                                  for k, v in slm.encoder.state_dict().items()},
                    {"model_type": "whisper", "d_model": config.d_model,
                     "encoder_layers": config.encoder_layers,
                     "encoder_attention_heads": config.encoder_attention_heads,
                     "encoder_ffn_dim": config.encoder_ffn_dim,
                     "num_mel_bins": config.num_mel_bins,
                     "max_source_positions": config.max_source_positions})
    loaded = SpeechLM.from_pretrained(encoder_dir, tmp_path / "llm", tmp_path / "saved")
    assert loaded.lora_config == slm.lora_config
    assert loaded.adapter.config == slm.adapter.config
    got, _ = _response_logits(loaded, features, lengths)
    torch.testing.assert_close(got[mask], expected[mask])
    with pytest.raises(ConfigError, match="differs from adapter_config"):
        SpeechLM.from_pretrained(encoder_dir, tmp_path / "llm", tmp_path / "saved",
                                 adapter_config=AudioAdapterConfig(encoder_dim=16, llm_dim=HIDDEN))

    other = SpeechLM(fresh.encoder, FusedAudioAdapter(AudioAdapterConfig(
        encoder_dim=16, llm_dim=HIDDEN, hidden_dim=24, stack_factor=8)),
        LlamaForCausalLM.from_pretrained(tmp_path / "llm"), fresh.tokenizer)
    with pytest.raises(CheckpointError, match="adapter config"):
        other.load_trainable(tmp_path / "saved")
    with pytest.raises(CheckpointError, match="not a SpeechLM adapter"):
        other.load_trainable(tmp_path / "llm")


def test_teacher_must_share_the_vocabulary(slm, tmp_path):
    teacher, tokenizer = slm.load_teacher()
    assert teacher is slm.llm and tokenizer is slm.tokenizer

    same = write_tiny_llm(tmp_path / "same", seed=1)
    loaded, _ = slm.load_teacher(same)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not torch.equal(loaded.lm_head_weight, slm.llm.lm_head_weight)

    other = write_tiny_llm(tmp_path / "other", words=("red", "green", "blue", *WORDS))
    with pytest.raises(TokenizerError, match="same ids"):
        slm.load_teacher(other)
    padded = write_tiny_llm(tmp_path / "padded", padded_rows=8)
    with pytest.raises(TokenizerError, match="LM head has"):
        slm.load_teacher(padded)


def _run_command(module_name: str, argv: list[str], capsys) -> str:
    import importlib

    parser = argparse.ArgumentParser(prog="rba")
    importlib.import_module(module_name).register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    return capsys.readouterr().out


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


def test_rollout_engine_takes_the_spliced_rows(slm):
    from rba_core.rollout.engine import RolloutEngine
    from rba_core.rollout.sampling import SamplingConfig

    apply_lora(slm.llm, LoraConfig(rank=2))
    _randomize_lora(slm)
    features, lengths = _features(slm)
    prompts = [student_messages({"instruction": ""})] * 2
    expected = slm.generate(features, lengths, prompts, max_new_tokens=4)
    pieces = [slm.split_prompt(m) for m in prompts]
    with torch.no_grad():
        rows = slm.speech_prompt_rows(features, lengths, [p[0] for p in pieces],
                                      [p[1] for p in pieces])
    engine = RolloutEngine(slm.llm, max_prompt_len=64, max_new_tokens=4,
                           attention_backend="torch")
    out = engine.generate(rows, 1, SamplingConfig(temperature=0.0, max_new_tokens=4,
                                                  stop_ids=tuple(slm.tokenizer.stop_ids)),
                          seeds=[0, 1])
    for b in range(2):
        assert out.tokens[b, 0, : int(out.lengths[b, 0])].tolist() == expected[b]


def test_save_lora_and_load_lora(slm, tmp_path):
    from rba_core.models.lora import load_lora, save_lora

    config = LoraConfig(rank=3, alpha=6, targets=("o_proj", "gate_proj"))
    with pytest.raises(ConfigError, match="no LoRA"):
        save_lora(tmp_path / "lora", slm.llm, config)
    apply_lora(slm.llm, config)
    _randomize_lora(slm)
    features, lengths = _features(slm)
    expected, mask = _response_logits(slm, features, lengths)
    save_lora(tmp_path / "lora", slm.llm, config)
    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    assert load_lora(tmp_path / "lora", fresh) == config
    slm.llm = fresh
    got, _ = _response_logits(slm, features, lengths)
    torch.testing.assert_close(got[mask], expected[mask])
    with pytest.raises(CheckpointError, match="no \"lora\" section"):
        load_lora(tmp_path / "llm", fresh)


def test_chat_rejects_bad_input_before_loading_models(tmp_path, capsys):
    from rba_core.errors import AudioError

    with pytest.raises(AudioError, match="missing.wav"):
        _run_command("rba_core.commands.chat", ["chat", "--audio", str(tmp_path / "missing.wav")],
                     capsys)
    with pytest.raises(ConfigError, match="max-new-tokens"):
        _run_command("rba_core.commands.chat", ["chat", "--audio", "x.wav",
                                                "--max-new-tokens", "0"], capsys)


def test_chat_answers_dataset_clips_beside_the_teacher(tmp_path, capsys):
    from rba_core.generation import generate
    from rba_core.data.prompts import teacher_messages, teacher_prompt_ids
    from test_trainer import write_tiny_encoder

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
                         max_new_tokens=3, stop_ids=slm.tokenizer.stop_ids,
                         pad_id=slm.tokenizer.pad_id)[0]
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
