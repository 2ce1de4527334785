"""Adapter banks: stacked per-site tables written when adapters come and go, bit-equal to PerRow."""

import pytest
import torch

import adapterkit as ak
from adapterkit.core.banks import Bank
from adapterkit.core.methods import lora
from adapterkit.errors import AdapterError

from conftest import first_output, make_inputs, make_model, randomize_adapters
from test_composition import ROWS, WHOLE_BATCH, inputs, two_adapters
from test_methods import PRESETS, UNSUPPORTED


@torch.no_grad()
def banked(model, bank, rows, x):
    with bank.use(rows):
        return first_output(model(**x))


@torch.no_grad()
def per_row(model, rows, x):
    with ak.use(model, ak.PerRow(rows)):
        return first_output(model(**x))


@pytest.mark.parametrize(
    "arch,preset",
    [(a, p) for a in ("bert", "gpt2", "llama") for p in PRESETS if p not in WHOLE_BATCH and (a, p) not in UNSUPPORTED],
)
def test_bank_gives_the_bits_of_per_row(arch, preset):
    model, x = two_adapters(arch, preset), inputs(arch)
    bank = Bank(model)
    expected = per_row(model, ROWS, x)
    assert (expected - per_row(model, [None] * 4, x)).abs().max() > 1e-3  # the adapters do something
    assert torch.equal(banked(model, bank, ROWS, x), expected)


def mixed_model():
    model = make_model("llama", head=False)
    for name, preset in [("l1", "lora"), ("i", "ia3"), ("p", "pfeiffer"), ("h", "houlsby"), ("l2", "lora")]:
        ak.add_adapter(model, name, preset)
    for k in range(3, 12):  # enough LoRAs to grow the bank's slots and a group's tables
        ak.add_adapter(model, f"l{k}", "lora")
    randomize_adapters(model)
    return model


def test_a_mix_of_methods_and_many_adapters_in_one_bank():
    model, x = mixed_model(), make_inputs("llama", batch=6, seq=5)
    bank = Bank(model)
    assert len(bank.slots) == 14 and bank.capacity == 16
    for rows in (["l1", "i", "p", "h", None, "l2"], ["l11", "l3", "l7", "i", "i", None], [None] * 6):
        assert torch.equal(banked(model, bank, rows, x), per_row(model, rows, x))


def test_steps_read_the_tables_written_at_load(monkeypatch):
    model, x = mixed_model(), make_inputs("llama", batch=4, seq=3)
    bank = Bank(model)
    calls = []
    monkeypatch.setattr(lora.LoRA, "row_tables", staticmethod(lambda modules: calls.append(1)))
    banked(model, bank, ["l1", "l5", "l9", None], x)
    assert calls == []  # no per-step stacking: the steps only gather


def test_evicted_and_replaced_adapters_leave_the_bank():
    model, x = mixed_model(), make_inputs("llama", batch=3, seq=4)
    bank = Bank(model)
    ak.delete_adapter(model, "l2")
    ak.delete_adapter(model, "l3")
    ak.add_adapter(model, "l3", "lora", r=4)  # same name, another adapter
    bank.sync()
    assert "l2" not in bank.slots and len(bank.slots) == 13
    randomize_adapters(model, seed=9)  # in place: the bank keeps its copies until told
    assert not torch.equal(banked(model, bank, ["l1"] * 3, x), per_row(model, ["l1"] * 3, x))
    bank.sync(reload=True)
    with pytest.raises(AdapterError, match="'l2' has no slot"):
        bank.rows(["l2", None, None])
    rows = ["l3", "l1", "p"]
    assert torch.equal(banked(model, bank, rows, x), per_row(model, rows, x))
    for name in list(bank.slots):
        ak.delete_adapter(model, name)
    bank.sync()
    assert bank.slots == {} and all(not site for site in bank.sites.values())  # nothing of them kept


def test_a_bank_of_some_adapters_and_the_checks_of_per_row():
    model = two_adapters("llama", "lora")
    assert list(Bank(model, names=["b"]).slots) == ["b"]
    ak.add_adapter(model, "whole", "unipelt")
    with pytest.raises(Exception, match="cannot run in PerRow"):
        Bank(model)
