"""Low-rank adapters (LoRA) on chosen linear projections of a decoder, mergeable.

    config = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    names = apply_lora(llm, config)         # wraps llm.model.layers.*.self_attn.{q,v}_proj
    ...train the lora_A / lora_B parameters...
    save_lora(folder, llm, config)          # lora.safetensors + config.json, atomic
    merge_lora(llm)                         # folds B @ A * alpha / rank into the base weights

A wrapped projection computes ``base(x) + (dropout(x) @ A^T @ B^T) * alpha / rank``. ``B``
starts at zero, so applying LoRA leaves the model's outputs unchanged until it is trained.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rba_core.weights.safetensors_io import mismatch_report
from rba_core.errors import CheckpointError, ConfigError

LORA_WEIGHTS = "lora.safetensors"


@dataclass
class LoraConfig:
    """rank: r of A [r, in] and B [out, r]; alpha: the update is scaled by alpha / rank;
    dropout: on the LoRA branch's input while training; targets: last name components of the
    ``nn.Linear`` modules inside the decoder layers to wrap (Llama: q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = field(default_factory=lambda: ("q_proj", "v_proj"))

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"LoraConfig.targets must be a non-empty list of projection names "
                              f"such as ('q_proj', 'v_proj'), got {self.targets!r}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        known = {"rank", "alpha", "dropout", "targets"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"LoRA config has unknown field(s) {unknown}; known: "
                              f"{sorted(known)}")
        return cls(**data)


class LoraLinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update; the base stays as it was."""

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.rank = config.rank
        self.scaling = config.scaling
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features,
                                               device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank,
                                               device=weight.device, dtype=weight.dtype))
        # Same initialisation as nn.Linear (and the LoRA paper's A); B = 0 keeps the start exact.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            if self.disabled:
                # The merged base includes the update; take it back out for the plain model.
                out = out - nn.functional.linear(x, self.delta_weight().to(x.dtype))
            return out
        if self.disabled:
            return out
        return out + (self.dropout(x) @ self.lora_A.t().to(x.dtype)
                      @ self.lora_B.t().to(x.dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def _decoder_layers(model: nn.Module) -> nn.Module:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"LoRA: expected a Llama-family model with .model.layers, got "
                          f"{type(model).__name__}")
    return layers


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA-wrapped projection of ``model`` by its name in ``model``."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLinear)}


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the target projections of every decoder layer in place; returns their names.
    Only the LoRA parameters require grad afterwards if the model was frozen before."""
    if lora_modules(model):
        raise ConfigError("LoRA is already applied to this model; merge_lora() it first or "
                          "load the saved LoRA weights into the existing wrappers")
    layers = _decoder_layers(model)
    available: set[str] = set()
    wrapped: list[str] = []
    for layer_index, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear) or not name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            available.add(leaf)
            if leaf not in config.targets:
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, leaf, LoraLinear(module, config))
            wrapped.append(f"model.layers.{layer_index}.{name}")
    missing = sorted(set(config.targets) - available)
    if missing:
        raise ConfigError(f"LoRA targets {missing} match no linear projection of the decoder "
                          f"layers; available: {sorted(available)}")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors, named ``<module>.lora_A`` / ``<module>.lora_B``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach()
        tensors[f"{name}.lora_B"] = module.lora_B.detach()
    return tensors


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], *,
                         source: str) -> None:
    """Copy LoRA tensors into the wrappers, strictly (names and shapes must all match)."""
    expected = {f"{name}.lora_{part}": getattr(module, f"lora_{part}")
                for name, module in lora_modules(model).items() for part in ("A", "B")}
    problems = mismatch_report(expected, tensors, missing=sorted(set(expected) - set(tensors)),
                               unexpected=sorted(set(tensors) - set(expected)))
    if problems:
        raise CheckpointError(f"{source}: LoRA weights do not match the model ({problems}); "
                              "load them with the LoRA config they were trained with")
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(tensors[name])


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain ``nn.Linear`` back, so the
    model is an ordinary model again (same outputs, no LoRA overhead). Returns how many."""
    count = 0
    for name, module in lora_modules(model).items():
        module.merge()
        parent_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), leaf, module.base)
        count += 1
    return count


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as it was before LoRA (the frozen teacher is the same weights)."""
    modules = list(lora_modules(model).values())
    previous = [module.disabled for module in modules]
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for module, state in zip(modules, previous):
            module.disabled = state


def save_lora(folder: str | os.PathLike, model: nn.Module, config: LoraConfig,
              extra_config: dict[str, Any] | None = None) -> None:
    """Write ``lora.safetensors`` and ``config.json`` (``{"lora": ..., **extra_config}``)."""
    from rba_core.weights.safetensors_io import save_pretrained

    tensors = lora_state_dict(model)
    if not tensors:
        raise ConfigError("save_lora: the model has no LoRA wrappers; call apply_lora first")
    save_pretrained(folder, tensors, {**(extra_config or {}), "lora": config.to_dict()},
                    kind="lora")


def load_lora(folder: str | os.PathLike, model: nn.Module) -> LoraConfig:
    """Apply (if not yet applied) and fill the LoRA saved by ``save_lora`` in ``folder``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rba_core.weights.safetensors_io import read_config

    path = Path(folder) / LORA_WEIGHTS
    config_data = read_config(folder).get("lora")
    if not isinstance(config_data, dict):
        raise CheckpointError(f"{Path(folder) / 'config.json'}: has no \"lora\" section; it was "
                              "not written by save_lora")
    config = LoraConfig.from_dict(config_data)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a LoRA folder holds {LORA_WEIGHTS} beside "
                              "config.json")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    if not lora_modules(model):
        apply_lora(model, config)
    load_lora_state_dict(model, tensors, source=str(path))
    return config
