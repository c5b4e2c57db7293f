"""Every adapter shipped under rba_core/assets/ is a whole, loadable adapter folder: a copy that
lost a tensor, a truncated file or a config that no longer matches its weights would otherwise
surface only when a user's `rba chat` or training run starts from it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rba_core.kernels import AudioAdapterConfig, FusedAudioAdapter
from rba_core.models.speechlm import DEFAULT_ADAPTER_DIR, read_adapter_config

ASSETS = Path(DEFAULT_ADAPTER_DIR).parent
PACKAGED = sorted(p for p in ASSETS.glob("speechlm-*") if p.is_dir())


def test_the_default_adapter_is_among_the_packaged_ones():
    assert DEFAULT_ADAPTER_DIR in PACKAGED


@pytest.mark.parametrize("folder", PACKAGED, ids=[p.name for p in PACKAGED])
def test_a_packaged_adapter_loads_strictly_and_documents_its_training(folder):
    config = read_adapter_config(folder)
    adapter = FusedAudioAdapter(AudioAdapterConfig(**config["adapter"]))
    tensors = load_file(str(folder / "adapter.safetensors"))
    prefix = "adapter."
    assert all(name.startswith(prefix) for name in tensors), sorted(tensors)
    adapter.load_state_dict({name[len(prefix):]: t for name, t in tensors.items()}, strict=True)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # The frozen models it sits between: the widths the config names must be the adapter's.
    assert config["encoder"]["d_model"] == config["adapter"]["encoder_dim"]
    assert config["llm"]["hidden_size"] == config["adapter"]["llm_dim"]
    # Trained, not freshly drawn: a fresh adapter's RMSNorm gains are all norm_init.
    gains = tensors["adapter.ln_post.weight"]
    assert not torch.allclose(gains, torch.full_like(gains, config["adapter"]["norm_init"]))
    assert (folder / "TRAINING.md").is_file(), f"{folder} says nowhere how it was trained"
