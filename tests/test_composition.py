"""Composition blocks: PerRow / BatchSplit / Parallel, Stack, Average, Split, Fuse."""

import asyncio
import threading

import pytest
import torch

import adapterkit as ak
from adapterkit.core.methods import bottleneck_layers, ia3, lora, prefix, prompt
from adapterkit.errors import AdapterError, ConfigError

from conftest import ARCHS, first_output, make_inputs, make_model, randomize_adapters
from test_methods import PRESETS, UNSUPPORTED

ROWS = ["a", None, "b", "a"]
WHOLE_BATCH = ("unipelt", "l_adapter", "el", "p_adapter", "elp")  # refused in PerRow (test below)


def two_adapters(arch, preset, head=False, **overrides):
    model = make_model(arch, head=head)
    ak.add_adapter(model, "a", preset, **overrides)
    ak.add_adapter(model, "b", preset, **overrides)
    randomize_adapters(model)
    return model


def inputs(arch):
    x = make_inputs(arch, batch=4, seq=6)
    if "attention_mask" in x and arch not in ("gpt2", "llama", "mistral", "qwen2"):
        x["attention_mask"][1, 4:] = 0  # a right-padded row
    return x


@torch.no_grad()
def run(model, setup, x):
    ak.set_active(model, setup)
    return first_output(model(**x))


