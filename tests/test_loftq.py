"""LoftQ: the quantizers against naive ones, the start against its definition, and the base change recorded
and undone (peft's own LoftQ needs bitsandbytes on CUDA; test_peer_roundtrip checks peft's outputs on the
quantized base, as peft's LoftQ example loads it)."""

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.core import io
from adapterkit.core.arch import out_in
from adapterkit.core.backbone import base_prefix
from adapterkit.core.methods import loftq
from adapterkit.errors import AdapterError, ConfigError

from conftest import first_output, make_inputs, make_model


def naive_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Block by block, value by value: the nearest NF4 level of value / absmax (ties to the lower level)."""
    flat, out = weight.float().reshape(-1).tolist(), []
    for start in range(0, len(flat), loftq.BLOCK):
        block = flat[start : start + loftq.BLOCK]
        absmax = max(abs(v) for v in block)
        for v in block:
            scaled = v / absmax if absmax else 0.0
            level = min(loftq.NF4, key=lambda q, s=scaled: (abs(q - s), q))
            out.append(level * absmax)
    return torch.tensor(out).view(weight.shape)


def test_nf4_is_the_nearest_level_per_block_of_64():
    w = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))  # 350 values: the last block is short
    w[0, :] = 0  # part of an all-zero block stays zero
    got = loftq.nf4(w)
    torch.testing.assert_close(got, naive_nf4(w), rtol=1e-6, atol=1e-7)
    assert (got[0] == 0).all() and loftq.nf4(got).equal(got)  # NF4 values are their own rounding


def test_int8_rounds_each_row_to_127_steps_of_its_absmax():
    w = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    got = loftq.int8(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(got / step, torch.round(w / step), atol=1e-4)
    assert ((got - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_the_start_is_the_rank_r_part_of_the_quantization_error(bits):
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    q, a, b = loftq.loftq_start(w, bits, rank=4, iterations=1, scaling=2.0)
    assert q.equal(loftq.nf4(w) if bits == 4 else loftq.int8(w))
    u, s, vh = torch.linalg.svd((w - q).double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close((2.0 * b @ a).double(), best, rtol=1e-4, atol=1e-5)
    alone, start = (w - q).norm(), (w - q - 2.0 * b @ a).norm()
    assert start < alone  # the start recovers part of what quantization lost


def test_more_iterations_lose_less():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    errors = []
    for iterations in (1, 5):
        q, a, b = loftq.loftq_start(w, 4, rank=8, iterations=iterations, scaling=1.0)
        errors.append((w - q - b @ a).norm().item())
    assert errors[1] < errors[0]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # nn.Linear and GPT-2's Conv1D (weight stored (in, out))
def test_the_base_is_quantized_while_the_adapter_lasts_and_restored_after(arch):
    model, inputs = make_model(arch), make_inputs(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    full = first_output(model(**inputs))
    ak.add_adapter(model, "a", "loftq", activate=True)
    hosts = {n: m for n, m in model.named_modules() if hasattr(m, loftq.ORIGINAL)}
    factors = io.adapter_state_dict(model, "a")  # scaling 1: s B A = B A
    assert hosts
    for name, host in hosts.items():
        w = out_in(host, weights[f"{name}.weight"])
        assert out_in(host, host.weight).equal(loftq.nf4(w).to(w.dtype))
        a, b = (factors[f"{name.removeprefix(base_prefix(model))}.{part}"] for part in ("lora_A", "lora_B"))
        assert (w - out_in(host, host.weight) - b @ a).norm() < 0.8 * (w - out_in(host, host.weight)).norm()
    with ak.disable_adapters(model):
        assert not torch.equal(first_output(model(**inputs)), full)  # the base itself is quantized
    ak.delete_adapter(model, "a")
    assert all(v.equal(weights[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, loftq.ORIGINAL) for m in model.modules())


def test_loftq_adapters_of_one_host_share_its_quantization():
    model = make_model("bert")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ak.add_adapter(model, "a", "loftq")
    ak.add_adapter(model, "b", ak.LoRAConfig(init_weights="loftq", r=4))
    a, b = (io.adapter_state_dict(model, n) for n in "ab")
    key = next(k for k in a if k.endswith("lora_A"))
    # one Q, one SVD: b's factors are a's top 4 over sqrt(s) (s = alpha / r = 2), up to the SVD's signs
    assert b[key].shape[0] == 4 and torch.allclose(b[key].abs() * 2**0.5, a[key][:4].abs(), atol=1e-5)
    with pytest.raises(ConfigError, match="loftq_bits=4"):
        ak.add_adapter(model, "c", ak.LoRAConfig(init_weights="loftq", loftq_bits=8))
    assert "c" not in ak.list_adapters(model)
    ak.delete_adapter(model, "a")
    assert not all(v.equal(weights[k]) for k, v in model.state_dict().items() if ".adapterkit." not in k)
    ak.delete_adapter(model, "b")
    assert all(v.equal(weights[k]) for k, v in model.state_dict().items())


def test_peft_files_carry_the_loftq_settings(tmp_path):
    model, inputs = make_model("bert"), make_inputs("bert")
    ak.add_adapter(model, "a", ak.LoRAConfig(init_weights="loftq", loftq_bits=8, loftq_iter=2), activate=True)
    out = first_output(model(**inputs))
    ak.save_adapter(model, "a", tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 2}
    fresh = make_model("bert")
    ak.load_adapter(fresh, tmp_path / "peft", "a", activate=True)  # the base quantized again, the same way
    assert torch.equal(first_output(fresh(**inputs)), out)
    with pytest.raises(AdapterError, match="AdapterHub"):
        ak.save_adapter(model, "a", tmp_path / "hub", format="adapterhub")
    config["loftq_config"] = "four bits"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="loftq_config"):
        ak.load_adapter(make_model("bert"), tmp_path / "peft", "b")


def test_bad_settings_are_refused():
    for bad in ({"loftq_bits": 3}, {"loftq_iter": 0}, {"use_dora": True}):
        with pytest.raises(ConfigError):
            ak.LoRAConfig(init_weights="loftq", **bad)
    model = make_model("bert")
    ak.quantize_base(model, "int8")
    with pytest.raises(ConfigError, match="quantized already"):
        ak.add_adapter(model, "a", "loftq")
