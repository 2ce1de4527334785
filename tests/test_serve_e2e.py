"""``adapterkit serve`` end to end: the real engine behind the HTTP layer, called with the ``openai``
client and ``curl``: greedy answers equal ``ak.generate`` in-process for the same adapter, and 8
concurrent requests for 8 different adapters each get their own adapter's answer."""

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import transformers as T

import adapterkit as ak
from adapterkit.serve.launch import Options, build

from serve_fakes import Running
from test_chat import chat_llama, tokenizer

QUESTIONS = ["what is two plus two ?", "what is three plus two ?", "what is four ?", "two plus three plus four ?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with a word-level chat tokenizer, and 8 LoRA adapters with random weights."""
    root = tmp_path_factory.mktemp("serve")
    model = chat_llama(eos_token_id=3)
    model.save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    for i in range(8):
        ak.add_adapter(model, f"a{i}", "lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".a{i}." in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.8)
        ak.save_adapter(model, f"a{i}", root / f"a{i}")
    return root, model


@pytest.fixture(scope="module")
def served(folder):
    root, _ = folder
    server = Running(build(str(root / "llama"), Options(adapters={f"a{i}": str(root / f"a{i}") for i in range(8)})))
    yield server
    server.stop()


def ask(server, model: str, question: str) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    return reply.choices[0].message.content


def in_process(model, adapter: str | None, question: str) -> str:
    ak.set_active(model, adapter)
    return ak.generate(model, tokenizer(), [question], max_tokens=6)[0]


def test_greedy_answers_equal_generate_in_process(served, folder):
    _, model = folder
    for adapter in [None, "a0", "a5"]:
        for question in QUESTIONS:
            assert ask(served, adapter or "llama", question) == in_process(model, adapter, question)


def test_eight_adapters_at_once_each_get_their_own_answer(served, folder):
    _, model = folder
    jobs = [(f"a{i}", QUESTIONS[i % len(QUESTIONS)]) for i in range(8)] * 2
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: ask(served, *job), jobs))
    expected = [in_process(model, adapter, question) for adapter, question in jobs]
    assert answers == expected
    assert len(set(expected)) > 3  # the adapters really answer differently


def test_curl_completes_and_streams(served, folder):
    _, model = folder
    body = {"model": "a2", "prompt": "what is two", "max_tokens": 4, "temperature": 0}
    curl = [shutil.which("curl"), "-sS", "-H", "Content-Type: application/json", f"{served.url}/v1/completions"]
    out = json.loads(subprocess.run([*curl, "-d", json.dumps(body)], capture_output=True, text=True, check=True).stdout)
    ak.set_active(model, "a2")
    assert out["choices"][0]["text"] == ak.generate(model, tokenizer(), ["what is two"], chat=False, max_tokens=4)[0]
    streamed = subprocess.run([*curl, "-N", "-d", json.dumps({**body, "stream": True})], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == out["choices"][0]["text"]


def test_a_config_without_architectures_is_served_by_its_type(folder, tmp_path):
    """A checkpoint converted from GGUF may name no architecture: a Llama is still a causal LM."""
    from adapterkit.serve.launch import load
    from adapterkit.serve.plumbing import CAUSAL, ENCODER

    root, _ = folder
    shutil.copytree(root / "llama", tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    config.pop("architectures", None)
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    assert load(str(tmp_path / "llama"))[2] == CAUSAL
    bert = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    T.BertModel(bert).save_pretrained(tmp_path / "bert")
    tokenizer().save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config.pop("architectures", None)
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    assert load(str(tmp_path / "bert"))[2] == ENCODER  # BERT has a causal-LM class too, but a masked-LM one


def test_a_bf16_base_serves_fp32_adapters_and_answers_as_in_process(folder):
    """``serve --dtype bf16``: the base's weights in bf16, the adapters as saved (fp32); greedy answers over
    HTTP equal ak.generate on the same bf16 model with the same adapter."""
    root, _ = folder
    app = build(str(root / "llama"), Options(adapters={"a0": str(root / "a0"), "a1": str(root / "a1")}, dtype="bf16"))
    engine = app.state.s.engine
    assert engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    server = Running(app)
    try:
        answers = {name: ask(server, name, QUESTIONS[0]) for name in ("llama", "a0", "a1")}
    finally:
        server.stop()
    reference = T.AutoModelForCausalLM.from_pretrained(root / "llama", dtype=torch.bfloat16).eval()
    for name in ("a0", "a1"):
        ak.load_adapter(reference, root / name, name)
    expected = {name: in_process(reference, None if name == "llama" else name, QUESTIONS[0]) for name in answers}
    assert answers == expected and len(set(answers.values())) > 1
