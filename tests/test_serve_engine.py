"""The serving engine: continuous batching, an adapter per row, per-sequence KV caches, and answers that do
not depend on who else is in the batch (bit for bit: tokens and log-probabilities)."""

import asyncio
import threading
import time

import pytest
import torch
import transformers as T

import adapterkit as ak
from adapterkit.core.methods.lora import LoRA
from adapterkit.core.state import adapter_modules
from adapterkit.serve.engine import ContextExceeded, Engine, QueueFull, Sampling, TextDeltas

from conftest import randomize_adapters
from test_chat import WORDS, chat_llama, tokenizer

KINDS = {  # adapter name -> method (and options): every family, two LoRA ranks
    "lora": ("lora", {"r": 4}),
    "lora8": ("lora", {"r": 8}),
    "ia3": ("ia3", {}),
    "pfeiffer": ("pfeiffer", {}),
    "houlsby": ("houlsby", {"reduction_factor": 4}),
    "prefix": ("prefix", {"prefix_length": 3, "flat": True}),
    "prompt": ("prompt", {"prompt_length": 2}),
}


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    return [torch.randint(4, len(WORDS), (length,), generator=g).tolist() for length in lengths]


@pytest.fixture
def llama():
    """A tiny Llama over the chat words with every adapter family; no end token, so lengths are known."""
    model = chat_llama(eos_token_id=None)
    for name, (method, options) in KINDS.items():
        ak.add_adapter(model, name, method, **options)
    randomize_adapters(model, std=1.0)
    tok = tokenizer()
    tok.eos_token = None
    return model, tok


@pytest.fixture
def engine(llama):
    engines = []

    def make(**options) -> Engine:
        engines.append(Engine(*llama, **{"max_batch": 4, **options}))
        engines[-1].start()
        return engines[-1]

    yield make
    for e in engines:
        e.stop(drain=False)


def serve(engine: Engine, prompt, adapter, **sampling):
    stream = engine.submit(prompt, adapter, Sampling(**{"max_tokens": 8, **sampling}))
    text, last = stream.result()
    return stream.tokens, stream.logprobs, text, last


def first_chunk(stream):
    return next(iter(stream))


def assert_tokens_equal_generate(model, work, served, device="cpu"):
    """Each ``(prompt, adapter)``'s served greedy tokens equal transformers' ``generate`` with that adapter."""
    for (prompt, adapter), (tokens, _) in zip(work, served, strict=True):
        ak.set_active(model, adapter)
        with torch.no_grad():
            reference = model.generate(torch.tensor([prompt], device=device), max_new_tokens=len(tokens),
                                       do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        ak.set_active(model, None)
        assert reference[0, len(prompt) :].tolist() == tokens, adapter


def test_mixed_load_equals_each_request_alone_bit_for_bit(llama, engine):
    """Requests of every adapter family and none, prompts of different lengths, arriving while others run
    (4 slots, so some wait): tokens and log-probabilities equal the request served alone; and alone, each
    equals transformers' generate with that adapter active."""
    model, _ = llama
    e = engine()
    names = [*KINDS, None, "lora", "prefix", None]
    work = list(zip(prompts(len(names)), names, strict=True))
    streams = [e.submit(p, a, Sampling(max_tokens=4 + 3 * i % 9)) for i, (p, a) in enumerate(work[:5])]
    first_chunk(streams[0])  # the rest arrive while the first ones decode
    streams += [e.submit(p, a, Sampling(max_tokens=4 + 3 * i % 9)) for i, (p, a) in enumerate(work[5:], 5)]
    mixed = [(s.result()[1].finish_reason, s.tokens, s.logprobs) for s in streams]
    assert e.stats()["steps"] < e.stats()["tokens_generated"] - len(work)  # steps held several sequences
    for i, (prompt, adapter) in enumerate(work):
        tokens, logprobs, _, last = serve(e, prompt, adapter, max_tokens=4 + 3 * i % 9)
        assert mixed[i] == ("length", tokens, logprobs), (i, adapter)
        ak.set_active(model, adapter)
        with torch.no_grad():
            reference = model.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False,
                                       pad_token_id=0, eos_token_id=None)  # fmt: skip
            recomputed = torch.log_softmax(model(reference).logits[0, len(prompt) - 1 : -1], -1)
        ak.set_active(model, None)
        assert reference[0, len(prompt) :].tolist() == tokens, adapter
        torch.testing.assert_close(recomputed[range(len(tokens)), tokens], torch.tensor(logprobs), atol=1e-5, rtol=0)
    by_adapter = {a: m[1] for (_, a), m in zip(work, mixed, strict=True) if a in KINDS}
    assert len({tuple(t) for t in by_adapter.values()}) >= 4  # the adapters do change the answers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_steps_attend_all_rows_at_once_and_equal_alone_bit_for_bit(monkeypatch, dtype):
    """Without attention prefixes a decoding step attends every row in one batched computation over the slot
    cache (attention.decode_all). Each request equals itself served alone to the bit, also beside a neighbour
    whose 300-token prompt spans two cache chunks, in fp32 and on a bf16 base (``serve --dtype bf16``);
    in fp32 its tokens equal transformers' generate."""
    from adapterkit.serve import attention

    real, calls = attention.decode_all, []

    def counted(*args):
        calls.append(args[1].shape[0])  # the cache's chunks this step
        return real(*args)

    monkeypatch.setattr(attention, "decode_all", counted)
    model = chat_llama(eos_token_id=None).to(dtype)
    for name, (method, options) in KINDS.items():
        if name != "prefix":
            ak.add_adapter(model, name, method, **options)
    randomize_adapters(model, std=1.0)
    tok = tokenizer()
    tok.eos_token = None
    e = Engine(model, tok, max_batch=4)
    e.start()
    try:
        names = ["lora", "ia3", None, "pfeiffer", "houlsby", "prompt", "lora8"]
        work = list(zip(prompts(len(names), seed=5), names, strict=True))
        alone = [serve(e, p, a, max_tokens=6)[:2] for p, a in work]
        long = e.submit(prompts(1, seed=9)[0] * 60, "lora", Sampling(max_tokens=40))  # > 256 positions
        first_chunk(long)
        streams = [e.submit(p, a, Sampling(max_tokens=6)) for p, a in work]
        together = [(s.result()[1].finish_reason and s.tokens, s.logprobs) for s in streams]
        assert long.result()[1].finish_reason == "length" and len(long.tokens) == 40
        assert together == alone
        if dtype == torch.float32:
            assert_tokens_equal_generate(model, work, alone)
    finally:
        e.stop()
    assert max(calls) >= 2  # the short ones decoded beside a two-chunk neighbour


