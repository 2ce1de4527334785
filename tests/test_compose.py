"""`ak.compose`: mixing weights over LoRA adapters for a new task from a few examples (LoraHub), on a
tiny random Llama whose "new task" is what a known mixture of its adapters answers."""

import itertools

import numpy as np
import pytest
import torch

import adapterkit as ak
from adapterkit.core.compose import IGNORE, ComposeConfig, encode, encode_batch, mean_loss
from adapterkit.core.io import load_adapter
from adapterkit.errors import AdapterError, ConfigError

from conftest import randomize_adapters
from test_chat import chat_llama, tokenizer

NUMS = ["two", "three", "four", "five", "six"]
PROMPTS = [f"what is {a} plus {b} ?" for a, b in itertools.product(NUMS, NUMS)]
TRUTH = [0.7, 0.3, 0.0]  # the new task: the greedy answers of this mix of a, b, c


def model_with_loras(rank: int = 4):
    """A tiny Llama with sharp enough logits (init 0.2) and three random LoRAs a, b, c."""
    model = chat_llama(initializer_range=0.2)
    for name in "abc":
        ak.add_adapter(model, name, "lora", r=rank)
    randomize_adapters(model, std=1.0)
    return model


def task(model, tok) -> list[dict]:
    """25 pre-tokenized examples: each prompt and the mixture's 3 greedy tokens (the only labels)."""
    ak.combine_adapters(model, ["a", "b", "c"], "truth", weights=TRUTH, method="svd")
    rows = []
    with ak.use(model, "truth"), torch.no_grad():
        for prompt in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = list(ids["input_ids"])
            out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0].tolist()  # fmt: skip
            rows.append({"input_ids": out, "labels": [IGNORE] * len(ids) + out[len(ids) :]})
    ak.delete_adapter(model, "truth")  # compose must find the mix, not be handed it
    return rows


def batch_loss(model, tok, examples, setup) -> float:
    with ak.use(model, setup):
        return mean_loss(model, encode_batch(tok, examples, True, torch.device("cpu")))


def test_compose_beats_the_base_and_every_single_adapter_on_held_out_examples():
    model, tok = model_with_loras(), tokenizer()
    examples = task(model, tok)
    train, held = examples[:10], examples[10:]
    result = ak.compose(model, tok, ["a", "b", "c"], train, budget=40, seed=0)
    assert result.name == "composed" and "composed" in ak.list_adapters(model)
    assert result.evaluations <= 40 and result.loss_after < result.loss_before - 0.5
    held_out = {s: batch_loss(model, tok, held, s) for s in [None, "a", "b", "c", "composed"]}
    assert held_out["composed"] < min(held_out[s] for s in [None, "a", "b", "c"]) - 0.2, held_out
    assert result.weights[0] > result.weights[2] and result.weights[1] > result.weights[2]  # a and b carry the task


def test_one_seed_one_result_and_numpy_random_state_is_kept():
    results = []
    for _ in range(2):
        model, tok = model_with_loras(), tokenizer()
        examples = task(model, tok)[:10]
        np.random.seed(123)
        results.append(ak.compose(model, tok, ["a", "b", "c"], examples, budget=20, seed=3))
        assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # cma seeded a copy
    assert results[0] == results[1]


def test_the_saved_adapter_reloads_with_equal_outputs(tmp_path):
    model, tok = model_with_loras(), tokenizer()
    examples = task(model, tok)[:10]
    result = ak.compose(model, tok, ["a", "b", "c"], examples, name="sums", budget=14, path=tmp_path / "sums")
    assert result.path == str(tmp_path / "sums")
    fresh = chat_llama(initializer_range=0.2)
    load_adapter(fresh, tmp_path / "sums")
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad(), ak.use(model, "sums"):
        expected = model(input_ids=ids).logits
    with torch.no_grad(), ak.use(fresh, "sums"):
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected)
    assert batch_loss(fresh, tok, examples, "sums") == pytest.approx(result.loss_after, abs=1e-5)


def test_pairs_and_conversations_encode_the_answer_only():
    tok = tokenizer()
    question = "what is two plus two ?"
    pair = encode(tok, (question, "four"))
    assert pair == encode(tok, [{"role": "user", "content": question}, {"role": "assistant", "content": "four"}])
    assert answer_tokens(tok, pair) == ["four", "<|im_end|>"]  # the template's end of turn is learned too
    assert answer_tokens(tok, encode(tok, (question, "four"), chat=False)) == ["four"]


def answer_tokens(tok, row: dict) -> list[str]:
    return tok.convert_ids_to_tokens([t for t, lb in zip(row["input_ids"], row["labels"], strict=True) if lb != IGNORE])


def test_pairs_compose_through_the_chat_template():
    model, tok = model_with_loras(), tokenizer()
    pairs = [(p, "six") for p in PROMPTS[:6]]
    result = ak.compose(model, tok, ["a", "b", "c"], pairs, budget=14)
    assert result.loss_after <= result.loss_before


def test_bad_inputs_raise_clear_errors():
    model, tok = model_with_loras(), tokenizer()
    pairs = [(p, "six") for p in PROMPTS[:5]]
    with pytest.raises(AdapterError, match="non-empty list of examples"):
        ak.compose(model, tok, ["a", "b"], [])
    with pytest.raises(AdapterError, match="no adapter named 'zzz'"):
        ak.compose(model, tok, ["a", "zzz"], pairs)
    with pytest.raises(AdapterError, match="at least two different adapters"):
        ak.compose(model, tok, ["a"], pairs)
    with pytest.raises(ConfigError, match="already exists"):
        ak.compose(model, tok, ["a", "b"], pairs, name="c")
    with pytest.raises(AdapterError, match="at least one answer token"):
        ak.compose(model, tok, ["a", "b"], [{"input_ids": [4, 5], "labels": [IGNORE, IGNORE]}])
    with pytest.raises(ConfigError, match="budget >= 1"):
        ak.compose(model, tok, ["a", "b"], pairs, budget=0)
    ak.add_adapter(model, "wide", "lora", r=8)
    with pytest.raises(ConfigError, match="one rank and one set of targets"):
        ak.compose(model, tok, ["a", "wide"], pairs)
    ak.add_adapter(model, "bottle", "pfeiffer")
    with pytest.raises(AdapterError, match="compose mixes LoRA adapters.*'bottle': 'bottleneck'"):
        ak.compose(model, tok, ["a", "bottle"], pairs)
    assert set(ak.list_adapters(model)) == {"a", "b", "c", "wide", "bottle"}  # nothing was left behind


def test_config_is_validated():
    with pytest.raises(ConfigError, match="sigma"):
        ComposeConfig(sigma=2.0)
