"""Folders saved by peft 0.21.2 and AdapterHub adapters 1.3.0 load through ``ak.load_adapter`` and give
the outputs the peer recorded (``tests/fixtures/make_peer_fixtures.py``), to 1e-5."""

import json
from pathlib import Path

import pytest
import torch
from fixtures.make_peer_fixtures import base_model
from safetensors.torch import load_file

import adapterkit as ak

PEERS = Path(__file__).parent / "fixtures" / "peers"
REFUSED = {"adapters-gpt2-parallel": "residual stream before the LayerNorm"}  # outputs would differ
CASES = sorted(p.name for p in PEERS.iterdir() if p.is_dir() and p.name not in REFUSED)


def peer_base(meta: dict):
    model = base_model(meta["model"])
    state = load_file(PEERS / f"{meta['lib']}-{meta['model']}-base.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing, missing  # transformers 4.57's GPT-2 also saved its causal-mask buffers
    return model


def outputs(model, io: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"])
    return out.logits if "logits" in io else out.last_hidden_state


def test_every_fixture_is_covered():
    assert len(CASES) == 23
    assert {json.loads((PEERS / c / "meta.json").read_text())["lib"] for c in CASES} == {"adapters", "peft"}


@pytest.mark.parametrize("case", CASES)
def test_peer_folder_loads_with_the_same_outputs(case):
    folder = PEERS / case
    meta = json.loads((folder / "meta.json").read_text())
    model = peer_base(meta)
    io = load_file(folder / "io.safetensors")
    base = outputs(model, io)
    name = ak.load_adapter(model, folder / "adapter", activate=True)
    ours = outputs(model, io)
    expected = io.get("logits", io.get("last_hidden_state"))
    real = io["attention_mask"].bool() if ours.shape[:2] == io["attention_mask"].shape else slice(None)
    assert not torch.allclose(base[real], expected[real], atol=1e-3), "the peer's adapter had no effect"
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    assert name == ("a" if meta["lib"] == "adapters" else "default")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_adapterkit_cannot_reproduce_is_refused_before_any_change(case):
    model = peer_base(json.loads((PEERS / case / "meta.json").read_text()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ak.AdapterFileError, match=REFUSED[case]):
        ak.load_adapter(model, PEERS / case / "adapter")
    assert ak.list_adapters(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
