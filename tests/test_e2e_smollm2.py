"""SmolLM2-135M-Instruct from its PyPI GGUF file: loads offline, answers through its chat template, and
takes every kind of adapter, deleted without a trace (a real Llama, not a tiny config)."""

import pytest
import torch
import transformers as T

import adapterkit as ak
from adapterkit.apps.models import smollm2

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def llm():
    path = smollm2()
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def answer(model, tokenizer, tokens: int = 12) -> str:
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_gguf_model_answers_through_its_chat_template(llm):
    model, tokenizer = llm
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert answer(model, tokenizer) == "The capital of France is Paris."


@pytest.mark.parametrize("preset", ["lora", "ia3", "prefix", "pfeiffer"])
def test_adapters_generate_and_delete_restores_the_model(llm, preset):
    model, tokenizer = llm
    before = (model.config.to_json_string(), model.config._attn_implementation, list(model.state_dict()))
    ak.add_adapter(model, "a", preset, activate=True)
    assert isinstance(answer(model, tokenizer, tokens=4), str)  # generation runs with the adapter (KV cache)
    if preset == "prefix":
        assert model.config._attn_implementation == "adapterkit_sdpa"
    ak.delete_adapter(model, "a")
    assert (model.config.to_json_string(), model.config._attn_implementation, list(model.state_dict())) == before
    assert answer(model, tokenizer) == "The capital of France is Paris."


def test_ak_generate_answers_and_stops(llm):
    model, tokenizer = llm
    question = QUESTION[0]["content"]
    assert ak.generate(model, tokenizer, [question], max_tokens=12) == ["The capital of France is Paris."]
    assert ak.generate(model, tokenizer, [question], max_tokens=12, stop=["Paris"]) == ["The capital of France is "]


PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Name a colour of the sky.",
    "How many legs does a spider have?",
    "Write the word 'cat' backwards.",
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("preset", ["lora", "dora", "ia3"])
def test_a_merged_adapter_generates_the_same_greedy_tokens(llm, preset):
    """Deployment: merging into the weights changes no greedy token on these prompts; unmerging restores."""
    from conftest import randomize_adapters

    model, tokenizer = llm
    base = ak.generate(model, tokenizer, PROMPTS, max_tokens=16)
    targets = {"target_modules": ALL_LINEAR} if preset != "ia3" else {}
    ak.add_adapter(model, "a", preset, activate=True, **targets)
    randomize_adapters(model, std=0.02 if preset != "ia3" else 0.05)
    if preset == "ia3":  # IA3 scales around 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapterkit." in name:
                    p.add_(1.0)
    unmerged = ak.generate(model, tokenizer, PROMPTS, max_tokens=16)
    ak.merge_adapter(model, "a")
    assert ak.generate(model, tokenizer, PROMPTS, max_tokens=16) == unmerged != base
    ak.unmerge_adapter(model, "a")
    ak.delete_adapter(model, "a")
    assert ak.generate(model, tokenizer, PROMPTS, max_tokens=16) == base
