"""Writing peft and AdapterHub folders: adapterkit reads back what it wrote, bit for bit, and refuses
what a format cannot express. ``test_peer_roundtrip.py`` has the peers themselves load these folders."""

import json
import pickle

import pytest
import torch
from fixtures.make_peer_fixtures import base_model, inputs
from safetensors.torch import load_file, save_file

import adapterkit as ak

from conftest import randomize_adapters
from test_methods import PRESETS as TABLE

# (model, preset, overrides, format): everything each format can express, BERT and GPT-2, bare and with heads
WRITABLE = [
    ("bert", "lora", {}, "peft"),
    ("bert", "dora", {}, "peft"),
    ("bert", "lora", {"use_rslora": True, "r": 4}, "peft"),
    ("bert", "lora", {"target_modules": ["word_embeddings", "key"]}, "peft"),
    ("bert", "ia3", {}, "peft"),
    ("bert-cls", "lora", {}, "peft"),
    ("gpt2", "lora", {"target_modules": ["c_attn", "c_fc"]}, "peft"),
    ("gpt2", "ia3", {}, "peft"),
    ("gpt2-lm", "prefix", {"prefix_length": 3, "bottleneck_size": 8, "shift_positions": True}, "peft"),
    ("gpt2-lm", "prompt", {"prompt_length": 3}, "peft"),
    # the targets listed out of the module's order: peft nests a module's first parameter deepest whatever the order
    ("mixtral", "lora", {"target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]}, "peft"),
    ("mixtral", "lora", {"target_modules": ["q_proj"], "target_parameters": ["experts.down_proj"]}, "peft"),
    ("bert", "trainable_tokens", {"token_indices": [43, 106, 11]}, "peft"),  # tokens of the test inputs
    ("gpt2-lm", "trainable_tokens", {"token_indices": [43, 106, 11]}, "peft"),  # tied: peft stores a copy at lm_head
    ("bert", "pfeiffer", {}, "adapterhub"),
    ("bert", "houlsby", {}, "adapterhub"),
    ("bert", "parallel", {}, "adapterhub"),
    ("bert", "lora", {"use_rslora": True, "r": 4}, "adapterhub"),
    ("bert", "lora", {"target_modules": r".*layer\.1\.(attention\.self\.key|output\.dense)"}, "adapterhub"),
    ("bert", "ia3_adapterhub", {}, "adapterhub"),
    ("bert", "prefix", {"prefix_length": 3, "bottleneck_size": 8}, "adapterhub"),
    ("bert", "prefix", {"prefix_length": 3, "flat": True}, "adapterhub"),
    ("bert-eager", "prompt", {"prompt_length": 3}, "adapterhub"),
    ("bert-cls", "pfeiffer", {"bottleneck_size": 8}, "adapterhub"),
    ("gpt2", "pfeiffer", {}, "adapterhub"),
    ("gpt2", "houlsby", {}, "adapterhub"),
    ("bert", "loreft", {}, "adapterhub"),
    ("bert", "loreft", {"prefix_positions": 2, "suffix_positions": 2, "r": 2}, "adapterhub"),
    ("bert", "noreft", {"prefix_positions": 0, "suffix_positions": 1, "tied_weights": True}, "adapterhub"),
    ("bert", "noreft", {"prefix_positions": 0, "suffix_positions": 2, "layers": [1]}, "adapterhub"),
]
# every other method peft has, as the method table (test_methods.PRESETS) adds it, on BERT (prompts: peft's
# prompts go before the position embeddings, so on a decoder)
WRITABLE += [
    ("gpt2-lm" if isinstance(ak.PRESETS[preset], ak.PromptConfig) else "bert", preset, {}, "peft")
    for preset in TABLE
    if type(ak.PRESETS[preset]).peft and preset not in {row[1] for row in WRITABLE if row[3] == "peft"}
]
IDS = [f"{fmt}-{model}-{preset}-{'-'.join(map(str, o.values()))}" for model, preset, o, fmt in WRITABLE]


def output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs())
    return out.logits if "logits" in out else out.last_hidden_state


def trained(kind: str, preset: str, overrides: dict):
    model = base_model(kind)
    ak.add_adapter(model, "task", preset, activate=True, **overrides)
    randomize_adapters(model)
    if kind == "bert-cls":
        torch.nn.init.normal_(model.classifier.weight)
    return model


@pytest.mark.parametrize(("kind", "preset", "overrides", "fmt"), WRITABLE, ids=IDS)
def test_written_peer_folder_reads_back_exactly(tmp_path, kind, preset, overrides, fmt):
    model = trained(kind, preset, overrides)
    expected = output(model)
    ak.save_adapter(model, "task", tmp_path / "a", format=fmt)
    fresh = base_model(kind)
    assert not torch.allclose(output(fresh), expected, atol=1e-4)
    ak.load_adapter(fresh, tmp_path / "a", activate=True)
    torch.testing.assert_close(output(fresh), expected, atol=1e-6, rtol=1e-6)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert ("peft_type" in config) == (fmt == "peft") and ("model_class" in config) == (fmt == "adapterhub")


def test_peft_file_layout(tmp_path):
    model = trained("bert-cls", "lora", {"r": 4})
    ak.save_adapter(model, "task", tmp_path, format="peft")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert config["target_modules"] == ["query", "value"] and config["lora_alpha"] == 8 and config["r"] == 4
    a = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert a.shape == (4, 64)
    torch.testing.assert_close(a, model.bert.encoder.layer[0].attention.self.query.adapterkit["task"].lora_A)
    assert tensors["base_model.model.classifier.weight"].shape == (3, 64)
    assert len(tensors) == 2 * 2 * 2 + 2


def test_adapterhub_file_layout(tmp_path):
    model = trained("bert-cls", "pfeiffer", {})
    ak.save_adapter(model, "task", tmp_path, format="adapterhub")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["config"]["reduction_factor"] == 16 and config["config"]["original_ln_before"] is True
    assert config["model_class"] == "BertForSequenceClassification" and config["name"] == "task"
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert tensors["bert.encoder.layer.1.output.adapters.task.adapter_down.0.weight"].shape == (4, 64)
    assert sorted(load_file(tmp_path / "model_head.safetensors")) == ["classifier.bias", "classifier.weight"]
    assert json.loads((tmp_path / "head_config.json").read_text())["config"] is None


def test_rslora_becomes_an_equivalent_alpha_for_adapterhub(tmp_path):
    ak.save_adapter(
        trained("bert", "lora", {"r": 4, "alpha": 8, "use_rslora": True}), "task", tmp_path, format="adapterhub"
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert config["alpha"] / config["r"] == pytest.approx(8 / 4**0.5)


def test_task_model_file_loads_into_bare_model_and_back(tmp_path):
    model = trained("bert-cls", "lora", {})
    ak.save_adapter(model, "task", tmp_path / "peft", format="peft")
    bare = base_model("bert")
    bare.load_state_dict(
        {k.removeprefix("bert."): v for k, v in model.state_dict().items() if "adapterkit" not in k}, strict=False
    )
    ak.load_adapter(bare, tmp_path / "peft", activate=True)
    torch.testing.assert_close(
        bare.encoder.layer[1].attention.self.value.adapterkit["default"].lora_B,
        model.bert.encoder.layer[1].attention.self.value.adapterkit["task"].lora_B,
    )
    ak.save_adapter(bare, "default", tmp_path / "bare", format="peft")
    again = base_model("bert-cls")
    ak.load_adapter(again, tmp_path / "bare", "x", load_head=False)
    assert "x" in ak.list_adapters(again)


REFUSED = [
    ("bert", "pfeiffer", {}, "peft", "peft has no such adapters"),
    ("bert", "prefix", {"prefix_length": 3}, "peft", "shift_positions"),
    ("bert", "prompt", {}, "peft", "before the position embeddings"),
    ("bert", "unipelt", {}, "peft", "union"),
    ("bert", "dora", {}, "adapterhub", "DoRA computes differently"),
    ("bert", "ia3", {}, "adapterhub", "scales outputs"),
    ("bert", "compacter", {}, "adapterhub", "PHM"),
    ("bert", "lora", {"target_modules": ["query", "attention.output.dense"]}, "adapterhub", "no AdapterHub name"),
    (
        "bert",
        "lora",
        {"target_modules": r".*layer\.0\.attention\.self\.query|.*layer\.1\.attention\.self\.key"},
        "adapterhub",
        "same matrices",
    ),
    ("gpt2", "lora", {}, "adapterhub", "no AdapterHub name"),
    ("gpt2", "parallel", {}, "adapterhub", "residual stream before the LayerNorm"),
    ("gpt2", "prompt", {}, "adapterhub", "no prompts on"),
    ("bert", "prefix", {"shift_positions": True}, "adapterhub", "keeps positions"),
    ("bert", "direft", {}, "adapterhub", "saves no subtract_projection"),
]


@pytest.mark.parametrize(("kind", "preset", "overrides", "fmt", "message"), REFUSED)
def test_inexpressible_adapter_is_refused_and_nothing_is_written(tmp_path, kind, preset, overrides, fmt, message):
    model = trained(kind, preset, overrides)
    with pytest.raises(ak.AdapterError, match=message):
        ak.save_adapter(model, "task", tmp_path / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(ak.AdapterError, match="unknown format 'lora'"):
        ak.save_adapter(trained("bert", "lora", {}), "task", tmp_path, format="lora")


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_bin_needing_full_unpickling_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "hub"
    ak.save_adapter(trained("bert", "lora", {}), "task", folder, format="adapterhub")
    tensors = load_file(folder / "adapter.safetensors")
    (folder / "adapter.safetensors").unlink()
    torch.save({**tensors, "x": Payload()}, folder / "pytorch_adapter.bin")
    model = base_model("bert")
    with pytest.raises(ak.AdapterFileError, match="full unpickling"):
        ak.load_adapter(model, folder)
    assert not (tmp_path / "PWNED").exists() and ak.list_adapters(model) == {}
    torch.save(tensors, folder / "pytorch_adapter.bin")  # a plain tensor pickle is fine
    ak.load_adapter(model, folder)
    with open(folder / "pytorch_adapter.bin", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ak.AdapterFileError, match="not a dict of tensors|corrupt|full unpickling"):
        ak.load_adapter(base_model("bert"), folder)


def test_wrong_rank_peer_file_names_the_tensor_and_changes_nothing(tmp_path):
    ak.save_adapter(trained("bert", "lora", {"r": 4}), "task", tmp_path, format="peft")
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"
    tensors[key] = torch.zeros(2, 64)
    save_file(tensors, file)
    model = base_model("bert")
    with pytest.raises(
        ak.AdapterFileError,
        match=r"encoder.layer.1.attention.self.value.lora_A does not fit: model \(4, 64\), file \(2, 64\)",
    ):
        ak.load_adapter(model, tmp_path)
    assert ak.list_adapters(model) == {}
    del tensors[key]
    save_file(tensors, file)
    with pytest.raises(ak.AdapterFileError, match="value.lora_A.weight is missing"):
        ak.load_adapter(model, tmp_path)


def test_adapter_for_another_architecture_is_refused(tmp_path):
    ak.save_adapter(trained("bert", "pfeiffer", {}), "task", tmp_path, format="adapterhub")
    with pytest.raises(ak.AdapterFileError, match="saved for a 'bert' model, this one is 'gpt2'"):
        ak.load_adapter(base_model("gpt2"), tmp_path)


def test_adapterhub_legacy_quirks(tmp_path):
    model = trained("bert", "lora", {"r": 4, "alpha": 16})
    ak.save_adapter(model, "task", tmp_path, format="adapterhub")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["version"] = "adapters.1.0.1"  # LoRA then ran with alpha = r, whatever the config said
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = base_model("bert")
    ak.load_adapter(fresh, tmp_path)
    assert ak.list_adapters(fresh)["task"].alpha == 4
    config["config"] = {**json.loads(json.dumps(ak.formats.adapterhub.PRESETS["pfeiffer"])), "non_linearity": "gelu"}
    del config["version"]  # before versions were recorded, "gelu" meant gelu_new
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert ak.formats.adapterhub.to_config(config, fresh).non_linearity == "gelu_new"


def test_peft_subfolder_per_adapter_name(tmp_path):
    model = trained("bert", "lora", {})
    ak.save_adapter(model, "task", tmp_path / "second", format="peft")
    fresh = base_model("bert")
    assert ak.load_adapter(fresh, tmp_path, "second") == "second"


def test_inspect_reads_every_format(tmp_path):
    model = trained("bert-cls", "lora", {"r": 4})
    for fmt in ("adapterkit", "peft", "adapterhub"):
        ak.save_adapter(model, "task", tmp_path / fmt, format=fmt)
        info = ak.inspect_adapter(tmp_path / fmt)
        assert info["format"] == fmt and info["params"] == 2 * 2 * (4 * 64 + 64 * 4)
        assert info["method"] in ("lora", "LORA") and len(info["tensors"]) == 8
        assert sorted(info["head"]) == ["classifier.bias", "classifier.weight"]
