"""`adapterkit serve`'s HTTP layer against a fake engine (tests/serve_fakes.py) on a real uvicorn server:
the `openai` client (sync, async, streaming) and curl; hostile input; the API key; limits, 429, time
limits, disconnects; the adapter registry (first-use loads, LRU by count and bytes, broken adapters,
runtime admin); metrics; the encoder routes on a tiny BERT; the OpenAPI schema fuzzed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

import adapterkit as ak
from adapterkit.serve.app import create_app
from adapterkit.serve.plumbing import Limits, hash_key
from adapterkit.serve.registry import AdapterUnavailable, Bounds, Direct, Registry

from conftest import make_model
from serve_fakes import FakeEngine, Running, Sampling, words
from test_chat import tokenizer
from test_hub_client import FILES, Hostile

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_tokens=64, max_prompt_tokens=40, request_timeout=1.5, max_body_bytes=2**16)
PROMPT = "what is one plus two ?"


def lora(model, folder: Path, seed: int, r: int = 2) -> Path:
    """A LoRA with random weights saved to ``folder``."""
    ak.add_adapter(model, "task", "lora", r=r)
    torch.manual_seed(seed)
    with torch.no_grad():
        for value in ak.core.io.adapter_state_dict(model, "task").values():
            value.normal_()
    ak.save_adapter(model, "task", folder)
    ak.delete_adapter(model, "task")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, model = tmp_path_factory.mktemp("adapters"), make_model("llama")
    found = {name: lora(model, root / name, seed) for seed, name in enumerate(["a", "b", "c"])}
    found["big"] = lora(model, root / "big", 9, r=16)
    broken = lora(model, root / "broken", 5)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["config"]["r"] = 3  # the saved tensors have rank 2: they no longer fit
    (broken / "adapter_config.json").write_text(json.dumps(config))
    found["broken"] = broken
    return found


@pytest.fixture(scope="module")
def served(folders):
    engine = FakeEngine(make_model("llama"), max_context=80)
    sources = {n: str(folders[n]) for n in ("a", "b", "broken")}
    registry = Registry(engine, sources, Bounds(max_adapters=2))
    app = create_app(engine, tokenizer(), registry, name="tiny", limits=LIMITS, keys=frozenset([hash_key(KEY)]))
    server = Running(app)
    server.engine, server.registry = engine, registry
    yield server
    server.stop()
    assert engine.started and engine.stopped  # the lifespan: start, then stop(drain=True)


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, **kwargs)


def expected(text_or_messages, adapter: str | None, max_tokens: int, seed: int | None = None) -> str:
    tok = tokenizer()
    if isinstance(text_or_messages, str):
        ids = tok(text_or_messages)["input_ids"]
    else:
        text = tok.apply_chat_template(text_or_messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return " ".join(words(ids, adapter, Sampling(max_tokens=max_tokens, seed=seed)))


def inner(server, name: str) -> str:
    return server.registry.loaded[server.registry.sources[name]].inner


# -- the openai client ------------------------------------------------------------------------------
def test_openai_sync_completion_and_chat_pick_the_adapter(served):
    c = client(served)
    base = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    assert base.choices[0].text == expected(PROMPT, None, 5) and base.choices[0].finish_reason == "length"
    assert (base.usage.prompt_tokens, base.usage.completion_tokens, base.usage.total_tokens) == (6, 5, 11)
    tuned = c.completions.create(model="a", prompt=[PROMPT, "one"], max_tokens=3, seed=7)
    assert [ch.text for ch in tuned.choices] == [expected(p, inner(served, "a"), 3, 7) for p in (PROMPT, "one")]
    messages = [{"role": "user", "content": "what is one plus two ?"}]
    chat = c.chat.completions.create(model="b", messages=messages, max_tokens=4, stop=[".3"])
    whole = expected(messages, inner(served, "b"), 4)
    assert chat.choices[0].message.content == whole[: whole.index(".3")] if ".3" in whole else whole


def test_openai_streaming_and_async(served):
    c = client(served)
    chunks = list(c.completions.create(model="a", prompt=PROMPT, max_tokens=6, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected(PROMPT, inner(served, "a"), 6)
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "one plus one"}]
    events = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == expected(messages, None, 4)
    assert events[-1].usage.completion_tokens == 4 and events[-1].choices == []

    async def both():
        ac = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
        one, two = await asyncio.gather(
            ac.completions.create(model="a", prompt=PROMPT, max_tokens=3),
            ac.chat.completions.create(model="b", messages=messages, max_tokens=3),
        )
        streamed = [e async for e in await ac.completions.create(model="b", prompt="two", max_tokens=3, stream=True)]
        return one.choices[0].text, two.choices[0].message.content, "".join(e.choices[0].text for e in streamed)

    one, two, three = asyncio.run(both())
    assert one == expected(PROMPT, inner(served, "a"), 3)
    assert two == expected(messages, inner(served, "b"), 3)
    assert three == expected("two", inner(served, "b"), 3)


def test_models_lists_what_can_be_served_and_no_server_path(served, folders):
    """Listed: the base and the adapters, ``root`` their names (not the server's folders); an adapter whose
    files failed to load is left out until it is added again."""
    c = client(served)
    with pytest.raises(openai.BadRequestError, match="cannot be loaded"):
        c.completions.create(model="broken", prompt=PROMPT, max_tokens=2)
    listed = requests.get(f"{served.url}/v1/models", headers=AUTH, timeout=5).json()["data"]
    assert [m["id"] for m in listed] == ["tiny", "a", "b"] and all(m["root"] == m["id"] for m in listed)
    assert str(folders["a"]) not in json.dumps(listed)
    served.registry.add("broken", str(folders["broken"]))
    assert [m.id for m in c.models.list().data] == ["tiny", "a", "b", "broken"]


def test_metrics_and_the_schema_need_a_key_unless_the_operator_opens_them(served, folders):
    for path in ("/metrics", "/openapi.json"):
        refused = requests.get(f"{served.url}{path}", timeout=5)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{served.url}{path}", headers=AUTH, timeout=5).status_code == 200
    from fastapi.testclient import TestClient

    engine = FakeEngine(make_model("llama"))
    app = create_app(engine, tokenizer(), Registry(engine, {}, Bounds()), name="tiny", limits=LIMITS,
                     keys=frozenset([hash_key(KEY)]), public_metrics=True)  # fmt: skip
    with TestClient(app) as http:
        assert http.get("/metrics").status_code == 200 and http.get("/openapi.json").json()["paths"]
        assert http.get("/v1/models").status_code == 401  # only those two open


def test_names_never_read_as_hub_references(served, folders):
    """An admin name like hub:a/b@v1 would hide the adapter's real source behind a reference."""
    for name in ("hub:alice/x@v1", "a@v1", "x:y", "../up", " pad"):
        added = requests.post(f"{served.url}/admin/adapters", json={"name": name, "source": str(folders["c"])},
                              headers=AUTH, timeout=5)  # fmt: skip
        assert added.status_code == 400 and added.json()["error"]["param"] == "name", name
        with pytest.raises(AdapterUnavailable, match="cannot name an adapter"):
            served.registry.add(name, str(folders["c"]))
    assert "hub:alice/x@v1" not in served.registry.sources


def test_a_prompt_that_overflows_the_context_is_refused_up_front(served):
    """Prompt + max_tokens past the engine's context (80 here): 400 context_length_exceeded naming
    the prompt, before the adapter is loaded (broken's load failure never shows), never a silent cut."""
    c = client(served)
    with pytest.raises(openai.BadRequestError, match="asks for 60 more") as e:
        c.completions.create(model="broken", prompt="one " * 30, max_tokens=60)
    assert (e.value.code, e.value.body["param"]) == ("context_length_exceeded", "prompt")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": "one " * 30}], max_tokens=64)
    assert (e.value.code, e.value.body["param"]) == ("context_length_exceeded", "messages")
    assert c.completions.create(model="a", prompt="one " * 30, max_tokens=40).choices[0].finish_reason == "length"
    unasked = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "one " * 30}])
    assert unasked.usage.prompt_tokens + unasked.usage.completion_tokens == 80  # the rest of the context


