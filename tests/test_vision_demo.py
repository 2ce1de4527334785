"""The vision demo's pipeline on a tiny random DINOv2 (the real run: `adapterkit vision-demo`, see
benchmarks/results_vision.md): digits through the image processor, every row trained, the table's numbers."""

import dataclasses

import numpy as np
import torch
import transformers as T

from adapterkit.apps import vision_demo


def test_digits_split_is_fixed_and_complete():
    splits = vision_demo.digits()
    assert {k: len(v[1]) for k, v in splits.items()} == vision_demo.SPLIT
    assert sum(vision_demo.SPLIT.values()) == 1797
    again = vision_demo.digits()
    assert all(np.array_equal(splits[k][0], again[k][0]) for k in splits)
    assert splits["train"][0].dtype == np.uint8 and splits["train"][0].max() == 255


def test_every_row_on_a_tiny_dinov2(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    config = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8)
    T.Dinov2Model(config).save_pretrained(tmp_path / "m")
    T.BitImageProcessorPil(do_center_crop=False, size={"height": 16, "width": 16}).save_pretrained(tmp_path / "m")
    monkeypatch.setattr("adapterkit.apps.models.dinov2_small", lambda: tmp_path / "m")
    monkeypatch.setattr(vision_demo, "SIZE", 16)
    monkeypatch.setattr(vision_demo, "QUICK", {"train": 64, "validation": 32, "test": 32})
    fast = [dataclasses.replace(r, epochs=min(r.epochs, 5)) for r in vision_demo.RUNS]
    monkeypatch.setattr(vision_demo, "RUNS", fast)
    rows = vision_demo.main(quick=True, output=str(tmp_path / "t.md"), threads=1)
    assert [r["method"] for r in rows] == [r.label for r in vision_demo.RUNS]
    by = {r["method"]: r for r in rows}
    head = 2 * 32 * 10 + 10  # DINOv2's classifier reads [CLS] and the mean patch token
    assert by["head only"]["trainable"] == head and by["head only"]["bytes"] < 10_000
    assert by["full fine-tuning"]["percent"] == 100.0
    assert by["lora (r=8)"]["trainable"] == head + 2 * 2 * (8 * 32 + 32 * 8)  # q and v, 2 layers
    assert all(0 <= r["val"] <= 1 and 0 <= r["test"] <= 1 for r in rows)
    assert by["head only"]["bytes"] < by["lora (r=8)"]["bytes"] < by["full fine-tuning"]["bytes"]
    table = (tmp_path / "t.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "| prompt (10) |" in table
    assert "on digits at 16 px: train 64, validation 32, test 32" in capsys.readouterr().out