def test_long_prompts_prefill_in_chunks_beside_running_streams_and_equal_alone(llama, engine):
    """Prompts of 40-110 tokens in chunks of 16 (a prompt-tuning adapter: whole), arriving while others
    decode: each equals itself served alone bit for bit, and its tokens equal transformers' generate; the
    running streams got tokens between the chunks of a newcomer's prompt."""
    model, _ = llama
    e = engine(prefill_chunk=16)
    names = ["lora", "ia3", "prompt", None, "houlsby", "prefix"]
    long = [p * 12 for p in prompts(len(names), seed=11)]
    alone = [serve(e, p, a, max_tokens=5)[:2] for p, a in zip(long, names, strict=True)]
    steps = e.stats()["steps"]
    runner = e.submit(prompts(1)[0], "lora8", Sampling(max_tokens=60))
    first_chunk(runner)
    streams = [e.submit(p, a, Sampling(max_tokens=5)) for p, a in zip(long, names, strict=True)]
    first_chunk(streams[0])
    decoded = len(runner.tokens)
    assert [(s.result()[1] and s.tokens, s.logprobs) for s in streams] == alone
    assert runner.result()[1].finish_reason == "length"
    assert decoded >= len(long[0]) // 16  # one decoding step beside each of the first prompt's chunks
    assert e.stats()["steps"] > steps
    assert_tokens_equal_generate(model, list(zip(long, names, strict=True)), alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_burst_is_prefilled_packed_and_equals_each_request_alone(monkeypatch, dtype):
    """Without prefix attention, waiting prompts share prefill forwards of exactly ``prefill_chunk`` tokens
    (one token a row, each prompt attending its own cache): a burst of 12 (and a failing adapter among them)
    gives each request the bits it gets alone; in fp32 its tokens equal transformers' generate."""
    from adapterkit.serve import runner as runner_module

    packed = []
    real = runner_module.Runner.prefill_packed
    monkeypatch.setattr(
        runner_module.Runner,
        "prefill_packed",
        lambda self, chunks, rows: packed.append(len(chunks)) or real(self, chunks, rows),
    )
    model = chat_llama(eos_token_id=None).to(dtype)
    for name, (method, options) in KINDS.items():
        if name != "prefix":
            ak.add_adapter(model, name, method, **options)
    ak.add_adapter(model, "broken", "lora", r=4)
    randomize_adapters(model, std=1.0)
    for _, module in adapter_modules(model, "broken"):
        module.__class__ = Boom
    tok = tokenizer()
    tok.eos_token = None
    e = Engine(model, tok, max_batch=16, prefill_chunk=24)
    e.start()
    try:
        names = ["lora", "ia3", None, "pfeiffer", "houlsby", "prompt", "lora8", "lora", None, "ia3", "houlsby", "lora"]
        work = list(zip(prompts(len(names), seed=7), names, strict=True))
        alone = [serve(e, p, a, max_tokens=6)[:2] for p, a in work]
        packed.clear()
        streams = [e.submit(p, a, Sampling(max_tokens=6)) for p, a in work]
        broken = [e.submit(work[0][0], name, Sampling(max_tokens=6)) for name in ("broken", "missing")]
        assert [(s.result()[1] and s.tokens, s.logprobs) for s in streams] == alone
        assert [s.result()[1].code for s in broken] == ["adapter_failed"] * 2
        assert max(packed) >= 3  # several prompts in one forward
        if dtype == torch.float32:
            assert_tokens_equal_generate(model, work, alone)
    finally:
        e.stop()


def test_continuous_batching_a_short_request_overtakes_a_long_one(engine):
    e = engine(max_batch=2)
    long = e.submit(prompts(1)[0], "lora", Sampling(max_tokens=1500))  # seconds of decoding: margin on a slow box
    first_chunk(long)
    _, _, _, last = serve(e, prompts(2)[1], "ia3", max_tokens=3)
    assert last.finish_reason == "length" and last.completion_tokens == 3
    assert len(long.tokens) < 1500  # the long one still runs
    long.cancel()
    assert long.result()[1].finish_reason == "cancelled"


def test_cancel_frees_the_slot_and_the_cache(engine):
    e = engine(max_batch=1)
    running = e.submit(prompts(1)[0], "prefix", Sampling(max_tokens=10_000 // 10))
    first_chunk(running)
    queued = e.submit(prompts(1)[0], None, Sampling(max_tokens=3))
    assert e.stats()["running"] == 1 and e.stats()["kv_bytes"] > 0 and e.in_use() == {"prefix"}
    queued.cancel()
    running.cancel()
    assert running.result()[1].finish_reason == "cancelled" and queued.result()[1].finish_reason == "cancelled"
    assert queued.tokens == [] and len(running.tokens) < 1000
    assert e.stats()["running"] == 0 and e.stats()["kv_bytes"] == 0 and e.in_use() == set()


def test_queue_bound_and_bad_requests(llama):
    e = Engine(*llama, max_batch=2, max_queue=2, max_context=16)  # not started: nothing leaves the queue
    streams = [e.submit([5, 6], name, Sampling(max_tokens=4)) for name in ("lora", None)]
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        e.submit([5, 6], None, Sampling(max_tokens=4))
    assert e.in_use() == {"lora"} and e.stats()["queued"] == 2
    too_long = "context holds 16"
    for bad, match in [([], "empty"), ([1] * 13, too_long), ([5, 99], r"\[0, 16\)")]:
        with pytest.raises(ak.AdapterError, match=match):
            e.submit(bad, None, Sampling(max_tokens=4))
    assert e.check_prompt([1] * 12, 4) == [1] * 12  # 12 + 4 fits the 16 exactly
    with pytest.raises(ContextExceeded, match="lower max_tokens"):  # OpenAI's rule: refused up front, not cut
        e.submit([5, 6], None, Sampling(max_tokens=15))
    for options, match in [({"temperature": float("inf")}, "temperature"), ({"top_p": float("nan")}, "top_p")]:
        with pytest.raises(ak.AdapterError, match=match):
            Sampling(**options)
    for options, match in [({"max_tokens": 0}, "max_tokens"), ({"top_p": 0}, "top_p"), ({"stop": ("",)}, "stop")]:
        with pytest.raises(ak.AdapterError, match=match):
            Sampling(**options)
    e.start()
    assert [s.result()[1].finish_reason for s in streams] == ["length", "length"]
    e.stop()


class Boom(LoRA):
    """A LoRA that fails once it decodes (its prefill works)."""

    def row_key(self):
        return "boom"

    @staticmethod
    def adapt_rows(host, x, out, modules, index):
        if x.shape[1] == 1:
            raise RuntimeError("boom")
        return LoRA.adapt_rows(host, x, out, modules, index)


def test_a_failing_adapter_fails_only_its_own_requests(llama, engine):
    model, _ = llama
    ak.add_adapter(model, "boom", "lora")
    for _, module in adapter_modules(model, "boom"):
        module.__class__ = Boom
    e = engine()
    work = list(zip(prompts(4), ["lora", "boom", "missing", "ia3"], strict=True))
    alone = [serve(e, p, a)[:2] for p, a in work if a in ("lora", "ia3")]
    streams = [e.submit(p, a, Sampling(max_tokens=8)) for p, a in work]
    lasts = [s.result()[1] for s in streams]
    assert [c.finish_reason for c in lasts] == ["length", "error", "error", "length"]
    assert [c.code for c in lasts] == [None, "adapter_failed", "adapter_failed", None]  # the HTTP layer: 400
    assert "'boom' failed: RuntimeError: boom" in lasts[1].error and len(streams[1].tokens) == 1
    assert "'missing' failed" in lasts[2].error and "missing" in lasts[2].error.split("failed")[1]
    assert [(streams[i].tokens, streams[i].logprobs) for i in (0, 3)] == alone


def test_an_adapter_with_non_finite_weights_fails_its_own_requests_greedy_or_sampled(llama, engine):
    """NaN weights gave greedy answers of empty text and sampled ones a 500 blaming the base model: now each
    such request ends with adapter_failed (a 400), and the other rows get what they get alone."""
    model, _ = llama
    ak.add_adapter(model, "nan", "lora", r=2)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if ".adapterkit.nan." in n):
            p.fill_(float("nan"))
    e = engine()
    alone = serve(e, [7, 8, 9], "lora")[:2]
    options = [{}, {"temperature": 1.0, "seed": 3}]
    bad = [e.submit([7, 8, 9], "nan", Sampling(max_tokens=8, **o)) for o in options]
    good = e.submit([7, 8, 9], "lora", Sampling(max_tokens=8))
    for stream in bad:
        last = stream.result()[1]
        assert (last.finish_reason, last.code) == ("error", "adapter_failed") and "not finite" in last.error
        assert stream.tokens == []
    assert good.result()[1].finish_reason == "length" and (good.tokens, good.logprobs) == alone


@pytest.mark.parametrize("temperature, top_p", [(1e-40, 1.0), (1.0, 1e-46), (5e-324, 5e-324), (2.0, 1.0)])
def test_any_temperature_and_top_p_a_client_may_send_sample_a_token(engine, temperature, top_p):
    """float32 underflowed at temperature 1e-40 or top_p 1e-46 (a 500): a vanishing temperature or nucleus
    now gives the greedy token, never an error."""
    e = engine()
    greedy = serve(e, [7, 8, 9], "lora")[0]
    tokens, logprobs, _, last = serve(e, [7, 8, 9], "lora", temperature=temperature, top_p=top_p, seed=0)
    assert last.finish_reason == "length" and len(tokens) == 8 and all(lp <= 0 for lp in logprobs)
    if temperature < 1e-30 or top_p < 1e-30:
        assert tokens == greedy


def test_call_adds_an_adapter_between_steps_while_requests_run(llama, engine):
    e = engine()
    before = serve(e, prompts(1)[0], "lora", max_tokens=30)[:2]
    running = e.submit(prompts(1)[0], "lora", Sampling(max_tokens=30))
    first_chunk(running)

    def add(model):
        ak.add_adapter(model, "new", "lora", r=2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapterkit.new." in name:
                    p.normal_()
        return threading.current_thread().name

    assert e.call(add).result(timeout=10) == "adapterkit-engine"
    assert running.result()[1].finish_reason == "length" and (running.tokens, running.logprobs) == before
    new = serve(e, prompts(1)[0], "new")
    assert new[3].finish_reason == "length" and new[:2] != serve(e, prompts(1)[0], "lora")[:2]
    with pytest.raises(ZeroDivisionError):
        e.call(lambda m: 1 / 0).result(timeout=10)


def test_max_tokens_and_stop_strings(engine):
    e = engine()
    tokens, _, text, last = serve(e, [7, 8, 9, 10, 15], "lora", max_tokens=6)
    words = text.split()
    assert (last.finish_reason, last.completion_tokens, len(words)) == ("length", 6, 6)
    assert text == tokenizer().decode(tokens) and last.prompt_tokens == 5
    i = next(i for i in range(1, 5) if words[i] not in words[:i])  # a word not seen before
    stop = f"{words[i]} {words[i + 1]}"  # two words: the first is held back until the second decides
    stream = e.submit([7, 8, 9, 10, 15], "lora", Sampling(max_tokens=6, stop=(stop, "no such words")))
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == text[: text.index(stop)] and chunks[-1].finish_reason == "stop"
    assert all(words[i] not in c.text for c in chunks) and len(stream.tokens) == i + 2


def test_an_end_token_stops_the_request(llama):
    model, tok = llama
    e = Engine(model, tok, max_batch=2)
    e.start()
    tokens = serve(e, [7, 8, 9], None)[0]
    e.stop()
    model.generation_config.eos_token_id = tokens[2]
    e = Engine(model, tok, max_batch=2)
    e.start()
    _, _, text, last = serve(e, [7, 8, 9], None)
    e.stop()
    assert (last.finish_reason, last.completion_tokens) == ("stop", 3) and text == tok.decode(tokens[:2])


def test_seeded_sampling_is_reproducible_under_load(engine):
    e = engine()
    options = {"temperature": 1.5, "top_p": 0.9, "max_tokens": 12}
    alone = serve(e, [7, 8, 9], "pfeiffer", seed=1, **options)[0]
    others = [e.submit(p, "lora", Sampling(max_tokens=12)) for p in prompts(3)]
    assert serve(e, [7, 8, 9], "pfeiffer", seed=1, **options)[0] == alone
    assert any(serve(e, [7, 8, 9], "pfeiffer", seed=s, **options)[0] != alone for s in (2, 3, 4))
    greedy = serve(e, [7, 8, 9], "pfeiffer", max_tokens=12)[0]
    assert alone != greedy and all(o.result()[1].finish_reason == "length" for o in others)


def test_async_streaming_and_stop_without_drain(engine):
    e = engine()

    async def read():
        stream = e.submit([7, 8, 9], "prompt", Sampling(max_tokens=5))
        return [c async for c in stream]

    chunks = asyncio.run(read())
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    running = [e.submit(p, "lora", Sampling(max_tokens=1000)) for p in prompts(6)]  # 4 run, 2 wait
    first_chunk(running[0])
    started = time.monotonic()
    e.stop(drain=False)
    assert time.monotonic() - started < 5 and {s.result()[1].finish_reason for s in running} == {"cancelled"}
    with pytest.raises(ak.AdapterError, match="stopping"):
        e.submit([7, 8], None, Sampling())


class Bytes:
    """A byte-level tokenizer: one token per UTF-8 byte, decoded as transformers' do (U+FFFD for a cut character)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_never_splits_a_character_and_holds_back_a_forming_stop_string():
    text, out = TextDeltas(Bytes(), ("wörld",)), []
    for byte in "héllo wörld!".encode():
        out.append(text.add(byte))
        if out[-1][1]:
            break
    assert "".join(t for t, _ in out) == "héllo " and len(out) == len("héllo wörld".encode())
    assert all("\ufffd" not in t for t, _ in out) and out[7] == ("", False)  # "w" held back
    plain = TextDeltas(Bytes(), ())
    assert "".join(plain.add(b)[0] for b in "naïve ✓".encode()) == "naïve ✓"


@pytest.mark.slow
def test_smollm2_mixed_adapters_equal_alone_and_generate():
    from adapterkit.apps.models import smollm2

    path = smollm2()
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    for name, method in [("a", "lora"), ("b", "lora"), ("c", "ia3")]:
        ak.add_adapter(model, name, method)
    randomize_adapters(model, std=0.02)
    questions = ["What is the capital of France?", "Name three colors.", "What is 12 times 7?", "Say hello."]
    names = [None, "a", "b", "c"]
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for q in questions]  # fmt: skip
    e = Engine(model, tok, max_batch=4)
    e.start()
    alone = [serve(e, p, a) for p, a in zip(ids, names, strict=True)]
    streams = [e.submit(p, a, Sampling(max_tokens=8)) for p, a in zip(ids, names, strict=True)]
    mixed = [(s.result()[0], s.tokens, s.logprobs) for s in streams]
    e.stop()
    assert mixed == [(text, tokens, logprobs) for tokens, logprobs, text, _ in alone]
    assert alone[0][2] == "The capital of France is Paris."
    one_by_one = [
        ak.generate(model, tok, [q], max_tokens=8, per_prompt=[a])[0] for q, a in zip(questions, names, strict=True)
    ]
    assert [text for _, _, text, _ in alone] == one_by_one