def test_a_huge_prompt_is_refused_by_its_length_before_it_is_tokenized(served):
    tokenizers = served.app.state.s.tokenizers
    huge = "one " * 16_000  # 64 kB: far more characters than 40 tokens can spell
    assert tokenizers.surely_over(len(huge), LIMITS.max_prompt_tokens)
    borrowed = [tokenizers.free.get() for _ in range(4)]  # every copy lent: tokenizing would wait forever
    try:
        with pytest.raises(openai.BadRequestError, match="64000 characters") as e:
            client(served, timeout=10).completions.create(model="tiny", prompt=huge)
        assert e.value.code == "context_length_exceeded"
    finally:
        for tok in borrowed:
            tokenizers.free.put(tok)


def test_tokenizing_borrows_a_copy_so_one_slow_prompt_holds_no_other():
    from adapterkit.serve.tokenizers import Tokenizers

    pool, held, released = Tokenizers(tokenizer(), copies=2), threading.Event(), threading.Event()

    def slow() -> None:
        with pool.borrow():
            held.set()
            released.wait(10)

    worker = threading.Thread(target=slow)
    worker.start()
    held.wait(10)
    with pool.borrow() as tok:  # the other copy, at once
        assert tok(PROMPT)["input_ids"] == tokenizer()(PROMPT)["input_ids"]
    released.set()
    worker.join(10)
    assert not pool.surely_over(len(PROMPT), 40)


