"""AdapterFusion: the attention formula at one site, training with adapters frozen, files."""

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterError, AdapterFileError

from conftest import first_output, make_inputs, make_model, randomize_adapters


def fused_model(preset="pfeiffer", config="dynamic", names=("a", "b", "c")):
    model = make_model("bert")
    for name in names:
        ak.add_adapter(model, name, preset)
    randomize_adapters(model)
    ak.add_fusion(model, ak.Fuse(*names), config)
    randomize_adapters(model, std=0.05, seed=5)  # fusion weights away from their init too
    return model


def expected_fusion(layer, query, outputs):
    """Pfeiffer et al. (2021), eq. 3-4, written out per position."""
    q = layer.query(query)  # (B, T, H)
    scores = torch.stack([(q * layer.key(u)).sum(-1) for u in outputs], dim=-1)  # (B, T, N)
    p = torch.softmax(scores, dim=-1)
    return sum(p[..., i : i + 1] * layer.value(u) for i, u in enumerate(outputs))


@pytest.mark.parametrize("config", ["dynamic", "static"])
def test_pfeiffer_site_computes_fusion_then_residual_and_layernorm(config):
    model = fused_model(config=config).eval()
    ln = model.bert.encoder.layer[0].output.LayerNorm
    slot = ln.adapterkit
    z = torch.randn(2, 5, 32)
    ak.set_active(model, ak.Fuse("a", "b", "c"))
    with torch.no_grad():
        got = ln(z)
        base = ln.forward(z)
        outputs = [slot[n].bottleneck(base) for n in "abc"]
        want = ln.forward(expected_fusion(slot["a,b,c"], base, outputs) + z)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert isinstance(slot["a,b,c"].value, torch.nn.Linear) == (config == "dynamic")


def test_houlsby_and_parallel_sites_fuse_too():
    for preset in ("houlsby", "parallel"):
        model = fused_model(preset)
        ak.set_active(model, ak.Fuse("a", "b", "c"))
        x = make_inputs("bert")
        with torch.no_grad():
            fused = first_output(model(**x))
            ak.set_active(model, "a")
            single = first_output(model(**x))
        assert fused.shape == single.shape and not torch.allclose(fused, single)


def test_dynamic_fusion_starts_as_identity_value():
    model = make_model("bert")
    ak.add_adapter(model, "a", "pfeiffer")
    ak.add_adapter(model, "b", "pfeiffer")
    ak.add_fusion(model, ["a", "b"])
    layer = model.bert.encoder.layer[0].output.LayerNorm.adapterkit["a,b"]
    eye = torch.eye(32)
    torch.testing.assert_close(layer.value.weight, eye + 1e-6 * (1 - eye))
    assert float(ak.fusion_regularization(model).detach()) == pytest.approx(0.01 * 2 * (32 * 31) * 1e-12, rel=1e-3)


def test_train_fusion_freezes_the_adapters():
    model = fused_model()
    ak.train_fusion(model, ak.Fuse("a", "b", "c"))
    out = model(**make_inputs("bert"), labels=torch.tensor([0, 1]))
    (out.loss + ak.fusion_regularization(model)).backward()
    for name, p in model.named_parameters():
        fusion = ".adapterkit.a,b,c." in name
        head = name.startswith("classifier")
        assert p.requires_grad == (fusion or head), name
        if fusion:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_and_load_fusion_bit_exact(tmp_path):
    model = fused_model()
    for name in "abc":
        ak.save_adapter(model, name, tmp_path / name)
    ak.save_fusion(model, "a,b,c", tmp_path / "fusion")
    assert {p.name for p in (tmp_path / "fusion").iterdir()} == {
        "adapter_fusion_config.json",
        "model_adapter_fusion.safetensors",
        "head.safetensors",  # the head trained with the fusion
    }
    x = make_inputs("bert")
    ak.set_active(model, ak.Fuse("a", "b", "c"))
    with torch.no_grad():
        want = model(**x).logits

    fresh = make_model("bert")
    with pytest.raises(AdapterFileError, match="lacks; ak.load_adapter them first"):
        ak.load_fusion(fresh, tmp_path / "fusion")
    for name in "abc":
        ak.load_adapter(fresh, tmp_path / name, load_head=False)
    torch.nn.init.normal_(fresh.classifier.weight)  # the fusion folder's head must replace it
    assert ak.load_fusion(fresh, tmp_path / "fusion", activate=True) == "a,b,c"
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, want)
    with pytest.raises(AdapterError, match="is fused in"):
        ak.delete_adapter(fresh, "a")
    ak.delete_fusion(fresh, "a,b,c")
    ak.delete_adapter(fresh, "a")
    assert ak.active_setup(fresh) == ak.Stack()
