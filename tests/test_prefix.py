"""Prefix tuning: the attention formula, masks, padding, generate() with a KV cache, baking."""

import math

import pytest
import torch

import adapterkit as ak

from conftest import (
    assert_generate_matches_recompute,
    assert_left_padding_ignored,
    assert_right_padding_ignored,
    make_model,
    randomize_adapters,
)


def with_prefix(arch, **overrides):
    model = make_model(arch)
    ak.add_adapter(model, "p", "prefix", prefix_length=3, bottleneck_size=8, activate=True, **overrides)
    randomize_adapters(model, std=0.5)
    return model


def test_attention_sees_prefix_keys_and_values():
    model = with_prefix("bert")
    attn = model.bert.encoder.layer[1].attention.self
    h = torch.randn(2, 5, 32)
    q, k, v = (m(h).view(2, 5, 4, 8).transpose(1, 2) for m in (attn.query, attn.key, attn.value))
    generator = attn.adapterkit["p"].generator
    pk, pv = generator.layer(1).chunk(2, dim=-1)  # (3, 32) each
    pk, pv = (t.view(3, 4, 8).transpose(0, 1).expand(2, -1, -1, -1) for t in (pk, pv))
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = (weights @ values).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(attn(h)[0], expected, atol=1e-5, rtol=1e-5)


def test_parameter_count_is_adapterhubs():
    model = make_model("bert")
    ak.add_adapter(model, "p", "prefix")  # P=30, bottleneck 512, L=2, H=32
    expected = 30 * 32 + (32 * 512 + 512) + (512 * 2 * 2 * 32 + 2 * 2 * 32)
    assert ak.summary(model).adapters[0].params == expected


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_encoder_padding_does_not_leak(arch):
    assert_right_padding_ignored(with_prefix(arch))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_generate_with_kv_cache_equals_full_recompute(arch):
    assert_generate_matches_recompute(with_prefix(arch))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_left_padding(arch):
    assert_left_padding_ignored(with_prefix(arch))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_positions_work_with_generate_and_padding(arch):
    assert_generate_matches_recompute(with_prefix(arch, shift_positions=True))
    assert_left_padding_ignored(with_prefix(arch, shift_positions=True))


def test_shift_positions_moves_real_tokens_by_the_prefix_length():
    model = with_prefix("gpt2", shift_positions=True)
    ids = torch.tensor([[5, 9, 13]])
    hidden = {}
    model.transformer.drop.register_forward_hook(lambda m, i, o: hidden.setdefault("emb", o))
    model(ids)
    expected = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(3, 6))
    torch.testing.assert_close(hidden["emb"], expected)


def test_prefix_changes_outputs_and_positions_are_unchanged():
    model = with_prefix("gpt2")
    ids = torch.tensor([[5, 9, 13]])
    hidden = {}
    model.transformer.drop.register_forward_hook(lambda m, i, o: hidden.setdefault("emb", o))
    with_adapter = model(ids).logits
    emb_with = hidden.pop("emb")
    with ak.disable_adapters(model):
        without = model(ids).logits
    assert torch.equal(hidden["emb"], emb_with)  # token + position embeddings: positions 0..T-1 either way
    assert not torch.allclose(with_adapter, without)


def test_bake_keeps_outputs_and_drops_the_mlp(tmp_path):
    model = with_prefix("bert")
    ids = torch.randint(2, 100, (2, 5))
    before = model(ids).logits
    ak.bake_adapter(model, "p")
    assert ak.list_adapters(model)["p"].flat is True
    names = [n for n, _ in model.named_parameters() if ".adapterkit.p." in n]
    assert len(names) == 1 and names[0].endswith("generator.prefix")
    torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-6)
    ak.save_adapter(model, "p", tmp_path / "p")
    fresh = make_model("bert")
    ak.load_adapter(fresh, tmp_path / "p", activate=True)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("preset", ["prefix", "compacter"])
def test_save_pretrained_with_shared_parameters(preset, tmp_path):
    model = make_model("bert")
    ak.add_adapter(model, "p", preset, activate=True)
    model.save_pretrained(tmp_path / "m")
    assert "adapterkit" not in (tmp_path / "m" / "config.json").read_text()