def test_openai_errors(served):
    c = client(served)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="allow-hub-refs"):
        c.completions.create(model="hub:alice/x@v1", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="at most 64") as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=65)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="at most 40"):
        c.completions.create(model="tiny", prompt="one " * 41)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    served.engine.capacity = 0
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full") as e:
            c.completions.create(model="tiny", prompt=PROMPT)
        assert e.value.response.headers["Retry-After"] == "1"
    finally:
        served.engine.capacity = 64


def test_a_broken_adapter_fails_its_own_requests_only(served):
    c = client(served)
    for _ in range(2):
        with pytest.raises(openai.BadRequestError, match="'.*broken' cannot be loaded"):
            c.completions.create(model="broken", prompt=PROMPT, max_tokens=2)
        assert c.completions.create(model="a", prompt=PROMPT, max_tokens=2).choices[0].text
    served.engine.failing.add(inner(served, "a"))  # the engine ends a's requests with an error
    try:
        with pytest.raises(openai.BadRequestError, match="adapter 'a' failed") as e:
            c.completions.create(model="a", prompt=PROMPT, max_tokens=4)
        assert e.value.code == "adapter_failed"  # its adapter's fault (a 4xx), not the server's
        body = {"model": "a", "prompt": PROMPT, "max_tokens": 4, "stream": True}
        auth = {"Authorization": f"Bearer {KEY}"}
        reply = requests.post(f"{served.url}/v1/completions", json=body, headers=auth, timeout=30)
        events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "adapter_failed"  # streamed: the same reason, as the last event
        assert c.completions.create(model="b", prompt=PROMPT, max_tokens=4).choices[0].finish_reason == "length"
    finally:
        served.engine.failing.clear()


