"""ak.generate: left-padded batches, greedy and seeded sampling, stop strings, an adapter per prompt."""

import pytest

import adapterkit as ak

from conftest import randomize_adapters
from test_chat import chat_llama, tokenizer

PROMPTS = ["what is two plus two ?", "what is three ?"]


@pytest.fixture
def llama():
    return chat_llama(), tokenizer()


def test_greedy_is_deterministic_and_sampling_is_seeded(llama):
    model, tok = llama
    greedy = ak.generate(model, tok, PROMPTS, max_tokens=6)
    assert greedy == ak.generate(model, tok, PROMPTS, max_tokens=6) and all(isinstance(t, str) for t in greedy)
    sampled = [ak.generate(model, tok, PROMPTS, max_tokens=6, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    assert len({tuple(s) for s in sampled}) >= 1 and len(tok(sampled[0][0])["input_ids"]) <= 6


def test_an_adapter_per_prompt_equals_each_adapter_on_the_same_batch(llama):
    model, tok = llama
    ak.add_adapter(model, "a", "lora")
    ak.add_adapter(model, "b", "ia3")
    randomize_adapters(model, std=1.0)
    prompts = [*PROMPTS, PROMPTS[0]]
    alone = {}
    for name in ("a", "b", None):
        ak.set_active(model, name)
        alone[name] = ak.generate(model, tok, prompts, max_tokens=5)
    ak.set_active(model, None)
    mixed = ak.generate(model, tok, prompts, max_tokens=5, per_prompt=["a", None, "b"])
    assert mixed == [alone["a"][0], alone[None][1], alone["b"][2]]
    assert alone["a"] != alone[None] or alone["b"] != alone[None]  # the adapters do change the answers


def test_stop_strings_and_bad_options(llama):
    model, tok = llama
    full = ak.generate(model, tok, PROMPTS[:1], max_tokens=8, chat=False)[0]
    words = full.split()
    if len(words) > 1:
        assert (
            ak.generate(model, tok, PROMPTS[:1], max_tokens=8, chat=False, stop=[words[1]])[0]
            == full[: full.index(words[1])]
        )
    with pytest.raises(ak.AdapterError, match="max_tokens"):
        ak.generate(model, tok, PROMPTS, max_tokens=0)
    with pytest.raises(ak.AdapterError, match="per_prompt names 1 adapters for 2 prompts"):
        ak.generate(model, tok, PROMPTS, per_prompt=["a"])


def test_shown_upto_holds_back_only_what_may_become_a_stop_string():
    from adapterkit.core.generation import shown_upto

    assert shown_upto("hello wor", ["world!"]) == (6, False)  # "wor" may grow into "world!"
    assert shown_upto("hello wor", ["world!"], final=True) == (9, False)
    assert shown_upto("a. b\nEND c", ["\n", "END"]) == (4, True)  # the first stop string ends it
    assert shown_upto("abc", []) == (3, False)
    assert shown_upto("xx<", ["<|end|>", "<<"]) == (2, False)
