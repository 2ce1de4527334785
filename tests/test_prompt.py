"""Prompt tuning: heads see the original sequence, padding, generate() with a KV cache, init."""

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


def with_prompt(arch, **overrides):
    model = make_model(arch)
    ak.add_adapter(model, "p", "prompt", prompt_length=3, activate=True, **overrides)
    randomize_adapters(model, std=1.0)
    return model


def test_bert_pooler_still_reads_cls_and_shapes_are_kept():
    model = with_prompt("bert")
    ids = torch.randint(2, 100, (2, 5))
    out = model.bert(ids)
    assert out.last_hidden_state.shape == (2, 5, 32)
    torch.testing.assert_close(out.pooler_output, model.bert.pooler(out.last_hidden_state), atol=0, rtol=0)
    with ak.disable_adapters(model):
        plain = model.bert(ids).last_hidden_state
    assert not torch.allclose(out.last_hidden_state[:, 0], plain[:, 0])  # [CLS] attends to the prompt


def test_bert_equals_encoder_over_prompt_then_embeddings():
    model = with_prompt("bert")
    bert = model.bert
    ids = torch.randint(2, 100, (1, 4))
    prompt = bert.embeddings.adapterkit["p"].prompt_embedding
    with ak.disable_adapters(model):  # positions 0..T-1 for the real tokens, as AdapterHub
        hidden = torch.cat([prompt[None], bert.embeddings(ids)], dim=1)
        for layer in bert.encoder.layer:
            hidden = layer(hidden)
    torch.testing.assert_close(bert(ids).last_hidden_state, hidden[:, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_encoder_padding(arch):
    assert_right_padding_ignored(with_prompt(arch))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_generate_with_kv_cache_equals_full_recompute(arch):
    assert_generate_matches_recompute(with_prompt(arch))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_left_padding(arch):
    assert_left_padding_ignored(with_prompt(arch))


def test_init_from_text_and_vocab():
    model = make_model("gpt2")

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 100 for c in text]}

    config = ak.PromptConfig.from_text(Tokenizer(), "ab", prompt_length=5)
    assert config.init_token_ids == (97, 98, 97, 98, 97)
    ak.add_adapter(model, "t", config)
    prompt = model.transformer.wte.adapterkit["t"].prompt_embedding
    torch.testing.assert_close(prompt, model.transformer.wte.weight[[97, 98, 97, 98, 97]])
    ak.add_adapter(model, "v", "prompt", init="vocab", prompt_length=4)
    rows = model.transformer.wte.adapterkit["v"].prompt_embedding
    assert all(any(torch.equal(r, w) for w in model.transformer.wte.weight) for r in rows)
    with pytest.raises(ak.ConfigError, match="init_token_ids"):
        ak.add_adapter(model, "x", "prompt", init="text")


def test_prompt_parameter_count():
    model = make_model("bert")
    ak.add_adapter(model, "p", "prompt")
    assert ak.summary(model).adapters[0].params == 10 * 32