# -- curl and raw sockets -------------------------------------------------------------------------
def curl(server, path: str, body: dict, *extra: str) -> str:
    cmd = ["curl", "-sS", "-N", f"{server.url}{path}", "-H", "Content-Type: application/json"]
    cmd += ["-H", f"Authorization: Bearer {KEY}", "-d", json.dumps(body), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def test_curl_completion_and_sse_stream(served):
    answer = json.loads(curl(served, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 3}))
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == expected(PROMPT, None, 3)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "one"}], "max_tokens": 3, "stream": True}
    lines = [line for line in curl(served, "/v1/chat/completions", body).splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == expected([{"role": "user", "content": "one"}], None, 3)


def raw(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head.encode() + data)
    return sock


def test_a_client_that_disconnects_cancels_its_generation(served):
    served.engine.delay = 0.05
    try:
        before = len(served.engine.cancels)
        sock = raw(served, {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "stream": True})
        assert b"data: " in sock.recv(4096) + sock.recv(4096)  # the stream has begun
        sock.close()
        deadline = time.time() + 5
        while len(served.engine.cancels) == before and time.time() < deadline:
            time.sleep(0.02)
        assert len(served.engine.cancels) == before + 1
        assert not served.engine.live()  # its slot is free
    finally:
        served.engine.delay = 0.001


def test_a_client_that_disconnects_before_a_whole_reply_cancels_its_generation(served, monkeypatch):
    state = served.server.config.app.state.s  # only the disconnect may cancel: no time limit in this test
    monkeypatch.setattr(state, "limits", dataclasses.replace(LIMITS, request_timeout=600))
    served.engine.delay = 0.2  # 60 words take 12 s
    try:
        before = len(served.engine.cancels)
        sock = raw(served, {"model": "tiny", "prompt": PROMPT, "max_tokens": 60})
        deadline = time.monotonic() + 5
        while not served.engine.live():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        closed = time.monotonic()
        while len(served.engine.cancels) == before and time.monotonic() < closed + 10:
            time.sleep(0.01)
        assert len(served.engine.cancels) == before + 1 and not served.engine.live()
        assert time.monotonic() - closed < 10  # long before the end of the 60 words (12 s)
    finally:
        served.engine.delay = 0.001


def test_the_time_limit_cancels_the_engine_stream(served):
    served.engine.delay = 0.5  # the 60 words would take 30 s
    try:
        before = len(served.engine.cancels)
        started = time.time()
        with pytest.raises(openai.APIStatusError, match="time limit") as e:
            client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=60)
        assert e.value.status_code == 504 and 1.4 < time.time() - started < 15
        assert len(served.engine.cancels) == before + 1 and not served.engine.live()
    finally:
        served.engine.delay = 0.001


# -- hostile input --------------------------------------------------------------------------------
def post(server, path: str, data: bytes | str, headers: dict | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    return requests.post(f"{server.url}{path}", data=data, headers=headers, timeout=30)


HOSTILE = [
    (b"{not json", 400, None),
    (b'{"model": "tiny", "prompt": "x"', 400, None),
    (b"[" * 100_000 + b"]" * 100_000, 413, None),
    (json.dumps({"model": "tiny", "prompt": 5}), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "3"}), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 1e9}), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 3}), 400, "logprobs"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 2}), 400, "n"),
    (json.dumps({"model": "tiny", "prompt": []}), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "seed": 2**64}), 400, "seed"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None),
    (b'{"model": "tiny", "prompt": "\\ud800"}', 400, "prompt"),  # a lone surrogate is no text
    (b'{"model": "tiny", "prompt": "a \\u0000 \\u202e b"}', 200, None),
    ('{"model": "tiny", "prompt": "caf\u00e9 \U0001f600 \u200d"}'.encode(), 200, None),
    (b'\xff\xfe{"model": "tiny"}', 400, None),
    (json.dumps({"model": "t" * 301, "prompt": "x"}), 400, "model"),
]


@pytest.mark.parametrize(("data", "status", "param"), HOSTILE)
def test_hostile_bodies_are_4xx_json_never_5xx(served, data, status, param):
    answer = post(served, "/v1/completions", data)
    assert answer.status_code == status, answer.text[:300]
    if status >= 400:
        error = answer.json()["error"]
        assert error["message"] and error["type"] and error.get("param") == param, error


