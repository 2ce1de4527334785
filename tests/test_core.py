"""Public API guarantees: freezing, isolation, counts, errors, architecture overrides."""

import copy
import threading

import pytest
import torch
import transformers as T
from torch import nn

import adapterkit as ak

from conftest import make_inputs, make_model, randomize_adapters


def test_train_adapter_freezes_all_but_adapter_and_head(bert):
    ak.add_adapter(bert, "a", "pfeiffer")
    ak.add_adapter(bert, "b", "lora")
    ak.train_adapter(bert, "a")
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in bert.named_parameters() if ".adapterkit.a." in n or n.startswith("classifier.")}
    assert ak.active_adapters(bert) == ("a",)
    ak.train_adapter(bert, "b", train_head=False)
    assert {n for n, p in bert.named_parameters() if p.requires_grad} == {
        n for n, _ in bert.named_parameters() if ".adapterkit.b." in n
    }


def test_training_b_leaves_base_and_a_bit_identical(bert):
    inputs = make_inputs("bert")
    ak.add_adapter(bert, "a", "houlsby")
    ak.add_adapter(bert, "b", "lora")
    randomize_adapters(bert)
    ak.set_active(bert, "a")
    a_before = bert.base_model(**inputs).last_hidden_state
    base_before = {k: v.clone() for k, v in bert.state_dict().items() if ".adapterkit.b." not in k}
    ak.train_adapter(bert, "b")
    bert.train()
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(bert(**inputs).logits, torch.tensor([0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    bert.eval()
    after = bert.state_dict()
    changed = [k for k, v in base_before.items() if not torch.equal(v, after[k])]
    assert changed == ["classifier.weight", "classifier.bias"]
    ak.set_active(bert, "a")
    assert torch.equal(bert.base_model(**inputs).last_hidden_state, a_before)


def test_summary_counts_match_closed_form(bert):
    ak.add_adapter(bert, "p", "pfeiffer")  # H=32, d=32//16=2, output adapter in 2 layers
    ak.add_adapter(bert, "h", "houlsby", bottleneck_size=4)  # two adapters per layer
    ak.add_adapter(bert, "l", "lora", r=2)  # query and value, 32 -> 32
    ak.train_adapter(bert, "l")
    per = lambda d: 32 * d + d + d * 32 + 32  # noqa: E731
    rows = {r.name: r for r in ak.summary(bert).adapters}
    assert rows["p"].params == 2 * per(2)
    assert rows["h"].params == 2 * 2 * per(4)
    assert rows["l"].params == 2 * 2 * (2 * 32 + 32 * 2)
    summary = ak.summary(bert)
    base = sum(p.numel() for n, p in bert.named_parameters() if n.startswith("bert.") and ".adapterkit." not in n)
    assert summary.base_params == base
    assert summary.head_params == 32 * 2 + 2
    assert summary.trainable_params == rows["l"].params + summary.head_params
    assert rows["l"].active and not rows["p"].active
    assert f"{rows['p'].params:,}" in str(summary)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: ak.add_adapter(m, "a", "nope"), "unknown preset 'nope'"),
        (lambda m: ak.add_adapter(m, "a", "lora", rank=4), r"unknown field\(s\) \['rank'\]"),
        (lambda m: ak.add_adapter(m, "a", "lora", r=0), "r must be a positive int"),
        (lambda m: ak.add_adapter(m, "a", "pfeiffer", non_linearity="bogus"), "unknown non_linearity"),
        (lambda m: ak.add_adapter(m, "bad name", "lora"), "must be non-empty letters"),
        (lambda m: ak.add_adapter(m, "a", "lora", target_modules=["nothing_here"]), "no module"),
        (lambda m: ak.set_active(m, "ghost"), "no adapter named 'ghost'"),
        (lambda m: ak.train_adapter(m, "ghost"), "no adapter named 'ghost'"),
    ],
)
def test_user_errors_are_clear(bert, call, match):
    with pytest.raises(ak.ConfigError if "adapter named" not in match else ak.AdapterError, match=match):
        call(bert)
    assert ak.list_adapters(bert) == {}


def test_duplicate_name(bert):
    ak.add_adapter(bert, "a", "lora")
    with pytest.raises(ak.ConfigError, match="already exists"):
        ak.add_adapter(bert, "a", "pfeiffer")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(8, 8), "out": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block["out"](torch.relu(block["proj"](x)))
        return x


def test_unknown_architecture_names_the_override():
    with pytest.raises(ak.ArchitectureError, match="register_architecture"):
        ak.add_adapter(Tiny(), "a", "houlsby")


def test_lora_by_target_names_and_regex_on_unknown_model():
    model = Tiny()
    ak.add_adapter(model, "a", "lora", target_modules=["proj"])
    ak.add_adapter(model, "b", "lora", target_modules=r"blocks\.1\.out")
    names = [n for n, _ in model.named_parameters() if ".adapterkit." in n]
    assert sorted(names) == sorted(
        [f"blocks.{i}.proj.adapterkit.a.lora_{m}" for i in (0, 1) for m in "AB"]
        + [f"blocks.1.out.adapterkit.b.lora_{m}" for m in "AB"]
    )


def test_arch_override_for_unknown_model():
    spec = ak.ArchSpec(
        layers=r"blocks\.\d+",
        attn_in="proj",
        attn_out="proj",
        ffn_in="proj",
        ffn_out="out",
        attn_norm=None,
        ffn_norm=None,
        lora_targets=("proj",),
    )
    model = Tiny()
    ak.add_adapter(model, "a", "houlsby", arch=spec, bottleneck_size=2, activate=True)
    randomize_adapters(model)
    x = torch.randn(3, 8)
    out = model(x)
    with ak.disable_adapters(model):
        assert not torch.allclose(out, model(x))
    ak.register_architecture("Tiny", spec)
    try:
        ak.add_adapter(model, "b", "pfeiffer")  # model_type falls back to the class name
        assert "b" in ak.list_adapters(model)
    finally:
        del ak.ARCHITECTURES["Tiny"]


