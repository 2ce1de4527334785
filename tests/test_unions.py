"""Unions of methods: placement, chains at one host, gating, serialisation."""

import json

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak

from conftest import make_inputs, make_model, randomize_adapters


def test_union_at_one_host_applies_parts_in_order():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "u", ak.union(ak.LoRAConfig(r=2), ak.IA3Config()), activate=True)
    randomize_adapters(model)
    value = model.encoder.layer[0].attention.self.value
    lora, ia3 = value.adapterkit["u"]
    x = torch.randn(2, 3, 32)
    expected = (F.linear(x, value.weight, value.bias) + x @ lora.lora_A.T @ lora.lora_B.T * 4) * ia3.ia3_l
    torch.testing.assert_close(value(x), expected, atol=1e-5, rtol=1e-5)


def test_mergeable_union_merges_and_unmerges():
    model = make_model("bert")
    inputs = make_inputs("bert")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ak.add_adapter(model, "u", ak.union(ak.LoRAConfig(r=2), ak.IA3Config()), activate=True)
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.add_(1)
    expected = model(**inputs).logits
    ak.merge_adapter(model, "u")
    torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    ak.unmerge_adapter(model, "u")
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_unipelt_gates_lora_by_mean_sigmoid():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "u", "unipelt", activate=True)
    randomize_adapters(model)
    query = model.encoder.layer[0].attention.self.query
    lora = query.adapterkit["u"]
    assert lora.scaling == 2 / 8
    x = torch.randn(2, 5, 32)
    gate = torch.sigmoid(lora.gate(x)).mean(dim=1, keepdim=True)  # (2, 1, 1)
    expected = F.linear(x, query.weight, query.bias) + (x @ lora.lora_A.T @ lora.lora_B.T) * 0.25 * gate
    torch.testing.assert_close(query(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ak.AdapterError, match="cannot be merged"):
        ak.merge_adapter(model, "u")


def test_mam_is_prefix_plus_parallel(tmp_path):
    model = make_model("bert")
    ak.add_adapter(model, "m", "mam", activate=True)
    config = ak.list_adapters(model)["m"]
    assert [c.method for c in config.configs] == ["prefix", "bottleneck"]
    assert config.configs[0].bottleneck_size == 800 and config.configs[1].is_parallel
    ak.save_adapter(model, "m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())["config"]
    assert saved["method"] == "union" and saved["configs"][1]["scaling"] == 4.0
    ak.bake_adapter(model, "m")
    assert ak.list_adapters(model)["m"].configs[0].flat


def test_union_errors():
    with pytest.raises(ak.ConfigError, match="at least two"):
        ak.union(ak.LoRAConfig())
    with pytest.raises(ak.ConfigError, match="do not nest"):
        ak.union(ak.LoRAConfig(), ak.union(ak.IA3Config(), ak.LoRAConfig()))
