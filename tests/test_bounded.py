"""Memory stays bounded on the serving path: caches are small LRUs whatever mix of setups a server sees,
and what hooks hand to later hooks of one forward lives in that forward's scratch area, gone when it
ends (by an error too) and never shared between threads."""

import random
import threading

import pytest
import torch

import adapterkit as ak
from adapterkit.core import composition as co
from adapterkit.core import state as st
from adapterkit.core.lru import LRU

from conftest import make_inputs, make_model, randomize_adapters

NAMES = [f"l{i}" for i in range(6)]
BATCH = 4
BOUND = 256  # the largest cache adapterkit keeps


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch's thread pool only adds contention (20,000 setups must stay quick)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loras():
    model = make_model("bert", head=False)
    for i, name in enumerate(NAMES):
        ak.add_adapter(model, name, "lora", r=2 + i % 3)  # ranks differ: padded and gathered together
    randomize_adapters(model)
    return model


def random_setup(rng: random.Random) -> co.Block:
    """Mostly PerRow mixes of the six adapters and None, some with a nested block; some Average, Stack and
    BatchSplit setups."""
    roll = rng.random()
    if roll < 0.05:
        return co.Average(*rng.sample(NAMES, 2), weights=[rng.random() + 0.1, rng.random() + 0.1])
    if roll < 0.1:
        return co.Stack(*rng.sample(NAMES, rng.randint(0, 2)))
    if roll < 0.15:
        sizes = rng.choice([[1, 3], [2, 2], [3, 1], [0, 4]])
        return co.BatchSplit(*rng.sample(NAMES, 2), batch_sizes=sizes)
    rows = [rng.choice([*NAMES, None]) for _ in range(BATCH)]
    if roll < 0.2:
        rows[rng.randrange(BATCH)] = co.Stack(*rng.sample(NAMES, 2))
    return co.PerRow(rows)


def container_sizes(model: torch.nn.Module) -> dict[str, int]:
    """The size of every dict, set and list held by the model's state and by any module."""
    state = model.__dict__["_adapterkit_state"]
    holders = {"state": state, **{f"module {name}": m for name, m in model.named_modules()}}
    return {
        f"{where}.{attr}": len(value)
        for where, holder in holders.items()
        for attr, value in vars(holder).items()
        if isinstance(value, (dict, set, list, LRU))
    }


def test_caches_stay_bounded_over_20000_random_setups(loras):
    rng = random.Random(0)
    inputs = make_inputs("bert", batch=BATCH, seq=5)
    for _ in range(500):
        with ak.use(loras, random_setup(rng)):
            loras(**inputs)
    before = container_sizes(loras)
    for i in range(20_000):
        setup = random_setup(rng)
        if i % 50 == 0:
            ak.set_active(loras, setup)
            loras(**inputs)
            continue
        with ak.use(loras, setup):
            if i % 10 == 0:
                loras(**inputs)
    ak.set_active(loras, None)
    caches = st.caches(loras)
    assert {"checked_setups", "per_row_index", "rows_by_batch"} <= caches.keys()
    for name, cache in caches.items():
        assert 0 < len(cache) <= cache.maxsize <= BOUND, name
    assert st.cache_sizes(loras) == {name: len(cache) for name, cache in caches.items()}
    after = container_sizes(loras)
    grown = {k: (before.get(k), n) for k, n in after.items() if n > max(before.get(k, 0), BOUND)}
    assert not grown
    assert after["state.changes"] == before["state.changes"] == 0
    assert st.scratch() == {}


def test_per_row_after_cache_churn_equals_each_row_alone(loras):
    rng = random.Random(1)
    for _ in range(2 * BOUND):  # every cache has evicted and refilled
        with ak.use(loras, random_setup(rng)):
            pass
    ids = make_inputs("bert", batch=BATCH, seq=5)["input_ids"]
    rows = ["l1", None, "l4", co.Average("l0", "l5", weights=[1, 3])]
    for _ in range(2):  # the second time through the caches
        with ak.use(loras, co.PerRow(rows)):
            batched = loras(input_ids=ids).last_hidden_state
        for i, row in enumerate(rows):
            with ak.use(loras, row):
                alone = loras(input_ids=ids[i : i + 1]).last_hidden_state
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-6, rtol=1e-5)