def test_delete_adapter_restores_model(bert):
    inputs = make_inputs("bert")
    keys = set(bert.state_dict())
    base = bert(**inputs).logits
    ak.add_adapter(bert, "a", "parallel", activate=True)
    ak.add_adapter(bert, "b", "lora", activate=True)
    ak.merge_adapter(bert, "b")
    ak.delete_adapter(bert, "a")
    ak.delete_adapter(bert, "b")
    assert set(bert.state_dict()) == keys and ak.active_adapters(bert) == ()
    assert not any(m._forward_hooks for m in bert.modules())
    torch.testing.assert_close(bert(**inputs).logits, base, atol=1e-6, rtol=0)


def test_stacked_active_adapters_apply_in_order(bert):
    inputs = make_inputs("bert")
    ak.add_adapter(bert, "a", "lora")
    ak.add_adapter(bert, "b", "pfeiffer")
    randomize_adapters(bert)
    ak.set_active(bert, ["a", "b"])
    both = bert(**inputs).logits
    ak.set_active(bert, "a")
    assert not torch.allclose(both, bert(**inputs).logits)
    assert ak.active_adapters(bert) == ("a",)


def test_disable_is_per_thread(bert):
    inputs = make_inputs("bert")
    ak.add_adapter(bert, "a", "lora", activate=True)
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = ak.active_adapters(bert)
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with ak.disable_adapters(bert):
        seen["here"] = ak.active_adapters(bert)
        inside.set()
        release.wait()
    thread.join()
    assert seen == {"here": (), "other": ("a",)}
    assert bert(**inputs).logits is not None


def test_disable_refuses_while_merged(bert):
    ak.add_adapter(bert, "a", "lora", activate=True)
    ak.merge_adapter(bert, "a")
    with pytest.raises(ak.AdapterError, match="unmerge"), ak.disable_adapters(bert):
        pass
    with pytest.raises(ak.AdapterError, match="merged"):
        ak.train_adapter(bert, "a")


def test_deepcopy_is_independent(bert):
    inputs = make_inputs("bert")
    ak.add_adapter(bert, "a", "parallel", activate=True)
    randomize_adapters(bert)
    expected = bert(**inputs).logits
    twin = copy.deepcopy(bert)
    torch.testing.assert_close(twin(**inputs).logits, expected, atol=0, rtol=0)
    ak.delete_adapter(twin, "a")
    torch.testing.assert_close(bert(**inputs).logits, expected, atol=0, rtol=0)


def test_model_keeps_class_and_save_pretrained(bert, tmp_path):
    ak.add_adapter(bert, "a", "lora", activate=True)
    assert type(bert) is T.BertForSequenceClassification
    bert.save_pretrained(tmp_path / "full")
    again = T.BertForSequenceClassification.from_pretrained(tmp_path / "full")
    assert torch.equal(again.bert.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight)


def test_gpt2_generate_with_adapter():
    model = make_model("gpt2")
    ak.add_adapter(model, "a", "houlsby", activate=True)
    randomize_adapters(model)
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    with ak.disable_adapters(model):
        assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_vit_classifier_gets_head_gradient():
    model = make_model("vit")
    ak.add_adapter(model, "a", "lora")
    ak.train_adapter(model, "a")
    model(**make_inputs("vit")).logits.sum().backward()
    assert model.classifier.weight.grad is not None
    assert not model.vit.embeddings.patch_embeddings.projection.weight.requires_grad


def test_transformers_trainer_trains_only_adapter_and_head(bert, tmp_path):
    ak.add_adapter(bert, "a", "pfeiffer")
    ak.train_adapter(bert, "a")
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 100, (6,), generator=g), "labels": i % 2} for i in range(16)]
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, report_to=[]
    )
    T.Trainer(model=bert, args=args, train_dataset=data).train()
    changed = {k for k, v in bert.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapterkit.a." in k or k.startswith("classifier.") for k in changed)
    assert any(".adapterkit.a." in k for k in changed)


def test_use_is_per_thread_and_per_task():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    model = make_model("bert", head=False)
    for name in ("a", "b"):
        ak.add_adapter(model, name, "lora")
    randomize_adapters(model)
    x = make_inputs("bert")

    def run(names):
        with ak.use(model, names), torch.no_grad():
            return model(**x).last_hidden_state

    expected = {n: run(n) for n in ("a", "b", None)}
    assert not torch.allclose(expected["a"], expected["b"])
    with ThreadPoolExecutor(4) as pool:
        jobs = [(n, pool.submit(run, n)) for n in ["a", "b", None] * 8]
        for name, job in jobs:
            torch.testing.assert_close(job.result(), expected[name], atol=0, rtol=0)

    async def task(name):
        with ak.use(model, name):
            await asyncio.sleep(0.01)  # the other task switches adapters meanwhile
            assert ak.active_adapters(model) == ((name,) if name else ())
            with torch.no_grad():
                return model(**x).last_hidden_state

    async def both():
        return await asyncio.gather(task("a"), task("b"), task(None))

    for name, out in zip(["a", "b", None], asyncio.run(both()), strict=True):
        torch.testing.assert_close(out, expected[name], atol=0, rtol=0)
    assert ak.active_adapters(model) == ()
    ak.merge_adapter(model, "a")
    with pytest.raises(ak.AdapterError, match="merged"), ak.use(model, "b"):
        pass
