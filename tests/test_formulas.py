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


def test_ia3_peft_convention():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "ia3", activate=True)
    randomize_adapters(model)
    layer = model.encoder.layer[0]
    key, out = layer.attention.self.key, layer.output.dense
    x = torch.randn(2, 5, 32)
    l_key = key.adapterkit["a"].ia3_l
    torch.testing.assert_close(key(x), F.linear(x, key.weight, key.bias) * l_key, atol=1e-6, rtol=1e-6)
    h = torch.randn(2, 5, 37)
    l_ff = out.adapterkit["a"].ia3_l
    assert l_ff.shape == (37,)  # the feed-forward *input* is scaled
    torch.testing.assert_close(out(h), F.linear(h * l_ff, out.weight, out.bias), atol=1e-6, rtol=1e-6)
    assert not hasattr(layer.intermediate.dense, "adapterkit")


def test_ia3_adapterhub_convention():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "ia3_adapterhub", activate=True)
    randomize_adapters(model)
    layer = model.encoder.layer[1]
    hidden = layer.intermediate.dense
    x = torch.randn(2, 5, 32)
    expected = F.linear(x, hidden.weight, hidden.bias) * hidden.adapterkit["a"].ia3_l  # before the activation
    torch.testing.assert_close(hidden(x), expected, atol=1e-6, rtol=1e-6)
    assert not hasattr(layer.output.dense, "adapterkit")
    assert sorted(n for n, _ in model.named_parameters() if ".adapterkit." in n)[:2] == [
        "encoder.layer.0.attention.self.key.adapterkit.a.ia3_l",
        "encoder.layer.0.attention.self.value.adapterkit.a.ia3_l",
    ]


def test_dora_is_peft_formula():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "dora", r=4, alpha=8, activate=True)
    query = model.encoder.layer[0].attention.self.query
    dora = query.adapterkit["a"]
    torch.testing.assert_close(dora.lora_magnitude, query.weight.norm(dim=1))  # identity at init
    randomize_adapters(model)
    x = torch.randn(3, 32)
    s = 8 / 4
    W, b, A, B, m = query.weight, query.bias, dora.lora_A, dora.lora_B, dora.lora_magnitude
    norm = (W + s * B @ A).norm(dim=1)
    base = x @ W.T
    expected = base + b + (m / norm - 1) * base + (m / norm) * (x @ A.T @ B.T) * s
    torch.testing.assert_close(query(x), expected, atol=1e-5, rtol=1e-5)
    merged = ((m / norm)[:, None] * (W + s * B @ A)).detach()
    ak.merge_adapter(model, "a")
    torch.testing.assert_close(query.weight.detach(), merged, atol=1e-6, rtol=1e-6)


def test_compacter_phm_weight_is_sum_of_kroneckers():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "compacter", activate=True)
    randomize_adapters(model)
    down = model.encoder.layer[0].output.dense.adapterkit["a"].bottleneck.adapter_down
    w = down.left @ down.right
    expected = sum(torch.kron(down.rule[i], w[i]) for i in range(4))
    torch.testing.assert_close(down.weight(), expected, atol=1e-6, rtol=1e-6)
    assert down.weight().shape == (32, 4)  # 32 // 32 = 1, rounded up to phm_dim
    other = model.encoder.layer[1].output.dense.adapterkit["a"].bottleneck.adapter_down
    up = model.encoder.layer[0].output.dense.adapterkit["a"].bottleneck.adapter_up
    assert other.rule is down.rule is up.rule  # one rule for the adapter, as AdapterHub
    assert sum(1 for n, _ in model.named_parameters() if n.endswith(".rule")) == 1


def test_lora_on_embedding_and_conv2d():
    model = make_model("vit", head=False)
    ak.add_adapter(model, "a", "lora", r=2, target_modules=["projection"], activate=True)
    randomize_adapters(model)
    conv = model.embeddings.patch_embeddings.projection
    lora = conv.adapterkit["a"]
    x = torch.randn(1, 3, 8, 8)
    delta = F.conv2d(F.conv2d(x, lora.lora_A.weight, stride=4), lora.lora_B.weight) * (8 / 2)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=4) + delta, atol=1e-5, rtol=1e-5)
    merged = F.conv2d(x, conv.weight + lora.delta_weight(conv), conv.bias, stride=4)
    torch.testing.assert_close(conv(x), merged, atol=1e-5, rtol=1e-5)

    bert = make_model("bert", head=False)
    ak.add_adapter(bert, "e", "lora", r=2, target_modules=["word_embeddings"], activate=True)
    randomize_adapters(bert)
    emb = bert.embeddings.word_embeddings
    lora = emb.adapterkit["e"]
    ids = torch.tensor([[3, 7, 9]])
    expected = emb.weight[ids] + lora.lora_embedding_A.T[ids] @ lora.lora_embedding_B.T * (8 / 2)
    torch.testing.assert_close(emb(ids), expected, atol=1e-6, rtol=1e-6)
    before = bert(ids).last_hidden_state
    ak.merge_adapter(bert, "e")
    torch.testing.assert_close(bert(ids).last_hidden_state, before, atol=1e-5, rtol=1e-5)