@pytest.fixture
def relays():
    """Adapters whose hooks hand values on within a forward: a parallel adapter (the sub-layer's input),
    UniPELT's gated prefix (its gates) and a prompt (whether to insert it)."""
    model = make_model("bert", head=False)
    ak.add_adapter(model, "par", "parallel")
    ak.add_adapter(model, "uni", "unipelt")
    ak.add_adapter(model, "prompt", "prompt", prompt_length=3)
    randomize_adapters(model)
    return model


def raise_in(module: torch.nn.Module, seen: list | None = None) -> torch.utils.hooks.RemovableHandle:
    """Make ``module`` raise before its forward, noting what the scratch area held then."""

    def fail(*_):
        if seen is not None:
            seen.append(dict(st.scratch()))
        raise RuntimeError("boom")

    return module.register_forward_pre_hook(fail)


# Where to fail: inside the attention (a gated prefix's gates are set), in the feed-forward's output
# projection (the parallel adapter's input is kept); the prompt's flag is set from the start.
@pytest.mark.parametrize("where", ["attention.self.query", "output.dense"])
@pytest.mark.parametrize("setup", [["par"], ["uni"], ["prompt"], ["prompt", "par"]])
def test_a_forward_that_raises_leaves_nothing_behind(relays, setup, where):
    ids = make_inputs("bert", seq=5)["input_ids"]
    ak.set_active(relays, setup)
    expected = relays(input_ids=ids).last_hidden_state
    seen = []
    handle = raise_in(relays.encoder.layer[1].get_submodule(where), seen)
    with pytest.raises(RuntimeError, match="boom"):
        relays(input_ids=ids)
    handle.remove()
    relayed = {"par": where == "output.dense", "uni": where != "output.dense", "prompt": True}
    assert bool(seen[0]) == any(relayed[name] for name in setup)  # there was something to clean up
    assert st.scratch() == {}
    with pytest.raises(RuntimeError):  # a bad input, after the prompt's flag was set
        relays(input_ids=ids, token_type_ids=torch.zeros(2, 7, dtype=torch.long))
    assert st.scratch() == {}
    assert torch.equal(relays(input_ids=ids).last_hidden_state, expected)
    assert st.scratch() == {}


def test_a_slot_on_the_model_itself_runs_inside_the_forwards_scratch_area():
    """A bare Whisper encoder hosts the L-adapter's combination itself: it reads the taps before the
    model's forward hook drops the area."""
    model = make_model("whisper", head=False)
    ak.add_adapter(model, "l", "l_adapter", activate=True)
    randomize_adapters(model)
    inputs = make_inputs("whisper")
    expected = model(**inputs).last_hidden_state
    seen = []
    handle = raise_in(model.layers[1], seen)
    with pytest.raises(RuntimeError, match="boom"):
        model(**inputs)
    handle.remove()
    assert seen[0] and st.scratch() == {}  # layer 0's tap was there, and is gone
    assert torch.equal(model(**inputs).last_hidden_state, expected)


def test_a_module_called_alone_that_raises_is_cleaned_by_the_next_model_forward(relays):
    ak.set_active(relays, "par")
    layer = relays.encoder.layer[0]
    handle = raise_in(layer.output.dense)
    with pytest.raises(RuntimeError, match="boom"):
        layer(torch.randn(2, 5, 32))
    handle.remove()
    assert st.scratch() != {}  # outside a model forward: one area per thread, kept until the next one
    relays(**make_inputs("bert", seq=5))
    assert st.scratch() == {}


def test_threads_forwarding_different_setups_get_what_they_get_alone(relays):
    setups = [["par"], ["uni"], ["prompt"], co.PerRow(["par", "prompt"])]
    inputs = [make_inputs("bert", seq=5, seed=s)["input_ids"] for s in range(len(setups))]
    alone = []
    for setup, ids in zip(setups, inputs, strict=True):
        with ak.use(relays, setup):
            alone.append(relays(input_ids=ids).last_hidden_state)
    start, results, errors = threading.Barrier(len(setups)), {}, []

    def serve(k: int) -> None:
        try:
            start.wait()
            with ak.use(relays, setups[k]):
                results[k] = [relays(input_ids=inputs[k]).last_hidden_state for _ in range(20)]
            assert st.scratch() == {}
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(len(setups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, outs in results.items():
        assert all(torch.equal(out, alone[k]) for out in outs), setups[k]
