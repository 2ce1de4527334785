"""The shared method table: every preset on every architecture."""

import pytest
import torch

import adapterkit as ak
from adapterkit.core.arch import out_in
from adapterkit.core.backbone import base_prefix
from adapterkit.core.methods import loftq
from adapterkit.core.state import is_trainable_param

from conftest import ARCHS, SPEECH_ARCHS, first_output, make_inputs, make_model, randomize_adapters

PRESETS = [
    "pfeiffer",
    "houlsby",
    "parallel",
    "lora",
    "dora",
    "ia3",
    "ia3_adapterhub",
    "compacter",
    "compacter++",
    "prefix",
    "prompt",
    "mam",
    "unipelt",
    "e_adapter",
    "l_adapter",
    "el",
    "p_adapter",
    "elp",
    "loha",
    "lokr",
    "vera",
    "ln_tuning",
    "fourierft",
    "pissa",
    "olora",
    "loftq",
    "oft",
    "boft",
    "p_tuning",
    "adalora",
    "loreft",
]
QUANTIZED_BASE = {"loftq"}  # presets that quantize their hosts' weights while they last


def quantized_twin(arch: str, adapted: torch.nn.Module) -> torch.nn.Module:
    """A fresh ``arch`` model with the weights of ``adapted``'s LoftQ hosts rounded to NF4, independently."""
    twin = make_model(arch)
    for name, module in adapted.named_modules():
        if hasattr(module, loftq.ORIGINAL):
            host = twin.get_submodule(name)
            with torch.no_grad():
                out_in(host, host.weight).copy_(loftq.nf4(out_in(host, host.weight)))
    return twin


# Refused with a reason (tests below): prompts need tokens; P-adapters need convolutional features.
REFUSED = {
    (a, p): "prompt tuning prepends vectors to a token sequence" for a in SPEECH_ARCHS for p in ("prompt", "p_tuning")
}
REFUSED |= {
    (arch, preset): "no variable-length convolutional features"
    for arch in ARCHS
    for preset in ("p_adapter", "elp")
    if arch not in SPEECH_ARCHS or arch == "whisper"
}
# The vision and text towers' rows run each family's main presets (the table's time grows by row).
TOWERS = ("dinov2", "clip_vision_model", "siglip_vision_model", "clip_text_model", "siglip_text_model")
FAMILIES = ("lora", "pfeiffer", "houlsby", "parallel", "ia3", "prefix", "prompt")
UNSUPPORTED = set(REFUSED) | {(arch, preset) for arch in TOWERS for preset in PRESETS if preset not in FAMILIES}
CASES = [(arch, preset) for arch in ARCHS for preset in PRESETS if (arch, preset) not in UNSUPPORTED]


@pytest.mark.parametrize("arch,preset", CASES)
def test_every_adapter_parameter_gets_a_gradient(arch, preset):
    model = make_model(arch)
    ak.add_adapter(model, "a", preset)
    ak.train_adapter(model, "a")
    randomize_adapters(model)
    model.train()
    out = model(**make_inputs(arch), output_hidden_states=True)
    # every position of the last layer counts (a [CLS] head alone reads one position)
    (first_output(out).float().pow(2).mean() + out.hidden_states[-1].pow(2).mean()).backward()
    adapter = {n: p for n, p in model.named_parameters() if is_trainable_param(n, "a")}
    assert adapter, "no adapter parameters"
    for name, p in adapter.items():
        assert p.requires_grad, name
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    for name, p in model.named_parameters():
        if name not in adapter and p.grad is not None:
            assert ".adapterkit." not in name and not name.startswith(model.base_model_prefix + "."), name


@pytest.mark.parametrize("arch,preset", CASES)
def test_adapter_changes_output_and_disable_restores_base(arch, preset):
    model = make_model(arch)
    inputs = make_inputs(arch)
    base = first_output(model(**inputs))
    ak.add_adapter(model, "a", preset, activate=True)
    if preset in QUANTIZED_BASE:  # LoftQ's base is the quantized one while the adapter lasts (test_loftq.py)
        base = first_output(quantized_twin(arch, model)(**inputs))
    randomize_adapters(model)
    adapted = first_output(model(**inputs))
    assert not torch.allclose(adapted, base, rtol=1e-3, atol=0)
    with ak.disable_adapters(model):
        assert torch.equal(first_output(model(**inputs)), base)
    ak.set_active(model, None)
    assert torch.equal(first_output(model(**inputs)), base)


@pytest.mark.parametrize("arch,preset", CASES)
def test_save_load_round_trip_is_bit_identical(arch, preset, tmp_path):
    model = make_model(arch)
    ak.add_adapter(model, "a", preset, activate=True)
    randomize_adapters(model)
    inputs = make_inputs(arch)
    expected = first_output(model(**inputs))
    ak.save_adapter(model, "a", tmp_path / "a")
    fresh = make_model(arch)
    name = ak.load_adapter(fresh, tmp_path / "a", activate=True)
    assert name == "a"
    assert torch.equal(first_output(fresh(**inputs)), expected)


MERGEABLE = ["lora", "dora", "ia3", "ia3_adapterhub"]


@pytest.mark.parametrize(
    "arch,preset", [(arch, preset) for arch in ARCHS for preset in MERGEABLE if (arch, preset) not in UNSUPPORTED]
)
def test_merge_unmerge(arch, preset):
    model = make_model(arch)
    inputs = make_inputs(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ak.add_adapter(model, "a", preset, activate=True)
    randomize_adapters(model)
    with torch.no_grad():  # IA3 vectors around 1, as after training
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.add_(1)
    unmerged = first_output(model(**inputs))
    ak.merge_adapter(model, "a")
    hooked = [m for m in model.modules() if hasattr(m, "adapterkit") and m._forward_hooks]
    assert hooked == [], "a merged LoRA must leave no hook behind"
    torch.testing.assert_close(first_output(model(**inputs)), unmerged, atol=1e-5, rtol=1e-5)
    ak.unmerge_adapter(model, "a")
    # W comes back to fp32 rounding (checked below); a final LayerNorm (SigLIP's text tower) can double that
    torch.testing.assert_close(first_output(model(**inputs)), unmerged, atol=2e-6, rtol=1e-6)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby", "parallel", "compacter"])
def test_bottleneck_cannot_merge(bert, preset):
    ak.add_adapter(bert, "a", preset)
    with pytest.raises(ak.AdapterError, match="cannot be merged"):
        ak.merge_adapter(bert, "a")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bare_model_and_head_model_share_adapter_files(arch, tmp_path):
    with_head = make_model(arch, head=True)
    ak.add_adapter(with_head, "a", "houlsby", activate=True)
    randomize_adapters(with_head)
    ak.save_adapter(with_head, "a", tmp_path / "a")
    backbone = with_head.get_submodule(base_prefix(with_head)[:-1])  # .bert, .encoder (Whisper), ...
    bare = make_model(arch, head=False)
    bare.load_state_dict(backbone.state_dict(), strict=False)
    ak.load_adapter(bare, tmp_path / "a", activate=True)
    inputs = make_inputs(arch)
    hidden_with_head = backbone(**inputs).last_hidden_state
    torch.testing.assert_close(bare(**inputs).last_hidden_state, hidden_with_head, atol=0, rtol=0)


@pytest.mark.parametrize("arch,preset", sorted(REFUSED))
def test_methods_refused_where_they_make_no_sense(arch, preset):
    with pytest.raises(ak.ConfigError, match=REFUSED[(arch, preset)]):
        ak.add_adapter(make_model(arch), "p", preset)
