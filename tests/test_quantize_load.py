"""Quantizing a base that transformers loaded lazily (a memory-mapped safetensors checkpoint): each Linear
weight is read from the file alone (pread), quantized and dropped, so at most one fp32 Linear weight is in
memory at a time and nothing keeps the mapping (the whole fp32 checkpoint) resident afterwards. The result
equals quantizing a model held in memory bit for bit, keeps the fp32 fingerprint, the tied embedding and
the rotary buffers; and the int8 layers' backward keeps no dequantized fp32 weight from forward."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from test_quantize import CONFIG, TOLERANCE, ids, relative_error

import adapterkit as ak
from adapterkit.core import quantize as q
from adapterkit.core.backbone import fingerprint
from adapterkit.core.pretrained import clean_mappings, file_place

TIED = dict(CONFIG, tie_word_embeddings=True)  # SmolLM2's lm_head is its embedding matrix


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    T.LlamaForCausalLM(T.LlamaConfig(**TIED)).save_pretrained(folder)
    return folder


def lazy(folder) -> T.LlamaForCausalLM:
    """As ``adapterkit train`` loads it: transformers' views of the mapped checkpoint file."""
    return T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def in_memory(folder) -> T.LlamaForCausalLM:
    """The same model with every tensor copied into ordinary memory: the path before layer-by-layer reading."""
    model = copy.deepcopy(lazy(folder))
    assert q._file_places(model) == {}
    return model


def plain_linears(model) -> list[str]:
    """The backbone's Linear layers whose weight is a plain fp32 tensor in memory (read, not yet quantized)."""
    mappings = clean_mappings()
    return [
        name
        for name, m in model.model.named_modules()
        if isinstance(m, torch.nn.Linear) and not q.is_quantized(m) and file_place(m.weight, mappings) is None
    ]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_reading_layer_by_layer_equals_quantizing_in_memory(checkpoint, bits):
    model, ref = lazy(checkpoint), in_memory(checkpoint)
    tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}
    found = q._file_places(model)
    assert found and len(found) == len(list(model.parameters()))  # every weight was a view of the file
    assert found.keys() <= tensors
    q.quantize_base(model, bits)
    q.quantize_base(ref, bits)
    assert q._file_places(model) == {}  # nothing holds the mapping any more
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, ref(ids()).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, and fp32
    assert model.lm_head.weight.dtype == torch.float32 and not q.is_quantized(model.lm_head)
    fresh = T.LlamaForCausalLM(T.LlamaConfig(**TIED)).model.rotary_emb.inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh)


def test_at_most_one_fp32_linear_weight_is_in_memory(checkpoint, monkeypatch):
    model = lazy(checkpoint)
    seen = []
    original = q._quantize_int8

    def counting(module, ao):
        seen.append(len(plain_linears(model)))  # this one, read just now, and no other
        original(module, ao)

    monkeypatch.setattr(q, "_quantize_int8", counting)
    report = q.quantize_base(model, "int8")
    assert len(seen) == len(report.quantized) == 7 * CONFIG["num_hidden_layers"]
    assert set(seen) == {1}
    assert plain_linears(model) == []  # lm_head is outside model.model; all the backbone's are int8


def test_the_fingerprint_is_the_fp32_models_and_adapters_move(checkpoint, tmp_path):
    model, fp32 = lazy(checkpoint), lazy(checkpoint)
    expected = fingerprint(fp32)
    q.quantize_base(model, "int8")
    assert fingerprint(model) == expected
    torch.manual_seed(0)
    ak.add_adapter(model, "a", "lora", r=4)
    ak.train_adapter(model, "a", train_head=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        model(ids(), labels=ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    ak.save_adapter(model, "a", tmp_path / "a")
    ak.load_adapter(fp32, tmp_path / "a", activate=True)
    with torch.no_grad():
        out, ref, plain = model(ids()).logits, fp32(ids()).logits, lazy(checkpoint)(ids()).logits
    assert relative_error(out, ref) < TOLERANCE["int8"]
    assert relative_error(ref, plain) > 2 * relative_error(out, ref)  # the adapter trained, and it moved


def int8_layer(bias: bool = True) -> q.Int8Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 128, bias=bias)
    q.quantize_base(torch.nn.Sequential(layer), "int8")
    assert isinstance(layer, q.Int8Linear)
    return layer


def saved_sizes(fn) -> list[int]:
    """The element counts of the tensors autograd keeps for backward while ``fn()`` runs forward."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("autocast", [False, True])
def test_int8_backward_equals_torchaos_without_an_fp32_copy(autocast):
    layer = int8_layer()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
        ref = F.linear(y, layer.weight, layer.bias)  # torchao's own autograd
        assert 64 * 128 in saved_sizes(lambda: F.linear(y, layer.weight, layer.bias))  # the dequantized copy
        assert 64 * 128 not in saved_sizes(lambda: layer(x))
    assert torch.equal(out, ref)
    (out.float() ** 2).sum().backward()
    (ref.float() ** 2).sum().backward()
    # fp32: the same dy W; under autocast torchao keeps W in bf16 from forward, here it is cast in backward
    assert torch.allclose(x.grad, y.grad, rtol=0 if not autocast else 2e-2, atol=1e-6 if not autocast else 2e-2)
    assert x.grad.abs().max() > 0.1


def test_a_trained_bias_on_an_int8_layer_gets_its_gradient():
    layer = int8_layer()
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 64)
    (layer(x) ** 2).sum().backward()
    expected = 2 * F.linear(x, q.dense_weight(layer), layer.bias.detach()).sum(0)
    assert torch.allclose(layer.bias.grad, expected, rtol=1e-5, atol=1e-5)
