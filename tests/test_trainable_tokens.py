"""Trainable tokens: only the named tokens' embeddings change (and, where the output layer is tied to the
embedding, their logits), they train, merge, save in peft's layout with the tied copy peft writes, and go
without a trace. (peft's own loading: rows of test_formats.WRITABLE, so of test_peer_roundtrip.)"""

import json

import pytest
import torch
from fixtures.make_peer_fixtures import base_model, inputs
from safetensors.torch import load_file

import adapterkit as ak

from test_removal import anatomy

TOKENS = [43, 106, 11]  # tokens of the test inputs


def adapted(kind: str):
    model = base_model(kind)
    ak.add_adapter(model, "t", "trainable_tokens", token_indices=TOKENS, activate=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapterkit.t." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    return model


def output(model):
    with torch.no_grad():
        out = model(**inputs())
    return out.logits if "logits" in out else out.last_hidden_state


def test_only_the_named_tokens_change_and_tied_logits_follow():
    model, fresh = adapted("gpt2-lm"), base_model("gpt2-lm")
    rows = next(p for n, p in model.named_parameters() if n.endswith("trainable_tokens_delta"))
    expected = base_model("gpt2-lm")
    with torch.no_grad():  # the reference: the rows written into the (tied) weight
        expected.transformer.wte.weight[TOKENS] = rows
    torch.testing.assert_close(output(model), output(expected), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[1, 2, 4, 6]])  # none of the tokens: hidden states as the base model's
    with torch.no_grad():
        same = model.transformer(input_ids=ids).last_hidden_state
        base = fresh.transformer(input_ids=ids).last_hidden_state
    torch.testing.assert_close(same, base, atol=0, rtol=0)


def test_gradient_reaches_the_rows_only():
    model = adapted("bert")
    ak.train_adapter(model, "t")
    output_with_grad = model(**inputs()).last_hidden_state
    output_with_grad.pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"embeddings.word_embeddings.adapterkit.t.trainable_tokens_delta"}


def test_merge_and_delete_without_a_trace():
    model, fresh = adapted("gpt2-lm"), base_model("gpt2-lm")
    expected, clean = output(model), anatomy(fresh)
    ak.merge_adapter(model, "t")
    torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=1e-5)
    ak.unmerge_adapter(model, "t")
    ak.delete_adapter(model, "t")
    assert anatomy(model) == clean
    torch.testing.assert_close(output(model), output(fresh), atol=0, rtol=0)


def test_per_row_and_peft_layout_with_the_tied_copy(tmp_path):
    model = adapted("gpt2-lm")
    ak.add_adapter(model, "u", "trainable_tokens", token_indices=[7])
    alone = output(model)
    ak.set_active(model, ak.PerRow(["t", "u"]))
    torch.testing.assert_close(output(model)[0], alone[0], atol=1e-6, rtol=0)
    ak.save_adapter(model, "t", tmp_path / "peft", format="peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{m}.trainable_tokens_delta" for m in ("transformer.wte", "lm_head")}
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["token_indices"] == TOKENS


def test_special_tokens_by_default_and_bad_ids_named():
    model = base_model("bert")  # BERT's config names its padding token, 0
    ak.add_adapter(model, "s", "trainable_tokens")
    assert [p.shape[0] for n, p in model.named_parameters() if ".adapterkit.s." in n] == [1]
    with pytest.raises(ak.ConfigError, match="vocabulary"):
        ak.add_adapter(base_model("bert"), "x", "trainable_tokens", token_indices=[10_000])
    with pytest.raises(ak.ConfigError, match="twice"):
        ak.methods.TrainableTokensConfig(token_indices=(3, 3))