@pytest.mark.parametrize(
    "arch,preset", [(a, p) for a in ARCHS for p in PRESETS if p not in WHOLE_BATCH and (a, p) not in UNSUPPORTED]
)
def test_per_row_equals_each_row_with_its_adapter(arch, preset):
    model, x = two_adapters(arch, preset), inputs(arch)
    alone = {name: run(model, name, x) for name in ("a", "b", None)}
    assert (alone["a"] - alone[None]).abs().max() > 1e-3  # the adapters do something
    per_row = run(model, ak.PerRow(ROWS), x)
    expected = torch.stack([alone[name][i] for i, name in enumerate(ROWS)])
    torch.testing.assert_close(per_row, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arch,preset", [(a, p) for a in ("bert", "gpt2", "llama") for p in PRESETS if p not in WHOLE_BATCH]
)
def test_per_row_gives_every_adapter_parameter_a_gradient(arch, preset):
    model, x = two_adapters(arch, preset), inputs(arch)
    ak.set_active(model, ak.PerRow(ROWS))
    first_output(model(**x)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if ".adapterkit." in name and ".fixed." not in name:  # fixed: saved, never trained (VeRA's projections)
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("config", [dict(config="prompt"), dict(config="prefix", shift_positions=True)])
def test_per_row_prompts_and_shifted_prefixes_of_different_lengths(arch, config):
    """Rows with prompts / peft-style prefixes of 3 and 5 positions, and none, in one batch."""
    model = make_model(arch, head=False)
    length = "prompt_length" if config["config"] == "prompt" else "prefix_length"
    ak.add_adapter(model, "a", **config, **{length: 3})
    ak.add_adapter(model, "b", **config, **{length: 5})
    randomize_adapters(model)
    x = inputs(arch)
    alone = {name: run(model, name, x) for name in ("a", "b", None)}
    per_row = run(model, ak.PerRow(ROWS), x)
    torch.testing.assert_close(per_row, torch.stack([alone[n][i] for i, n in enumerate(ROWS)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arch,preset,reason",
    [
        ("bert", "unipelt", "gated"),
        ("bert", "l_adapter", "weighted sum over its layers"),
        ("wavlm", "el", "weighted sum"),
        ("wavlm", "p_adapter", "lengthen every row"),
    ],
)
def test_whole_batch_methods_refuse_per_row(arch, preset, reason):
    model = two_adapters(arch, preset)
    with pytest.raises(ConfigError, match=f"'a' \\([a-z_]+\\) cannot run in PerRow.*{reason}"):
        ak.set_active(model, ak.PerRow(ROWS))


BATCHED = [
    ("lora", lora.LoRA, "adapt"),
    ("pfeiffer", bottleneck_layers.NormAdapter, "adapt"),
    ("houlsby", bottleneck_layers.SequentialAdapter, "adapt"),
    ("parallel", bottleneck_layers.ParallelAdapter, "adapt"),
    ("ia3", ia3.IA3Output, "adapt"),
    ("ia3", ia3.IA3Input, "adapt_inputs"),
    ("prefix", prefix.Prefix, "kv_prefix"),
    ("prompt", prompt.PromptInsert, "adapt"),
]


@pytest.mark.parametrize("preset,cls,method", BATCHED)
def test_per_row_computes_adapters_together(preset, cls, method, monkeypatch):
    """No adapter runs alone on its rows: one batched computation per site."""
    model, x = two_adapters("bert", preset), inputs("bert")
    monkeypatch.setattr(cls, method, lambda *a, **k: pytest.fail(f"{cls.__name__}.{method} ran per adapter"))
    run(model, ak.PerRow(ROWS), x)


def test_per_row_lora_of_different_ranks_and_gradients():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "lora", r=2)
    ak.add_adapter(model, "b", "lora", r=6, alpha=3)
    randomize_adapters(model)
    x = inputs("bert")
    alone = {name: run(model, name, x) for name in ("a", "b", None)}
    per_row = run(model, ak.PerRow(ROWS), x)
    torch.testing.assert_close(per_row, torch.stack([alone[n][i] for i, n in enumerate(ROWS)]), atol=1e-5, rtol=1e-5)
    model.zero_grad()
    first_output(model(**x)).pow(2).sum().backward()  # a plain sum after LayerNorm has a zero gradient
    for name, p in model.named_parameters():
        if ".adapterkit." in name and ".fixed." not in name:  # fixed: saved, never trained (VeRA's projections)
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_split_and_parallel():
    model, x = two_adapters("bert", "lora"), inputs("bert")
    alone = {name: run(model, name, x) for name in ("a", "b")}
    split = run(model, ak.BatchSplit("a", "b", batch_sizes=[1, 3]), x)
    torch.testing.assert_close(split, torch.cat([alone["a"][:1], alone["b"][1:]]), atol=1e-5, rtol=1e-5)
    parallel = run(model, ak.Parallel("a", "b"), x)  # the input is repeated: 8 rows
    torch.testing.assert_close(parallel, torch.cat([alone["a"], alone["b"]]), atol=1e-5, rtol=1e-5)
    stacked = run(model, ak.Stack("a", ak.Parallel("a", "b")), x)
    torch.testing.assert_close(stacked[:4], run(model, ["a", "a"], x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="covers 3 rows, the batch 4"):
        run(model, ak.BatchSplit("a", "b", batch_sizes=[1, 2]), x)


def test_parallel_repeats_labels_for_training():
    model, x = two_adapters("bert", "pfeiffer", head=True), inputs("bert")
    ak.set_active(model, ak.Parallel("a", "b"))
    out = model(**x, labels=torch.tensor([0, 1, 1, 0]))
    assert out.logits.shape[0] == 8 and out.loss.ndim == 0


def test_per_row_with_nested_blocks():
    model, x = two_adapters("bert", "lora"), inputs("bert")
    rows = [ak.Stack("a", "b"), "a", None, ak.Stack("a", "b")]
    per_row = run(model, ak.PerRow(rows), x)
    stacked, a, base = run(model, ["a", "b"], x), run(model, "a", x), run(model, None, x)
    torch.testing.assert_close(per_row, torch.stack([stacked[0], a[1], base[2], stacked[3]]), atol=1e-5, rtol=1e-5)


def query_site(model):
    return model.encoder.layer[0].attention.self.query


def test_average_and_split_at_one_site():
    model = two_adapters("bert", "lora")
    host, h = query_site(model), torch.randn(2, 5, 32)
    with torch.no_grad():
        ak.set_active(model, "a")
        ya = host(h)
        ak.set_active(model, "b")
        yb = host(h)
        ak.set_active(model, ak.Average("a", "b", weights=[1, 3]))
        torch.testing.assert_close(host(h), 0.25 * ya + 0.75 * yb)
        ak.set_active(model, ak.Split("a", "b", splits=[2, 3]))
        torch.testing.assert_close(host(h), torch.cat([ya[:, :2], yb[:, 2:]], dim=1))


def test_average_of_ia3_is_ia3_of_the_average_vectors():
    model, x = two_adapters("bert", "ia3"), inputs("bert")
    ak.add_adapter(model, "c", "ia3")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, p in params.items():
            if ".adapterkit.c." in key:
                p.copy_(0.2 * params[key.replace(".c.", ".a.")] + 0.8 * params[key.replace(".c.", ".b.")])
    torch.testing.assert_close(
        run(model, ak.Average("a", "b", weights=[0.2, 0.8]), x), run(model, "c", x), atol=1e-6, rtol=1e-5
    )


def test_stack_trains_its_top_adapter():
    model, x = two_adapters("bert", "pfeiffer"), inputs("bert")
    ak.train_adapter(model, ak.Stack("a", "b"))
    assert ak.active_setup(model) == ak.Stack("a", "b")
    first_output(model(**x)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapterkit." in n}
    assert all(g is None for n, g in grads.items() if ".adapterkit.a." in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".adapterkit.b." in n)
    with pytest.raises(ConfigError, match="Stack ending in one"):
        ak.train_adapter(model, ak.Average("a", "b"))


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda: ak.Average("a", "p"), "'p' \\(prefix\\) cannot run in Average: a prefix adds attention keys"),
        (lambda: ak.Split("a", "t", splits=[1, 1]), "'t' \\(prompt\\) cannot run in Split: a prompt changes"),
        (lambda: ak.Fuse("a", "l"), "'l' is lora; AdapterFusion fuses bottleneck adapters"),
        (lambda: ak.PerRow([ak.Stack("p"), None]), "'p' \\(prefix\\) cannot run in a block inside PerRow"),
        (lambda: ak.Average("a", ak.Parallel("a", "a")), "Average cannot hold Parallel"),
        (lambda: ak.Stack("a", "nope"), "no adapter named 'nope'"),
        (lambda: ak.Fuse("a", "a2"), "no fusion layer 'a,a2'"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(setup, message):
    model = make_model("bert")
    for name, preset in [("a", "pfeiffer"), ("a2", "pfeiffer"), ("p", "prefix"), ("t", "prompt"), ("l", "lora")]:
        ak.add_adapter(model, name, preset)
    with pytest.raises((ConfigError, AdapterError), match=message):
        if "is lora" in message:
            ak.add_fusion(model, setup())
        else:
            ak.set_active(model, setup())


def test_blocks_round_trip_through_json():
    import json

    setup = ak.Stack(
        "a",
        ak.Fuse("b", "c", name="f"),
        ak.Average("d", ak.Split("e", "f", splits=[2, 3]), weights=[1, 3]),
        ak.BatchSplit("a", ak.Stack("b", "c"), batch_sizes=[1, 2]),
    )
    per_row = ak.PerRow(["a", None, ak.Stack("b", "c")])
    for block in (setup, per_row, ak.Parallel("a", "b")):
        text = json.dumps(block.to_dict())
        assert ak.composition.from_dict(json.loads(text)) == block
    assert setup.names() == ["a", "b", "c", "d", "e", "f"]
    assert repr(ak.Average("a", "b")) == "Average('a', 'b', weights=[0.5, 0.5])"


def test_use_with_blocks_is_private_to_each_thread_and_task():
    model, x = two_adapters("bert", "lora"), inputs("bert")
    expected = {
        "a": run(model, "a", x),
        "per_row": run(model, ak.PerRow(ROWS), x),
        "avg": run(model, ak.Average("a", "b"), x),
    }
    ak.set_active(model, None)
    setups = {"a": "a", "per_row": ak.PerRow(ROWS), "avg": ak.Average("a", "b")}
    barrier, results = threading.Barrier(3), {}

    def worker(key):
        with ak.use(model, setups[key]):
            barrier.wait()
            with torch.no_grad():
                results[key] = first_output(model(**x))

    threads = [threading.Thread(target=worker, args=(k,)) for k in setups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in setups:
        torch.testing.assert_close(results[key], expected[key], atol=0, rtol=0)

    async def task(key):
        with ak.use(model, setups[key]):
            await asyncio.sleep(0)
            with torch.no_grad():
                return key, first_output(model(**x))

    async def main():
        return await asyncio.gather(*(task(k) for k in setups))

    for key, out in asyncio.run(main()):
        torch.testing.assert_close(out, expected[key], atol=0, rtol=0)
    assert ak.active_setup(model) == ak.Stack()


def test_summary_shows_the_composition():
    model = two_adapters("bert", "pfeiffer", head=True)
    ak.add_fusion(model, ak.Fuse("a", "b"))
    ak.set_active(model, ak.Fuse("a", "b"))
    text = str(ak.summary(model))
    assert "active setup: Fuse('a', 'b')" in text
    rows = {r.name: r for r in ak.summary(model).adapters}
    assert rows["a,b"].method == "fusion" and rows["a,b"].active and rows["a"].active
    assert rows["a,b"].params == 2 * (3 * 32 * 32 + 2 * 32)  # two layers: Q, K with bias, V without


def test_merged_adapters_refuse_compositions():
    model = two_adapters("bert", "lora")
    ak.merge_adapter(model, "a")
    with pytest.raises(AdapterError, match="merged into the weights, so they act on every row"):
        ak.set_active(model, ak.PerRow(ROWS))
    ak.unmerge_adapter(model, "a")
    ak.set_active(model, ak.PerRow(ROWS))