def test_limits_on_the_body_and_the_key_come_before_reading(served):
    huge = b"x" * (2**16 + 1)
    assert post(served, "/v1/completions", huge).status_code == 413
    unauthorized = post(served, "/v1/completions", huge, {"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
    assert post(served, "/v1/embeddings", json.dumps({"model": "tiny", "input": "x"})).status_code == 400
    assert requests.get(f"{served.url}/nothing", timeout=5).json()["error"]["message"] == "Not Found"
    assert requests.get(f"{served.url}/health", timeout=5).json()["status"] == "ok"


def fuzz(operation, mode: GenerationMode) -> None:
    @settings(max_examples=10, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()


def test_openapi_schema_fuzzed_no_5xx(served):
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    for operation in operations:
        fuzz(operation, GenerationMode.POSITIVE)
        if operation.body:
            fuzz(operation, GenerationMode.NEGATIVE)


# -- the registry ---------------------------------------------------------------------------------
def test_registry_loads_on_first_use_and_evicts_idle_ones_by_count_and_bytes(folders):
    engine = FakeEngine(make_model("llama"))
    sources = {n: str(folders[n]) for n in ("a", "b", "c", "big")}
    registry = Registry(engine, sources, Bounds(max_adapters=2, max_bytes=10**9))
    events = []
    registry.on_event = events.append

    async def run():
        assert registry.resident() == {}  # nothing loads before it is asked for
        async with registry.use(sources["a"]) as a:
            busy = engine.submit([1, 2], a.inner, Sampling(max_tokens=50))  # a stays in use in the engine
        async with registry.use(sources["b"]):
            pass
        async with registry.use(sources["c"]):  # 3 > 2: the idle b goes, the busy a stays
            pass
        assert set(registry.resident()) == {sources["a"], sources["c"]}
        busy.cancel()
        sizes = registry.resident()
        registry.bounds = Bounds(max_adapters=10, max_bytes=sizes[sources["a"]] + sizes[sources["c"]] + 1)
        async with registry.use(sources["big"]):  # over the bytes: both small ones go, a first (least recent)
            assert list(registry.resident()) == [sources["big"]]
        return sizes

    sizes = asyncio.run(run())
    assert sizes[sources["a"]] == sizes[sources["c"]] > 0
    assert list(ak.list_adapters(engine.model)) == [registry.loaded[sources["big"]].inner]
    assert events == ["load", "load", "load", "eviction", "load", "eviction", "eviction"]


def test_admin_adds_replaces_and_removes_adapters_at_runtime(served, folders):
    def admin(method: str, path: str, body: dict | None = None, key: str = KEY) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.request(method, f"{served.url}{path}", json=body, headers=headers, timeout=30)

    c = client(served)
    assert admin("POST", "/admin/adapters", {"name": "new", "source": str(folders["c"])}, key="x").status_code == 401
    assert admin("POST", "/admin/adapters", {"name": "new", "source": "/no/such/folder"}).status_code == 400
    assert admin("POST", "/admin/adapters", {"name": "new", "source": str(folders["c"])}).status_code == 201
    first = c.completions.create(model="new", prompt=PROMPT, max_tokens=3).choices[0].text
    old = inner(served, "new")
    replaced = admin("POST", "/admin/adapters", {"name": "new", "source": str(folders["big"])})
    assert replaced.status_code == 201 and replaced.json()["replaced"]
    second = c.completions.create(model="new", prompt=PROMPT, max_tokens=3).choices[0].text
    assert first.startswith(old) and not second.startswith(old + ".")
    assert old not in ak.list_adapters(served.engine.model)  # the replaced one left once idle
    assert admin("DELETE", "/admin/adapters/new").json() == {"deleted": "new"}
    assert admin("DELETE", "/admin/adapters/new").status_code == 404
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="new", prompt=PROMPT)


def test_without_api_keys_the_admin_routes_are_closed(folders):
    """They load files from the server's disk: only a key holder may, never an anonymous caller."""
    from fastapi.testclient import TestClient

    engine = FakeEngine(make_model("llama"))
    app = create_app(engine, tokenizer(), Registry(engine, {}, Bounds()), name="tiny", limits=LIMITS, keys=frozenset())
    with TestClient(app) as http:
        added = http.post("/admin/adapters", json={"name": "x", "source": str(folders["a"])})
        assert added.status_code == 403 and "--api-key-file" in added.json()["error"]["message"]
        assert http.delete("/admin/adapters/x").status_code == 403
        assert http.get("/v1/models").status_code == 200  # the API itself is open without keys


def test_metrics_count_requests_tokens_and_adapter_loads(served):
    client(served).completions.create(model="a", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # a load failure of its own, whatever ran before
        client(served).completions.create(model="broken", prompt=PROMPT, max_tokens=2)
    text = requests.get(f"{served.url}/metrics", headers=AUTH, timeout=5).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['adapterkit_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values["adapterkit_completion_tokens_total"] >= 2 and values["adapterkit_prompt_tokens_total"] >= 6
    assert values['adapterkit_adapter_events_total{event="load"}'] >= 1
    assert values['adapterkit_adapter_events_total{event="load_failure"}'] >= 1
    assert values["adapterkit_time_to_first_token_seconds_count"] >= 1
    for name in ("adapterkit_queue_depth", "adapterkit_batch_size", "adapterkit_request_latency_seconds_count"):
        assert name in values


def stalling_hub() -> tuple[str, Callable[[], None]]:
    """A 'hub' that accepts connections and never answers; and the function that closes it."""
    listener, held, stop = socket.create_server(("127.0.0.1", 0), backlog=64), [], threading.Event()
    listener.settimeout(0.1)

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()

    return f"http://127.0.0.1:{listener.getsockname()[1]}", close


def test_stalled_hubs_hold_no_local_adapter_and_the_time_limit_covers_loading(folders):
    """8 hub references whose hub never answers: each answers 504 at the request's time limit (the deadline
    covers the load), and meanwhile the first use of a local adapter answers at once (hub downloads have a
    pool of their own; a local folder needs none). Failed references are forgotten."""
    hub, close = stalling_hub()
    engine = FakeEngine(make_model("llama"))
    registry = Registry(engine, {"a": str(folders["a"])}, Bounds(), hub)
    app = create_app(engine, tokenizer(), registry, name="tiny", limits=dataclasses.replace(LIMITS, request_timeout=3),
                     keys=frozenset([hash_key(KEY)]), allow_hub_refs=True)  # fmt: skip
    server = Running(app)
    try:
        c = client(server, timeout=30)
        with ThreadPoolExecutor(8) as pool:
            began = time.monotonic()
            ask = functools.partial(c.completions.create, prompt=PROMPT, max_tokens=2)
            stalled = [pool.submit(ask, model=f"hub:alice/x{i}") for i in range(8)]
            time.sleep(0.5)  # their downloads have started, and stall
            local = ask(model="a")
            local_took = time.monotonic() - began - 0.5
            errors = [f.exception(timeout=30) for f in stalled]
            stalled_took = time.monotonic() - began
        assert local.choices[0].text.startswith(registry.loaded[str(folders["a"])].inner) and local_took < 2.5
        assert all(isinstance(e, openai.APIStatusError) and e.status_code == 504 for e in errors), errors
        assert {e.code for e in errors} == {"timeout"} and stalled_took < 3 * 3
    finally:
        close()  # the stalled downloads fail now: their references are forgotten
        deadline = time.monotonic() + 20
        while registry.refs and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
    assert registry.refs == set() and registry.resident() == {str(folders["a"]): registry.resident()[str(folders["a"])]}


# -- encoders ---------------------------------------------------------------------------------------
def test_encoder_embeddings_and_classify_apply_the_adapter(tmp_path):
    model = make_model("bert")
    model.config.id2label = {0: "neg", 1: "pos"}
    ak.add_adapter(model, "task", "lora")
    torch.manual_seed(1)
    with torch.no_grad():
        for value in [*ak.core.io.adapter_state_dict(model, "task").values(), model.classifier.weight]:
            value.normal_()
    folder = ak.save_adapter(model, "task", tmp_path / "cls")
    tok = tokenizer()
    batch = tok(["one plus two", "two"], padding=True, return_tensors="pt")
    with torch.no_grad(), ak.core.adapters.use(model, "task"):
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    probs = out.logits.softmax(-1)
    ak.delete_adapter(model, "task")
    with torch.no_grad():
        model.classifier.weight.zero_()  # the served base has another head: the adapter brings its own

    runner = Direct(model)
    app = create_app(runner, tok, Registry(runner, {"cls": str(folder)}), name="enc", kind="encoder")
    server = Running(app)
    try:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        got = c.embeddings.create(model="cls", input=["one plus two", "two"])
        assert torch.allclose(torch.tensor([d.embedding for d in got.data]), want, atol=1e-5)
        answer = requests.post(f"{server.url}/v1/classify", json={"model": "cls", "input": ["one plus two", "two"]})
        rows = answer.json()["data"]
        assert [r["label"] for r in rows] == [["neg", "pos"][int(i)] for i in probs.argmax(-1)]
        assert torch.allclose(torch.tensor([[r["scores"]["neg"], r["scores"]["pos"]] for r in rows]), probs, atol=1e-5)
        base = requests.post(f"{server.url}/v1/classify", json={"model": "enc", "input": "two"}).json()["data"][0]
        assert base["scores"] == {"neg": 0.5, "pos": 0.5}  # the base's zero head, restored
        with pytest.raises(openai.BadRequestError, match="needs a causal LM"):
            c.completions.create(model="enc", prompt="two")
    finally:
        server.stop()


def test_registry_refuses_a_source_that_is_not_an_adapter(tmp_path):
    with pytest.raises(AdapterUnavailable, match="not an adapter"):
        Registry(FakeEngine(), {"x": str(tmp_path)})


def test_an_adapter_with_non_finite_weights_is_refused_when_it_loads(tmp_path):
    """NaN or inf weights would give empty or failing answers: the load fails with the reason, nothing stays."""
    model = make_model("llama")
    folder = lora(model, tmp_path / "nan", seed=1)
    ak.load_adapter(model, folder, "task2")
    weights = ak.core.io.adapter_state_dict(model, "task2")
    weights[next(iter(weights))].view(-1)[0] = float("inf")
    ak.save_adapter(model, "task2", folder)
    engine = FakeEngine(make_model("llama"))
    registry = Registry(engine, {"nan": str(folder)})

    async def load():
        async with registry.use(str(folder)):
            pass

    with pytest.raises(AdapterUnavailable, match="NaN or inf"):
        asyncio.run(load())
    assert not ak.list_adapters(engine.model) and registry.listed() == {}


def test_the_server_pulls_within_its_byte_bound_and_never_off_the_hubs_origin(tmp_path, monkeypatch):
    """A hostile hub: a revision over the operator's --max-adapter-mb is refused before a file is fetched; a
    redirect to another origin (e.g. the server's own loopback API) is refused without calling it."""
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    hub, elsewhere = Hostile(), Hostile()
    try:
        hub.serve("eve/big", FILES)
        hub.serve("eve/away", FILES)
        hub.routes["/api/adapters/eve/away"] = (302, {"Location": f"{elsewhere.url}/v1/models"}, b"")
        total = sum(map(len, FILES.values()))
        registry = Registry(FakeEngine(make_model("llama")), {}, Bounds(max_bytes=total - 1), hub.url)

        async def load(ref: str) -> None:
            async with registry.use(ref):
                pass

        with pytest.raises(AdapterUnavailable, match="over the limit"):
            asyncio.run(load("hub:eve/big"))
        assert not [path for path, _ in hub.seen if "/resolve/" in path]
        with pytest.raises(AdapterUnavailable, match="another origin"):
            asyncio.run(load("hub:eve/away"))
        assert elsewhere.seen == []
    finally:
        hub.close()
        elsewhere.close()
