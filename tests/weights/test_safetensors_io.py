"""Checkpoint I/O: safetensors loading (single and sharded), strict module loading, atomic
saves, and a clear error naming the file and tensor for each bad input."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rba_core.weights import safetensors_io as checkpoint
from rba_core.weights.safetensors_io import (
    load_into_module,
    load_tensors,
    read_config,
    save_pretrained,
    save_safetensors_atomic,
)
from rba_core.errors import CheckpointError


class TinyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        if not tied:
            self.head = nn.Linear(4, 11, bias=False)


def tiny_tensors(tied: bool = False) -> dict[str, torch.Tensor]:
    return {name: torch.randn_like(value) for name, value in TinyLM(tied).state_dict().items()}


def test_save_pretrained_round_trip_each_kind(tmp_path):
    tensors = tiny_tensors()
    tensors["step"] = torch.tensor([3, 5], dtype=torch.int64)
    tensors["half"] = torch.randn(2, 3).to(torch.bfloat16)
    expected_files = {"full": "model.safetensors", "adapter": "adapter.safetensors",
                      "lora": "lora.safetensors"}
    for kind, file_name in expected_files.items():
        folder = tmp_path / kind
        save_pretrained(folder, tensors, {"kind": kind, "rank": 4}, kind=kind)
        assert sorted(os.listdir(folder)) == sorted([file_name, "config.json"])
        assert read_config(folder) == {"kind": kind, "rank": 4}
        with safe_open(str(folder / file_name), framework="pt") as handle:
            assert handle.metadata()["format"] == "pt"
            loaded = {name: handle.get_tensor(name) for name in handle.keys()}
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype
            assert torch.equal(loaded[name], tensor)


def test_save_pretrained_rejects_unknown_kind(tmp_path):
    with pytest.raises(CheckpointError, match="kind 'optimizer'.*full, adapter, lora"):
        save_pretrained(tmp_path, tiny_tensors(), {}, kind="optimizer")
    assert not any(tmp_path.iterdir())


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    original = {"w": torch.randn(3, 3)}
    save_safetensors_atomic(path, original, metadata={"note": "first"})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_safetensors_save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic(path, {"w": torch.zeros(3, 3)})
    assert os.listdir(tmp_path) == ["weights.safetensors"]
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["note"] == "first"
        assert torch.equal(handle.get_tensor("w"), original["w"])


def test_atomic_save_replaces_file_and_copes_with_shared_tensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_safetensors_atomic(path, {"w": torch.zeros(2)})
    shared = torch.randn(5, 4)
    save_safetensors_atomic(path, {"embed": shared, "head": shared, "view": shared.t()})
    loaded = load_tensors_from_file(path)
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["head"], shared)
    assert torch.equal(loaded["view"], shared.t())
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def load_tensors_from_file(path):
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_load_tensors_casts_floats_only_and_filters_by_prefix(tmp_path):
    tensors = {"model.a": torch.randn(2, 2), "model.count": torch.arange(4),
               "head.w": torch.randn(3)}
    save_pretrained(tmp_path, tensors, {})
    loaded = load_tensors(tmp_path, dtype=torch.float16)
    assert loaded["model.a"].dtype == torch.float16
    assert loaded["model.count"].dtype == torch.int64
    assert torch.equal(loaded["model.a"], tensors["model.a"].half())
    only_model = load_tensors(tmp_path, prefix="model.")
    assert sorted(only_model) == ["model.a", "model.count"]
    assert torch.equal(only_model["model.a"], tensors["model.a"])


def write_shards(folder, tensors, split):
    names = sorted(tensors)
    first, second = names[:split], names[split:]
    save_file({n: tensors[n] for n in first}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in second}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_index_loads_every_tensor(tmp_path):
    tensors = tiny_tensors()
    write_shards(tmp_path, tensors, split=3)
    loaded = load_tensors(tmp_path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    module = TinyLM()
    load_into_module(module, loaded, source=str(tmp_path))
    assert torch.equal(module.proj.weight, tensors["proj.weight"])


def test_missing_shard_names_the_shard(tmp_path):
    write_shards(tmp_path, tiny_tensors(), split=3)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_tensors(tmp_path)


def test_index_promising_absent_tensor_names_file_and_tensor(tmp_path):
    tensors = tiny_tensors()
    write_shards(tmp_path, tensors, split=3)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.*ghost\.weight"):
        load_tensors(tmp_path)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"weight_map": {}}),
                                     json.dumps({"weight_map": {"a": "../outside.safetensors"}})])
def test_bad_index_names_the_index(tmp_path, content):
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_tensors(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 0.5])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    save_pretrained(tmp_path, tiny_tensors(), {})
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_tensors(tmp_path)


def test_folder_without_weights_refuses_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never loaded"):
        load_tensors(tmp_path)


def test_read_config_missing_and_invalid(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{\"hidden_size\": 4,")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: must hold a JSON object"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nowhere")


def test_missing_tensor_is_named(tmp_path):
    tensors = tiny_tensors()
    del tensors["proj.bias"]
    with pytest.raises(CheckpointError, match=r"ckpt-A.*missing tensors: proj\.bias") as info:
        load_into_module(TinyLM(), tensors, source="ckpt-A")
    assert "unexpected" not in str(info.value) and "wrong shapes" not in str(info.value)


def test_extra_tensor_is_named(tmp_path):
    tensors = tiny_tensors()
    tensors["adapter.scale"] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r"ckpt-B.*unexpected tensors: adapter\.scale"):
        load_into_module(TinyLM(), tensors, source="ckpt-B")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    tensors = tiny_tensors()
    tensors["proj.weight"] = torch.randn(5, 4)
    with pytest.raises(CheckpointError,
                       match=r"ckpt-C.*proj\.weight \(file \[5, 4\], model \[3, 4\]\)"):
        load_into_module(TinyLM(), tensors, source="ckpt-C")


def test_all_problems_reported_at_once_and_module_untouched(tmp_path):
    module = TinyLM()
    before = {n: t.clone() for n, t in module.state_dict().items()}
    tensors = tiny_tensors()
    del tensors["embed.weight"], tensors["norm.bias"]
    tensors["extra"] = torch.ones(2)
    tensors["head.weight"] = torch.randn(11, 5)
    with pytest.raises(CheckpointError) as info:
        load_into_module(module, tensors, source="ckpt-D")
    message = str(info.value)
    for fragment in ("embed.weight", "norm.bias", "extra", "head.weight (file [11, 5]"):
        assert fragment in message
    assert all(torch.equal(module.state_dict()[n], before[n]) for n in before)


def test_tied_weight_filled_from_its_source():
    tensors = tiny_tensors()
    del tensors["head.weight"]
    tensors["embed.weight"] = torch.randn(11, 4)
    module = TinyLM()
    with pytest.raises(CheckpointError, match="missing tensors: head.weight"):
        load_into_module(module, tensors, source="ckpt-E")
    load_into_module(module, tensors, source="ckpt-E", tied={"head.weight": "embed.weight"})
    assert torch.equal(module.head.weight, tensors["embed.weight"])
    assert module.head.weight.data_ptr() != module.embed.weight.data_ptr()


def test_load_into_meta_module_takes_file_tensors():
    # No nn.Embedding here: its normal_ init on meta imports torch._dynamo (seconds).
    tensors = {"0.weight": torch.randn(3, 4, dtype=torch.bfloat16),
               "0.bias": torch.randn(3, dtype=torch.bfloat16),
               "1.weight": torch.randn(3, dtype=torch.bfloat16),
               "1.bias": torch.randn(3, dtype=torch.bfloat16)}
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    load_into_module(module, tensors, source="ckpt-F")
    weight = module[0].weight
    assert weight.dtype == torch.bfloat16 and not weight.is_meta
    assert isinstance(weight, nn.Parameter) and weight.requires_grad
    assert torch.equal(weight, tensors["0.weight"])


def test_load_into_module_keeps_module_dtype():
    tensors = {n: t.to(torch.bfloat16) for n, t in tiny_tensors().items()}
    module = TinyLM()
    load_into_module(module, tensors, source="ckpt-G")
    assert module.proj.weight.dtype == torch.float32
    assert torch.equal(module.proj.weight, tensors["proj.weight"].float())
