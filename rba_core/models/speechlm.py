"""The SpeechLM: Whisper encoder -> fused audio adapter -> Llama-family LLM.

    slm = SpeechLM.from_pretrained(encoder_dir, llm_dir, adapter="path/to/adapter")
    features, frame_lengths = slm.features([load_audio("question.wav")])
    ids = slm.generate(features, frame_lengths, [student_messages({"instruction": ""})])
    print(slm.tokenizer.decode(ids[0]))

The chat prompt is rendered with the LLM's own template around ``AUDIO_PLACEHOLDER``; the text
before and after the marker is tokenized on its own and the adapter's embeddings go between,
so the LLM reads ``<chat prefix> <audio embeddings> <chat suffix>`` and answers after it.

Speech input is *unpadded*: each clip's log-mel frames are encoded as they are (the encoder
masks batch padding), not padded with silence to Whisper's 30 s. That is ~10x cheaper for
short instructions; the encoder's frames then differ from Whisper's own (see the audio notes),
which does not matter because the adapter is trained on, and used on, these unpadded frames.

By default only the adapter is trained: the encoder and the LLM are frozen, and the encoder
runs without autograd. LoRA (``rba_core.models.lora``) on chosen LLM projections is optional; the
frozen text teacher is then the same LLM with LoRA switched off.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rba_core.errors import CheckpointError, ConfigError, TokenizerError
from rba_core.kernels.audio_adapter import AudioAdapterConfig, FusedAudioAdapter
from rba_core.models.lora import (
    LORA_WEIGHTS, LoraConfig, apply_lora, load_lora_state_dict, lora_disabled, lora_modules,
    lora_state_dict,
)
from rba_core.models.llama import LlamaForCausalLM
from rba_core.models.whisper import WhisperEncoder
from rba_core.data.prompts import AUDIO_PLACEHOLDER, split_student_prompt
from rba_core.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rba_core.rollout import RolloutEngine, SamplingConfig

ADAPTER_WEIGHTS = "adapter.safetensors"
# Where the packaged warm-started adapter (for the default Whisper tiny.en + SmolLM2-135M) lives.
DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "assets" / "speechlm-default"
ADAPTER_FORMAT = "rba-speechlm"
SPEECH_INPUT = "unpadded"
DEFAULT_STACK_FACTOR = 8

Messages = list[dict[str, Any]]


def default_adapter_config(encoder: WhisperEncoder, llm: LlamaForCausalLM) -> AudioAdapterConfig:
    """Ultravox-style projector: stack 8 encoder frames (6.25 embeddings per second of audio),
    SwiGLU, hidden width = the LLM's width."""
    return AudioAdapterConfig(encoder_dim=encoder.config.d_model,
                              llm_dim=llm.config.hidden_size,
                              stack_factor=DEFAULT_STACK_FACTOR, activation="swiglu")


def _pad_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return int(candidate)
    return 0


def load_teacher(folder: str | os.PathLike, student_tokenizer: Tokenizer, *,
                 vocab_rows: int | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, Tokenizer]:
    """Another LLM as the text teacher. Its tokenizer must map every token to the same id as
    the student's (the teacher scores the student's token ids), and its LM head must have
    ``vocab_rows`` rows when given; otherwise ``TokenizerError``."""
    tokenizer = Tokenizer.from_pretrained(folder)
    if not student_tokenizer.same_vocabulary(tokenizer):
        raise TokenizerError(
            f"teacher {folder}: its tokenizer ({tokenizer.vocab_size} tokens) does not map tokens "
            f"to the same ids as the student's ({student_tokenizer.folder}, "
            f"{student_tokenizer.vocab_size} tokens); distillation compares distributions over "
            "the same ids, so pick a teacher of the same model family (same tokenizer.json), or "
            "leave the teacher unset to use the student's own LLM on the transcript")
    teacher = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    rows = teacher.lm_head_weight.shape[0]
    if vocab_rows is not None and rows != vocab_rows:
        raise TokenizerError(
            f"teacher {folder}: its LM head has {rows} rows but the student's has {vocab_rows}; "
            "the tokenizers agree but the embedding tables are padded differently, so the "
            "distributions cannot be compared; pick a teacher with the same vocab_size")
    teacher.requires_grad_(False)
    return teacher, tokenizer


