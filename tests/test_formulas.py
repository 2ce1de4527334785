"""Each method against its closed-form formula (the peers' formulas, peer-libraries.md)."""

import math

import torch
import torch.nn.functional as F

import adapterkit as ak

from conftest import make_model, randomize_adapters


def bottleneck(h, module, act):
    """Reference ``scaling * Up(act(Down(h)))``."""
    b = module.bottleneck
    down = act(F.linear(h, b.adapter_down.weight, b.adapter_down.bias))
    return F.linear(down, b.adapter_up.weight, b.adapter_up.bias) * b.scaling


def ln(h, norm):
    return F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def setup(preset):
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", preset, activate=True)
    randomize_adapters(model)
    layer = model.encoder.layer[0]
    a = torch.randn(2, 5, 32)
    s = F.linear(F.gelu(layer.intermediate.dense(a)), layer.output.dense.weight, layer.output.dense.bias)
    return model, layer, a, s


def test_pfeiffer_is_seq_bn():
    _, layer, x, s = setup("pfeiffer")
    norm, adapter = layer.output.LayerNorm, layer.output.LayerNorm.adapterkit["a"]
    expected = ln(bottleneck(ln(s + x, norm), adapter, F.relu) + s + x, norm)
    torch.testing.assert_close(layer.feed_forward_chunk(x), expected, atol=1e-5, rtol=1e-5)


def test_houlsby_is_double_seq_bn():
    _, layer, x, s = setup("houlsby")
    adapter = layer.output.dense.adapterkit["a"]
    expected = ln(x + s + bottleneck(s, adapter, F.silu), layer.output.LayerNorm)
    torch.testing.assert_close(layer.feed_forward_chunk(x), expected, atol=1e-5, rtol=1e-5)
    attn = layer.attention.output
    h = torch.randn(2, 5, 32)
    s_attn = F.linear(h, attn.dense.weight, attn.dense.bias)
    expected = ln(x + s_attn + bottleneck(s_attn, attn.dense.adapterkit["a"], F.silu), attn.LayerNorm)
    torch.testing.assert_close(attn(h, x), expected, atol=1e-5, rtol=1e-5)


def test_parallel_is_par_bn():
    _, layer, x, s = setup("parallel")
    adapter = layer.output.dense.adapterkit["a"]
    assert adapter.bottleneck.scaling == 4.0 and adapter.bottleneck.adapter_down.out_features == 16
    expected = ln(x + s + bottleneck(x, adapter, F.relu), layer.output.LayerNorm)
    torch.testing.assert_close(layer.feed_forward_chunk(x), expected, atol=1e-5, rtol=1e-5)


def test_parallel_init_is_identity():
    model = make_model("bert", head=False)
    x = torch.randint(2, 100, (2, 5))
    base = model(x).last_hidden_state
    ak.add_adapter(model, "a", "parallel", activate=True)
    assert torch.equal(model(x).last_hidden_state, base)


def test_lora_on_linear():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "lora", r=4, alpha=16, activate=True)
    randomize_adapters(model)
    query = model.encoder.layer[1].attention.self.query
    lora = query.adapterkit["a"]
    x = torch.randn(3, 32)
    expected = F.linear(x, query.weight, query.bias) + (16 / 4) * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(query(x), expected, atol=1e-5, rtol=1e-5)
    assert lora.lora_A.shape == (4, 32) and lora.lora_B.shape == (32, 4)


def test_rslora_scaling_and_init():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "lora", r=4, alpha=8, use_rslora=True)
    lora = model.encoder.layer[0].attention.self.value.adapterkit["a"]
    assert lora.scaling == 8 / math.sqrt(4)
    assert torch.equal(lora.lora_B, torch.zeros(32, 4)) and lora.lora_A.abs().sum() > 0


def test_lora_on_gpt2_conv1d():
    model = make_model("gpt2", head=False)
    ak.add_adapter(model, "a", "lora", activate=True)
    randomize_adapters(model)
    c_attn = model.h[0].attn.c_attn
    lora = c_attn.adapterkit["a"]
    assert lora.lora_B.shape == (96, 8)  # one LoRA over fused q, k, v, as peft
    x = torch.randn(2, 4, 32)
    expected = x @ c_attn.weight + c_attn.bias + (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(c_attn(x), expected, atol=1e-5, rtol=1e-5)


def test_pfeiffer_on_pre_ln_gpt2_is_block_output_plus_adapter():
    model = make_model("gpt2", head=False)
    ak.add_adapter(model, "a", "pfeiffer", activate=True)
    randomize_adapters(model)
    block = model.h[0]
    h = torch.randn(2, 4, 32)
    with ak.disable_adapters(model):
        plain = block(h)
    expected = plain + bottleneck(plain, block.adapterkit["a"], F.relu)
    torch.testing.assert_close(block(h), expected, atol=1e-5, rtol=1e-5)


def test_houlsby_on_gpt2_projection():
    model = make_model("gpt2", head=False)
    ak.add_adapter(model, "a", "houlsby", bottleneck_size=8, activate=True)
    randomize_adapters(model)
    proj = model.h[1].mlp.c_proj
    h = torch.randn(2, 4, 128)
    s = h @ proj.weight + proj.bias
    torch.testing.assert_close(proj(h), s + bottleneck(s, proj.adapterkit["a"], F.silu), atol=1e-5, rtol=1e-5)
