"""SpeechLM on tiny random models: the splice at the audio placeholder, greedy generation
against repeated full forwards, what trains, saving and loading the trainable weights (with
LoRA), the teacher's vocabulary check, and the rows the rollout engine takes."""
from __future__ import annotations

import pytest
import torch

from helpers import (HIDDEN, WORDS, randomize_lora, response_logits, speech_features,
                     tiny_speechlm, write_tiny_llm)
from rba_core.data.prompts import AUDIO_PLACEHOLDER, student_messages, teacher_messages
from rba_core.errors import CheckpointError, ConfigError, TokenizerError
from rba_core.kernels.audio_adapter import AudioAdapterConfig, FusedAudioAdapter
from rba_core.models.llama import LlamaForCausalLM
from rba_core.models.lora import LoraConfig, apply_lora, lora_modules
from rba_core.models.speechlm import SpeechLM
from rba_core.models.whisper import WhisperConfig, WhisperEncoder
from rba_core.rollout import SamplingConfig
from rba_core.weights.safetensors_io import save_pretrained


def test_splice_puts_audio_exactly_at_the_placeholder(slm):
    features, lengths = speech_features(slm)
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
    features, lengths = speech_features(slm, (0.5,))
    with pytest.raises(ConfigError, match="audio placeholder"):
        slm.embed_speech_prompts(features, lengths, [teacher_messages({"instruction": "hello"})])
    doubled = [{"role": "user", "content": AUDIO_PLACEHOLDER + " " + AUDIO_PLACEHOLDER}]
    with pytest.raises(ConfigError, match="2 audio placeholders"):
        slm.embed_speech_prompts(features, lengths, [doubled])
    with pytest.raises(ConfigError, match="prompt pieces"):
        slm.embed_speech_pieces(features, lengths, [[1], [1]], [[2], [2]])


def test_greedy_generation_equals_repeated_full_forwards(slm):
    features, lengths = speech_features(slm)
    prompts = [student_messages({"instruction": ""})] * 2
    generated = slm.generate(features, lengths, prompts,
                             SamplingConfig(temperature=0.0, max_new_tokens=5))
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
    features, lengths = speech_features(slm)
    embeds, _ = slm.embed_speech_prompts(features, lengths,
                                         [student_messages({"instruction": ""})] * 2)
    embeds.sum().backward()
    assert all(p.grad is None for p in slm.encoder.parameters())
    assert all(p.grad is None for p in slm.llm.parameters())
    assert slm.adapter.linear_1.weight.grad is not None


def test_save_and_load_trainable_with_lora(tmp_path):
    slm = tiny_speechlm(tmp_path / "llm", lora=LoraConfig(rank=2, targets=("q_proj", "up_proj")))
    randomize_lora(slm)
    with torch.no_grad():
        slm.adapter.linear_2.weight.normal_()
    features, lengths = speech_features(slm)
    expected, mask = response_logits(slm, features, lengths)
    slm.save_trainable(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == \
        {"adapter.safetensors", "lora.safetensors", "config.json"}

    fresh = tiny_speechlm(tmp_path / "llm")     # no LoRA, new random adapter
    assert not lora_modules(fresh.llm)
    fresh.encoder.load_state_dict(slm.encoder.state_dict())
    fresh.load_trainable(tmp_path / "saved")
    assert fresh.lora_config == slm.lora_config
    got, _ = response_logits(fresh, features, lengths)
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
    got, _ = response_logits(loaded, features, lengths)
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

    # An adapter folder given with the wrong encoder or LLM, or a folder that is no adapter,
    # names the folder and the fix in an adapter's terms.
    wide = tmp_path / "wide-whisper"
    save_pretrained(wide, {f"model.encoder.{k}": v for k, v in WhisperEncoder(WhisperConfig(
        d_model=24, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        num_mel_bins=80, max_source_positions=1500)).state_dict().items()},
        {"model_type": "whisper", "d_model": 24, "encoder_layers": 1,
         "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80,
         "max_source_positions": 1500})
    with pytest.raises(ConfigError, match=r"saved: this adapter was trained on an encoder of "
                                          r"width \(d_model\) 16, but the encoder .*wide-whisper "
                                          r"has d_model 24; pass the encoder.*--encoder"):
        SpeechLM.from_pretrained(wide, tmp_path / "llm", tmp_path / "saved")
    (tmp_path / "empty").mkdir()
    for folder, words in ((tmp_path / "empty", "empty: not an adapter folder, it has no "
                                               "config.json"),
                          (tmp_path / "nowhere", "adapter folder .*nowhere does not exist")):
        with pytest.raises(CheckpointError, match=words) as raised:
            SpeechLM.from_pretrained(encoder_dir, tmp_path / "llm", folder)
        assert "adapter.safetensors" in str(raised.value)
        assert "model.safetensors" not in str(raised.value)
        assert "Hugging Face" not in str(raised.value)


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


def test_rollout_engine_takes_the_spliced_rows(slm):
    from rba_core.rollout.engine import RolloutEngine
    from rba_core.rollout.sampling import SamplingConfig

    apply_lora(slm.llm, LoraConfig(rank=2))
    randomize_lora(slm)
    features, lengths = speech_features(slm)
    prompts = [student_messages({"instruction": ""})] * 2
    expected = slm.generate(features, lengths, prompts,
                            SamplingConfig(temperature=0.0, max_new_tokens=4))
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
