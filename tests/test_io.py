"""Saving and loading one adapter: contents, fingerprint, corruption, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
import adapterkit.core.io as akio

from conftest import make_inputs, make_model, randomize_adapters


@pytest.fixture
def saved(bert, tmp_path):
    ak.add_adapter(bert, "a", "lora", activate=True)
    ak.add_adapter(bert, "other", "pfeiffer")
    randomize_adapters(bert)
    ak.save_adapter(bert, "a", tmp_path / "a")
    return bert, tmp_path / "a"


def test_file_holds_the_adapter_alone(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json", "head.safetensors"]
    tensors = load_file(path / "adapter.safetensors")
    params = {n: p for n, p in model.named_parameters() if ".adapterkit.a." in n}
    assert len(tensors) == len(params) == 8  # 2 layers x (query, value) x (A, B)
    assert "encoder.layer.0.attention.self.query.lora_A" in tensors
    assert set(load_file(path / "head.safetensors")) == {"classifier.weight", "classifier.bias"}
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["config"] == {**ak.PRESETS["lora"].to_dict()}
    assert config["base_model"]["model_type"] == "bert"
    info = ak.inspect_adapter(path)
    assert info["tensors"]["encoder.layer.1.attention.self.value.lora_B"] == [32, 8]


def test_head_is_restored(saved):
    model, path = saved
    inputs = make_inputs("bert")
    expected = model(**inputs).logits
    fresh = make_model("bert")
    torch.nn.init.normal_(fresh.classifier.weight)
    ak.load_adapter(fresh, path, activate=True)
    assert torch.equal(fresh(**inputs).logits, expected)


def test_other_base_model_is_refused_before_any_change(saved):
    _, path = saved
    other = make_model("bert", seed=123)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ak.AdapterFileError, match="another base model"):
        ak.load_adapter(other, path)
    assert ak.list_adapters(other) == {}
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ak.AdapterFileError, match="saved for a 'bert' model, this one is 'gpt2'"):
        ak.load_adapter(make_model("gpt2"), path)


def test_same_checkpoint_in_bf16_is_accepted(saved):
    _, path = saved
    fresh = make_model("bert").to(torch.bfloat16)
    ak.load_adapter(fresh, path, activate=True)
    assert fresh.bert.encoder.layer[0].attention.self.query.adapterkit["a"].lora_A.dtype == torch.float32
    assert fresh(**make_inputs("bert")).logits.dtype == torch.bfloat16


def test_wrong_rank_names_the_first_tensor_and_rolls_back(saved):
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["config"]["r"] = 4
    (path / "adapter_config.json").write_text(json.dumps(config))
    fresh = make_model("bert")
    with pytest.raises(ak.AdapterFileError, match=r"encoder\.layer\.0\.attention\.self\.query\.lora_A"):
        ak.load_adapter(fresh, path)
    assert ak.list_adapters(fresh) == {}
    assert not any(".adapterkit." in k for k in fresh.state_dict())


def test_wrong_head_shape_is_clear(saved):
    _, path = saved
    from conftest import ARCHS

    config_cls, kwargs, _, with_head = ARCHS["bert"]
    torch.manual_seed(0)
    three_labels = with_head(config_cls(**kwargs, num_labels=3)).eval()
    with pytest.raises(ak.AdapterFileError, match="num_labels"):
        ak.load_adapter(three_labels, path)
    assert ak.load_adapter(three_labels, path, load_head=False) == "a"


def test_truncated_and_corrupt_files(saved, tmp_path):
    _, path = saved
    weights = path / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ak.AdapterFileError, match="corrupt or truncated"):
        ak.load_adapter(make_model("bert"), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ak.AdapterFileError, match="corrupt"):
        ak.load_adapter(make_model("bert"), path)
    with pytest.raises(ak.AdapterFileError, match="not a saved adapter folder"):
        ak.load_adapter(make_model("bert"), tmp_path / "nowhere")


def test_incomplete_peer_config_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ak.AdapterFileError, match="peft config with a missing or malformed field .*'r'"):
        ak.load_adapter(make_model("bert"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ak.AdapterFileError, match="neither an adapterkit, a peft nor an AdapterHub"):
        ak.load_adapter(make_model("bert"), tmp_path)


def test_crash_mid_write_leaves_old_adapter_intact(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    calls, real = [], akio.save_file

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(akio, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ak.save_adapter(model, "other", path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["a"]


def test_overwrite_replaces_whole_folder(saved):
    model, path = saved
    ak.save_adapter(model, "other", path, with_head=False)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert json.loads((path / "adapter_config.json").read_text())["name"] == "other"