class SpeechLM(nn.Module):
    """Speech in, text out: ``encoder`` (WhisperEncoder), ``adapter`` (FusedAudioAdapter),
    ``llm`` (LlamaForCausalLM, optionally with LoRA), ``tokenizer`` (the LLM's)."""

    def __init__(self, encoder: WhisperEncoder, adapter: FusedAudioAdapter,
                 llm: LlamaForCausalLM, tokenizer: Tokenizer, *, lora: LoraConfig | None = None,
                 train_encoder: bool = False, train_llm: bool = False) -> None:
        super().__init__()
        if adapter.config.encoder_dim != encoder.config.d_model:
            raise ConfigError(f"adapter encoder_dim {adapter.config.encoder_dim} != the "
                              f"encoder's d_model {encoder.config.d_model}")
        if adapter.config.llm_dim != llm.config.hidden_size:
            raise ConfigError(f"adapter llm_dim {adapter.config.llm_dim} != the LLM's "
                              f"hidden_size {llm.config.hidden_size}")
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer
        self.train_encoder = bool(train_encoder)
        self.train_llm = bool(train_llm)
        encoder.requires_grad_(self.train_encoder)
        # Whisper's positional table is fixed sinusoids in the original too.
        encoder.embed_positions.weight.requires_grad_(False)
        llm.requires_grad_(self.train_llm)
        self.lora_config: LoraConfig | None = None
        if lora is not None:
            apply_lora(llm, lora)
            self.lora_config = lora
        self.pad_id = _pad_id(tokenizer)
        self._engine: "RolloutEngine | None" = None

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        encoder_dir: str | os.PathLike,
        llm_dir: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        lora: LoraConfig | None = None,
        adapter_config: AudioAdapterConfig | None = None,
        train_encoder: bool = False,
        train_llm: bool = False,
    ) -> "SpeechLM":
        """Load the encoder and LLM folders (``dtype`` None: float32), build the adapter (fresh
        from ``adapter_config`` or the default, or read from the ``adapter`` folder written by
        ``save_trainable``, whose LoRA is applied too)."""
        dtype = torch.float32 if dtype is None else dtype
        # A folder that is no adapter fails before the models load.
        saved = read_adapter_config(adapter) if adapter is not None else None
        encoder = WhisperEncoder.from_pretrained(encoder_dir, dtype=dtype, device=device)
        llm = LlamaForCausalLM.from_pretrained(llm_dir, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_pretrained(llm_dir)
        if saved is not None:
            try:
                stored = AudioAdapterConfig(**saved["adapter"])
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{Path(adapter) / 'config.json'}: bad adapter section "
                                      f"({error}); pass a folder written by "
                                      "SpeechLM.save_trainable") from error
            if adapter_config is not None and asdict(adapter_config) != asdict(stored):
                raise ConfigError(f"{adapter}: the saved adapter has config {asdict(stored)}, "
                                  f"which differs from adapter_config {asdict(adapter_config)}; "
                                  "drop adapter_config to use the saved one")
            _check_adapter_fits(adapter, stored, encoder_dir, encoder, llm_dir, llm)
            adapter_config = stored
            if lora is None and saved.get("lora") is not None:
                lora = LoraConfig.from_dict(saved["lora"])
        config = adapter_config or default_adapter_config(encoder, llm)
        module = FusedAudioAdapter(config, device=device, dtype=dtype)
        model = cls(encoder, module, llm, tokenizer, lora=lora, train_encoder=train_encoder,
                    train_llm=train_llm)
        if adapter is not None:
            model.load_trainable(adapter)
        return model

    def load_teacher(self, folder: str | os.PathLike | None = None, *,
                     dtype: torch.dtype | None = None) -> tuple[LlamaForCausalLM, Tokenizer]:
        """The text teacher: this SpeechLM's own LLM (``folder`` None; run with LoRA off by the
        losses) or the LLM in ``folder``, checked to share the student's vocabulary."""
        if folder is None:
            return self.llm, self.tokenizer
        return load_teacher(folder, self.tokenizer, vocab_rows=self.llm.lm_head_weight.shape[0],
                            dtype=dtype or self.llm.lm_head_weight.dtype, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head_weight.device

    @property
    def n_mels(self) -> int:
        return self.encoder.config.num_mel_bins

    # ---------------------------------------------------------------------------- prompts
    def split_prompt(self, messages: Messages) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat prompt before and after the audio placeholder."""
        return split_student_prompt(self.tokenizer, messages)

    # ----------------------------------------------------------------------------- speech
    def features(self, waves: Sequence[np.ndarray | torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpadded log-mel features ``[B, n_mels, T]`` and frame lengths of 16 kHz waves."""
        from rba_core.data.audio import batch_features

        features, lengths = batch_features(list(waves), n_mels=self.n_mels)
        return features.to(self.device), lengths.to(self.device)

    def encode(self, features: torch.Tensor, frame_lengths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames ``[B, T', E]`` and their lengths (without autograd unless the
        encoder trains)."""
        frame_lengths = torch.as_tensor(frame_lengths, device=features.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            return self.encoder(features, frame_lengths)

    def adapt(self, frames: torch.Tensor, frame_lengths: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter outputs ``[B, N, D]`` in the LLM's dtype and their lengths ``[B]``, from
        encoder frames."""
        embeds, out_lengths = self.adapter(frames.to(self.adapter.ln_pre.weight.dtype),
                                           frame_lengths)
        return embeds.to(self.llm.lm_head_weight.dtype), out_lengths

    def speech_embeddings(self, features: torch.Tensor, frame_lengths: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter outputs ``[B, N, D]`` in the LLM's dtype and their lengths ``[B]``."""
        return self.adapt(*self.encode(features, frame_lengths))

    def _splice_rows(self, audio: torch.Tensor, audio_lengths: torch.Tensor,
                     before_ids: Sequence[Sequence[int]], after_ids: Sequence[Sequence[int]]
                     ) -> list[torch.Tensor]:
        batch = audio.shape[0]
        if len(before_ids) != batch or len(after_ids) != batch:
            raise ConfigError(f"{batch} audio clips but {len(before_ids)} / {len(after_ids)} "
                              "prompt pieces; pass one prompt per clip")
        device = self.device
        lengths = audio_lengths.tolist()
        flat = [int(t) for row in (*before_ids, *after_ids) for t in row]
        token_embeds = self.llm.embed(torch.tensor(flat, dtype=torch.long, device=device))
        rows: list[torch.Tensor] = []
        offset = 0
        pieces_before = [token_embeds[offset: (offset := offset + len(b))] for b in before_ids]
        pieces_after = [token_embeds[offset: (offset := offset + len(a))] for a in after_ids]
        for b in range(batch):
            rows.append(torch.cat([pieces_before[b], audio[b, : lengths[b]], pieces_after[b]]))
        return rows

    def speech_prompt_rows(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                           before_ids: Sequence[Sequence[int]],
                           after_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One unpadded prompt embedding ``[P_b, D]`` per clip (what the rollout engine takes:
        ``RolloutEngine.generate(rows, ...)``)."""
        return self.frame_prompt_rows(*self.encode(features, frame_lengths), before_ids,
                                      after_ids)

    def frame_prompt_rows(self, frames: torch.Tensor, frame_lengths: torch.Tensor,
                          before_ids: Sequence[Sequence[int]],
                          after_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``speech_prompt_rows`` from encoder frames already computed (a frozen encoder's
        frames can serve several passes over the same clips)."""
        audio, audio_lengths = self.adapt(frames, frame_lengths)
        return self._splice_rows(audio, audio_lengths, before_ids, after_ids)

    @staticmethod
    def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(row.shape[0] for row in rows)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
        embeds = torch.stack([nn.functional.pad(row, (0, 0, width - row.shape[0], 0))
                              for row in rows])
        for b, row in enumerate(rows):
            mask[b, width - row.shape[0]:] = True
        return embeds, mask

    def embed_speech_pieces(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                            before_ids: Sequence[Sequence[int]],
                            after_ids: Sequence[Sequence[int]]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings ``[B, P, D]`` and attention mask ``[B, P]`` (bool)
        from pre-tokenized prompt pieces."""
        return self._left_pad(self.speech_prompt_rows(features, frame_lengths, before_ids,
                                                      after_ids))

    def embed_speech_prompts(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                             prompts: Sequence[Messages]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings ``[B, P, D]`` and attention mask ``[B, P]`` (bool):
        each chat ``prompts[b]`` rendered with the audio of clip b at its placeholder."""
        pieces = [self.split_prompt(messages) for messages in prompts]
        return self.embed_speech_pieces(features, frame_lengths, [p[0] for p in pieces],
                                        [p[1] for p in pieces])

    # ------------------------------------------------------------------------ training
    def response_hidden(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                        before_ids: Sequence[Sequence[int]], after_ids: Sequence[Sequence[int]],
                        response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, R, D]`` at the positions predicting ``response_ids [B, R]``
        (right-padded, ``response_mask`` True at real tokens) given the speech prompt."""
        prompt, prompt_mask = self.embed_speech_pieces(features, frame_lengths, before_ids,
                                                       after_ids)
        response_ids = response_ids.to(self.device)
        width = prompt.shape[1]
        embeds = torch.cat([prompt, self.llm.embed(response_ids)], dim=1)
        mask = torch.cat([prompt_mask, response_mask.to(self.device).bool()], dim=1)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
        return hidden[:, width - 1: width - 1 + response_ids.shape[1]]

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                before_ids: Sequence[Sequence[int]], after_ids: Sequence[Sequence[int]],
                response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """``response_hidden``: the training forward, so a DDP wrapper around the SpeechLM
        sees it (the losses call the module, or its wrapper, this way)."""
        return self.response_hidden(features, frame_lengths, before_ids, after_ids,
                                    response_ids, response_mask)

    def teacher_hidden(self, teacher: LlamaForCausalLM, prompt_ids: Sequence[Sequence[int]],
                       response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's hidden states over the response given the transcript prompt, without
        autograd; this SpeechLM's own LLM runs with LoRA switched off."""
        from rba_core.rollout import shared_prefix_hidden

        prompts = [torch.as_tensor(list(p), dtype=torch.long) for p in prompt_ids]
        lengths = response_mask.bool().sum(-1)[:, None]
        with torch.no_grad(), lora_disabled(teacher):
            hidden = shared_prefix_hidden(teacher, prompts, response_ids[:, None], lengths)
        return hidden[:, 0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by its name in this module (adapter, LoRA, and the encoder or
        LLM when those are trained), detached."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``trainable_state_dict``: every trainable tensor must be given."""
        own = dict(self.named_parameters())
        expected = {name for name, p in own.items() if p.requires_grad}
        missing = sorted(expected - set(tensors))
        unknown = sorted(set(tensors) - set(own))
        if missing or unknown:
            raise CheckpointError(f"trainable state does not match this SpeechLM (missing: "
                                  f"{missing}; unknown: {unknown})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if own[name].shape != tensor.shape:
                    raise CheckpointError(f"trainable state: {name} has shape "
                                          f"{list(tensor.shape)}, the model "
                                          f"{list(own[name].shape)}")
                own[name].copy_(tensor)

    # ---------------------------------------------------------------------- save / load
    def save_config(self) -> dict[str, Any]:
        return {
            "format": ADAPTER_FORMAT,
            "version": 1,
            "adapter": asdict(self.adapter.config),
            "lora": self.lora_config.to_dict() if self.lora_config is not None else None,
            "speech_input": SPEECH_INPUT,
            "encoder": {"d_model": self.encoder.config.d_model,
                        "num_mel_bins": self.encoder.config.num_mel_bins},
            "llm": {"hidden_size": self.llm.config.hidden_size,
                    "vocab_size": self.llm.config.vocab_size},
            "train_encoder": self.train_encoder,
            "train_llm": self.train_llm,
        }

    def save_trainable(self, folder: str | os.PathLike) -> None:
        """Write ``adapter.safetensors`` (the adapter plus any trained encoder/LLM tensors),
        ``lora.safetensors`` when LoRA is on, and ``config.json``; each file atomically."""
        from rba_core.weights.safetensors_io import save_pretrained

        lora_names = set(lora_state_dict(self.llm))
        tensors = {f"adapter.{name}": t.detach() for name, t in self.adapter.state_dict().items()}
        for name, tensor in self.trainable_state_dict().items():
            if not name.startswith("llm.") or name[len("llm."):] not in lora_names:
                tensors[name] = tensor
        config = self.save_config()
        save_pretrained(folder, tensors, config, kind="adapter")
        if lora_names:
            save_pretrained(folder, lora_state_dict(self.llm), config, kind="lora")

    def load_trainable(self, path: str | os.PathLike) -> None:
        """Load a folder written by ``save_trainable`` into this SpeechLM (applying its LoRA
        if this model has none yet). Shapes and the adapter config must match."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        saved = read_adapter_config(folder)
        if saved["adapter"] != asdict(self.adapter.config):
            raise CheckpointError(f"{folder}: saved adapter config {saved['adapter']} differs "
                                  f"from this model's {asdict(self.adapter.config)}")
        weights = folder / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(weights), device=str(self.device))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{weights}: not readable ({error}); save_trainable writes it"
                                  ) from error
        own = dict(self.named_parameters())
        adapter_names = {f"adapter.{name}" for name in self.adapter.state_dict()}
        missing = sorted(adapter_names - set(tensors))
        unknown = sorted(set(tensors) - set(own))
        misshaped = sorted(name for name in set(tensors) & set(own)
                           if tensors[name].shape != own[name].shape)
        if missing or unknown or misshaped:
            raise CheckpointError(f"{weights}: does not match this SpeechLM (missing: {missing}; "
                                  f"unknown: {unknown}; wrong shapes: {misshaped})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)
        if saved.get("lora") is not None:
            config = LoraConfig.from_dict(saved["lora"])
            if not lora_modules(self.llm):
                apply_lora(self.llm, config)
                self.lora_config = config
            lora_path = folder / LORA_WEIGHTS
            try:
                lora_tensors = load_file(str(lora_path), device=str(self.device))
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{lora_path}: not readable ({error}); the config lists a "
                                      "LoRA, so save_trainable wrote this file") from error
            load_lora_state_dict(self.llm, lora_tensors, source=str(lora_path))

    # ------------------------------------------------------------------------ inference
    def generate(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                 prompts: Sequence[Messages], sampling: "SamplingConfig | None" = None, *,
                 seed: int = 0) -> list[list[int]]:
        """New token ids per clip, each ending at its first stop id (included) or after
        ``sampling.max_new_tokens``. ``sampling`` defaults to greedy, 64 tokens; without
        ``stop_ids`` of its own it stops at the tokenizer's."""
        pieces = [self.split_prompt(messages) for messages in prompts]
        return self.generate_pieces(features, frame_lengths, [p[0] for p in pieces],
                                    [p[1] for p in pieces], sampling, seed=seed)

    @torch.no_grad()
    def generate_pieces(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                        before_ids: Sequence[Sequence[int]], after_ids: Sequence[Sequence[int]],
                        sampling: "SamplingConfig | None" = None, *, seed: int = 0
                        ) -> list[list[int]]:
        """``generate`` from pre-tokenized prompt pieces (a ``SpeechBatch``'s), through the
        rollout engine at group size 1 (clip b draws from seed ``seed + b``)."""
        from rba_core.rollout import RolloutEngine, SamplingConfig, generate

        sampling = sampling or SamplingConfig(temperature=0.0)
        if not sampling.stop_ids:
            sampling = replace(sampling, stop_ids=tuple(self.tokenizer.stop_ids))
        rows = self.speech_prompt_rows(features, frame_lengths, before_ids, after_ids)
        # One engine per SpeechLM keeps its cache and packed decode weights between calls.
        if self._engine is None or sampling.max_new_tokens > self._engine.max_new_tokens:
            self._engine = RolloutEngine(self.llm, max_prompt_len=1 << 16,
                                         max_new_tokens=max(sampling.max_new_tokens, 256))
        return generate(self.llm, rows, sampling, seed=seed, engine=self._engine,
                        tokenizer=self.tokenizer)

    def answer(self, waves: Sequence[np.ndarray | torch.Tensor],
               prompts: Sequence[Messages] | None = None,
               sampling: "SamplingConfig | None" = None, *, seed: int = 0) -> list[str]:
        """Decoded answers to spoken instructions (16 kHz waves); ``prompts`` defaults to the
        plain spoken-instruction chat for every clip."""
        if prompts is None:
            prompts = [[{"role": "user", "content": AUDIO_PLACEHOLDER}] for _ in waves]
        features, lengths = self.features(waves)
        ids = self.generate(features, lengths, prompts, sampling, seed=seed)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def _check_adapter_fits(adapter: str | os.PathLike, config: AudioAdapterConfig,
                        encoder_dir: str | os.PathLike, encoder: WhisperEncoder,
                        llm_dir: str | os.PathLike, llm: LlamaForCausalLM) -> None:
    """An adapter trained between another encoder or LLM cannot run here: say which folder
    does not match and how to pass the right one."""
    if config.encoder_dim != encoder.config.d_model:
        raise ConfigError(f"{adapter}: this adapter was trained on an encoder of width (d_model) "
                          f"{config.encoder_dim}, but the encoder {encoder_dir} has d_model "
                          f"{encoder.config.d_model}; pass the encoder it was trained with "
                          "(--encoder DIR, or model.encoder in a training config)")
    if config.llm_dim != llm.config.hidden_size:
        raise ConfigError(f"{adapter}: this adapter feeds an LLM of hidden_size {config.llm_dim}, "
                          f"but the LLM {llm_dir} has hidden_size {llm.config.hidden_size}; pass "
                          "the LLM it was trained with (--llm DIR, or model.llm in a training "
                          "config)")


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a saved SpeechLM adapter folder, checked for its format."""
    from rba_core.weights.safetensors_io import CONFIG_NAME, read_config

    root = Path(folder)
    written_by = (f"an adapter folder holds {CONFIG_NAME} and {ADAPTER_WEIGHTS}, as `rba train` "
                  "(SpeechLM.save_trainable) writes them")
    if not root.is_dir():
        raise CheckpointError(f"adapter folder {root} does not exist; {written_by}")
    if not (root / CONFIG_NAME).is_file():
        raise CheckpointError(f"{root}: not an adapter folder, it has no {CONFIG_NAME}; "
                              f"{written_by}")
    config = read_config(folder)
    if config.get("format") != ADAPTER_FORMAT or not isinstance(config.get("adapter"), dict):
        raise CheckpointError(f"{Path(folder) / 'config.json'}: not a SpeechLM adapter config "
                              f"(format {config.get('format')!r}); pass a folder written by "
                              "SpeechLM.save_trainable")
    return config
