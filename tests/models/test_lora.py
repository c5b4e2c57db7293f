"""LoRA (rba_core/models/lora.py): one wrapped projection against the float64 formula
``base(x) + x A^T B^T alpha / rank`` (merge, unmerge, disable, dropout, gradients); on the tiny
SpeechLM's LLM: zero at the start, merged equals unmerged, disabled equals the base model, the
save/load round trip, and bad configs and checkpoints."""
from __future__ import annotations

import pytest
import torch

from helpers import randomize_lora, response_logits, speech_features
from rba_core.errors import CheckpointError, ConfigError
from rba_core.models.llama import LlamaForCausalLM
from rba_core.models.lora import (
    LoraConfig, LoraLinear, apply_lora, lora_disabled, lora_modules, merge_lora,
)


def test_lora_merge_equals_unmerged_forward(slm):
    features, lengths = speech_features(slm)
    plain, mask = response_logits(slm, features, lengths)
    targets = apply_lora(slm.llm, LoraConfig(rank=4, alpha=8,
                                             targets=("q_proj", "v_proj", "down_proj")))
    assert len(targets) == 6
    assert {n for n, p in slm.llm.named_parameters() if p.requires_grad} == \
        {f"{t}.lora_{x}" for t in targets for x in "AB"}
    # B starts at zero: LoRA changes nothing until trained.
    torch.testing.assert_close(response_logits(slm, features, lengths)[0], plain)
    randomize_lora(slm)
    unmerged, _ = response_logits(slm, features, lengths)
    assert (unmerged - plain)[mask].abs().max() > 1e-2
    with lora_disabled(slm.llm):
        torch.testing.assert_close(response_logits(slm, features, lengths)[0], plain)
    assert merge_lora(slm.llm) == 6
    assert not lora_modules(slm.llm)
    merged, _ = response_logits(slm, features, lengths)
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


def test_save_lora_and_load_lora(slm, tmp_path):
    from rba_core.models.lora import load_lora, save_lora

    config = LoraConfig(rank=3, alpha=6, targets=("o_proj", "gate_proj"))
    with pytest.raises(ConfigError, match="no LoRA"):
        save_lora(tmp_path / "lora", slm.llm, config)
    apply_lora(slm.llm, config)
    randomize_lora(slm)
    features, lengths = speech_features(slm)
    expected, mask = response_logits(slm, features, lengths)
    save_lora(tmp_path / "lora", slm.llm, config)
    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    assert load_lora(tmp_path / "lora", fresh) == config
    slm.llm = fresh
    got, _ = response_logits(slm, features, lengths)
    torch.testing.assert_close(got[mask], expected[mask])
    with pytest.raises(CheckpointError, match="no \"lora\" section"):
        load_lora(tmp_path / "llm", fresh)


def _wrapped(config: LoraConfig, bias: bool = True) -> LoraLinear:
    layer = LoraLinear(torch.nn.Linear(12, 10, bias=bias), config)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _formula(layer: LoraLinear, x: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """The wrapped projection in float64, from its parts."""
    x = x.double()
    w, a, b = (t.detach().double() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    out = x @ w.T + x @ a.T @ b.T * (alpha / rank)
    if layer.base.bias is not None:
        out = out + layer.base.bias.detach().double()
    return out


@pytest.mark.parametrize("rank, alpha, bias", [(1, 1.0, True), (4, 16.0, False), (3, 2.5, True)])
def test_wrapped_projection_is_the_formula_and_merges_exactly(rank, alpha, bias):
    layer = _wrapped(LoraConfig(rank=rank, alpha=alpha), bias=bias)
    assert layer.lora_A.shape == (rank, 12) and layer.lora_B.shape == (10, rank)
    assert layer.scaling == pytest.approx(alpha / rank)
    x = torch.randn(2, 5, 12)
    expected = _formula(layer, x, alpha, rank)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    base_weight = layer.base.weight.detach().clone()

    layer.merge()
    layer.merge()           # a second merge must not add the update twice
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base.weight.detach(), base_weight + layer.delta_weight())
    layer.disabled = True   # merged and disabled: the plain base again
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, base_weight,
                                                                    layer.base.bias),
                               rtol=1e-5, atol=1e-5)
    layer.disabled = False
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight.detach(), base_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_only_the_low_rank_factors_get_gradients_and_b_starts_at_zero():
    layer = LoraLinear(torch.nn.Linear(12, 10), LoraConfig(rank=2))
    layer.base.requires_grad_(False)
    assert torch.equal(layer.lora_B, torch.zeros(10, 2)) and layer.lora_A.abs().sum() > 0
    x = torch.randn(6, 12)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    layer(x).pow(2).sum().backward()
    assert layer.base.weight.grad is None
    # With B = 0 the first gradient reaches B only: dL/dA = B^T (...) = 0.
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))
    assert layer.lora_B.grad.abs().sum() > 0


def test_dropout_acts_on_the_lora_branch_in_training_only():
    layer = _wrapped(LoraConfig(rank=2, dropout=0.5))
    x = torch.randn(64, 12)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _formula(layer, x, 16.0, 2),
                               rtol=1e-5, atol=1e-5)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)   # base: no dropout


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=True), "rank"), (dict(rank=2.0), "rank"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(targets=()), "targets"), (dict(targets=("q_proj", "")), "targets"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"LoraConfig.{field} must be"):
        LoraConfig(**kwargs)


def test_config_round_trips_and_refuses_unknown_fields():
    config = LoraConfig(rank=3, alpha=6, dropout=0.1, targets="o_proj")
    assert config.targets == ("o_proj",)
    assert LoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['scale'\]"):
        LoraConfig.from_dict({**config.to_dict(), "scale": 2})


def test_loading_lora_of_another_shape_names_the_tensors(slm, tmp_path):
    from rba_core.models.lora import load_lora, save_lora

    apply_lora(slm.llm, LoraConfig(rank=2, targets=("q_proj",)))
    save_lora(tmp_path / "lora", slm.llm, LoraConfig(rank=2, targets=("q_proj",)))
    other = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    apply_lora(other, LoraConfig(rank=4, targets=("q_proj",)))
    with pytest.raises(CheckpointError, match="LoRA weights do not match the model"):
        load_lora(tmp_path / "lora", other)
    (tmp_path / "lora" / "lora.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lora.safetensors: missing"):
        load_lora(tmp_path / "lora", LlamaForCausalLM.from_pretrained(tmp_path / "llm"))


def test_apply_lora_needs_decoder_layers():
    with pytest.raises(ConfigError, match="expected a Llama-family model with .model.layers"):
        apply_lora(torch.nn.Linear(4, 4), LoraConfig())
