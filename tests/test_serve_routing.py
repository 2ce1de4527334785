"""`adapterkit serve --router auto=DIR`: the server picks each request's adapter from its text. A tiny Llama
over test_routing's word vocabulary; two LoRAs (random weights) whose signatures come from two disjoint
word ranges; general inputs from a third range go to the base model. The real engine, uvicorn and the
`openai` client: the reply names the choice and its tokens equal a request naming that adapter."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch

import adapterkit as ak
from adapterkit.errors import AdapterError
from adapterkit.serve.launch import Options, build

from serve_fakes import Running
from test_routing import EXAMPLES, llama, texts, tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The base model's folder and one folder per adapter (weights and routing signature) under ``adapters/``."""
    root = tmp_path_factory.mktemp("routed")
    model, tok = llama(), tokenizer()
    model.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    for seed, name in enumerate(["a", "b"]):
        ak.add_adapter(model, name, "lora", r=4)
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if f".{name}." in param_name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
        ak.save_adapter(model, name, root / "adapters" / name)
        ak.save_signature(root / "adapters" / name, ak.signature(model, tok, EXAMPLES[name]))
    return root


@pytest.fixture(scope="module")
def served(root):
    server = Running(build(str(root / "llama"), Options(router=f"auto={root / 'adapters'}")))
    yield server
    server.stop()


def ask(server, model: str, text: str) -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0
    )
    return reply.model, reply.choices[0].message.content


CASES = [(t, "a") for t in texts("a", 3, 11)] + [(t, "b") for t in texts("b", 3, 12)]
CASES += [(t, None) for t in texts(None, 3, 13)]


def test_auto_names_the_adapter_it_chose_and_answers_as_that_adapter(served):
    for text, task in CASES:
        model, answer = ask(served, "auto", text)
        assert model == (task or "llama")
        assert answer == ask(served, model, text)[1]  # the same tokens as a request naming it
    assert len({ask(served, m, CASES[0][0])[1] for m in ("a", "b", "llama")}) == 3  # the adapters do differ


def test_routed_requests_batch_with_the_others_and_keep_their_tokens(served):
    alone = {(text, m): ask(served, m, text) for text, _ in CASES for m in ("auto", "a")}
    with ThreadPoolExecutor(8) as pool:
        together = dict(zip(alone, pool.map(lambda key: ask(served, key[1], key[0]), alone), strict=True))
    assert together == alone


def test_metrics_count_the_decisions_and_models_list_auto(served):
    before = _decisions(served)
    for text, _ in CASES:
        ask(served, "auto", text)
    after = _decisions(served)
    assert {k: after[k] - before.get(k, 0) for k in after} == {"a": 3, "b": 3, "(base)": 3}
    listed = [m["id"] for m in requests.get(f"{served.url}/v1/models", timeout=10).json()["data"]]
    assert listed == ["llama", "a", "b", "auto"]


def _decisions(server) -> dict[str, float]:
    found = {}
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("adapterkit_routing_decisions_total{"):
            label, value = line.split('adapter="')[1].split('"}')
            found[label] = float(value)
    return found


def test_auto_takes_one_prompt_a_request(served):
    body = {"model": "auto", "prompt": [EXAMPLES["a"][0], EXAMPLES["b"][0]], "max_tokens": 2}
    reply = requests.post(f"{served.url}/v1/completions", json=body, timeout=10)
    assert reply.status_code == 400 and "one prompt per request" in reply.json()["error"]["message"]
    one = requests.post(f"{served.url}/v1/completions", json={**body, "prompt": EXAMPLES["b"][0]}, timeout=10)
    assert one.status_code == 200 and one.json()["model"] == "b"


def test_router_folders_need_signatures_and_distinct_names(root, tmp_path):
    (tmp_path / "a").mkdir()
    for file in (root / "adapters" / "a").iterdir():
        if not file.name.startswith("routing."):
            (tmp_path / "a" / file.name).write_bytes(file.read_bytes())
    with pytest.raises(AdapterError, match="no routing signature"):
        build(str(root / "llama"), Options(router=f"auto={tmp_path / 'a'}"))
    folders = f"{root / 'adapters' / 'a'},{root / 'adapters' / 'a'}"
    with pytest.raises(AdapterError, match="two folders hold an adapter named 'a'"):
        build(str(root / "llama"), Options(router=f"auto={folders}"))
    with pytest.raises(AdapterError, match="NAME=DIR"):
        build(str(root / "llama"), Options(router=str(root / "adapters")))
    with pytest.raises(AdapterError, match="an adapter is served under that name"):
        build(str(root / "llama"), Options(adapters={"auto": str(root / "adapters" / "a")}, router="auto=x"))
    assert json.loads((root / "adapters" / "a" / "routing.json").read_text())["layer"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"model": "auto", "messages": [{"role": "user", "content": 7}]},
        {"model": "auto", "messages": []},
        {"model": "auto", "messages": [{"role": "user", "content": "w1 " * 5000}]},
        {"model": "auto", "messages": [{"role": "user", "content": "w1"}], "max_tokens": -1},
        {"model": "auto", "prompt": [], "max_tokens": 2},
    ],
)
def test_hostile_bodies_for_auto_are_4xx_json_and_route_nothing(served, body):
    before = _decisions(served)
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    reply = requests.post(f"{served.url}{path}", json=body, timeout=10)
    assert 400 <= reply.status_code < 500 and reply.json()["error"]["message"]
    assert _decisions(served) == before  # refused before the router ran
