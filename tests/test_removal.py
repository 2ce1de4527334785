"""Deleting an adapter restores the model exactly: every preset on every architecture, added (or loaded),
run, deleted, leaves a model equal to an untouched copy: same config, no added attribute on any module,
no leftover hook, same state_dict keys, bit-identical outputs. Presets and configs are frozen values."""

import dataclasses

import pytest
import torch

import adapterkit as ak

from conftest import first_output, make_inputs, make_model, randomize_adapters
from test_methods import CASES

HOOKS = [
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
]


def anatomy(model: torch.nn.Module) -> dict:
    """Everything adapterkit could leave behind, in comparable form."""
    config = getattr(model, "config", None)
    return {
        "config": config.to_json_string() if config is not None else None,
        "attn": getattr(config, "_attn_implementation", None),
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": {name: [len(getattr(m, h)) for h in HOOKS] for name, m in model.named_modules()},
        "keys": list(model.state_dict()),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


@pytest.mark.parametrize("arch,preset", CASES)
def test_delete_restores_the_model_exactly(arch, preset, tmp_path):
    model, untouched = make_model(arch), make_model(arch)
    inputs = make_inputs(arch)
    ak.add_adapter(model, "a", preset, activate=True)
    ak.add_adapter(model, "b", preset)  # shared changes are kept until the last adapter that needs them goes
    randomize_adapters(model)
    model(**inputs)
    ak.save_adapter(model, "a", tmp_path / "a")
    ak.delete_adapter(model, "b")
    assert ak.list_adapters(model).keys() == {"a"}
    ak.delete_adapter(model, "a")
    ak.load_adapter(model, tmp_path / "a", activate=True)
    model(**inputs)
    ak.delete_adapter(model, "a")
    expected = first_output(untouched(**inputs))  # transformers installs its own hooks on a first forward
    assert anatomy(model) == anatomy(untouched)
    assert torch.equal(first_output(model(**inputs)), expected)


def test_presets_cannot_be_changed_through_a_config():
    before = ak.PRESETS["unipelt"].to_dict()
    model = make_model("bert")
    config = ak.add_adapter(model, "u", "unipelt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.configs[0].r = 99
    with pytest.raises(AttributeError):
        config.configs.append(ak.LoRAConfig())
    assert ak.PRESETS["unipelt"].to_dict() == before
    fusion = ak.FusionConfig.resolve("dynamic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fusion.value = False
    assert ak.FusionConfig.resolve("dynamic").value is True


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: ak.LoRAConfig(r=0), "r must be a positive int"),
        (lambda: ak.LoRAConfig(dropout=1.5), "dropout must be in"),
        (lambda: ak.PrefixConfig(prefix_length=0), "prefix_length must be > 0"),
        (lambda: ak.BottleneckConfig(reduction_factor=0), "reduction_factor"),
        (lambda: ak.FusionConfig(dropout=2.0), "dropout"),
        (lambda: ak.union(ak.LoRAConfig()), "at least two"),
    ],
)
def test_configs_are_validated_when_built(build, reason):
    with pytest.raises(ak.ConfigError, match=reason):
        build()


def test_replace_makes_a_new_validated_value():
    lora = ak.LoRAConfig(target_modules=["query", "value"])
    wider = lora.replace(r=16)
    assert (lora.r, wider.r, wider.target_modules) == (8, 16, ("query", "value"))
    assert hash(wider) != hash(lora) and wider == ak.LoRAConfig(r=16, target_modules=("query", "value"))
    with pytest.raises(ak.ConfigError, match="r must be a positive int"):
        lora.replace(r=-1)
