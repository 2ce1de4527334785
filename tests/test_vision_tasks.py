"""``adapterkit train --task image-classification``: images by path or bytes through the model's image
processor, a trained head and adapter that predict the training images; hostile image files refused."""

import io
import json

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from adapterkit.apps import cli
from adapterkit.training import DataError, evaluate_output
from adapterkit.training.tables import Table
from adapterkit.training.tasks.image import open_image


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def two_kinds(n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """Dark and bright 16 x 16 RGB noise images: separable by a linear head on the mean patch token."""
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        image = rng.integers(0, 100, (16, 16, 3), dtype=np.uint8) + (i % 2) * 120
        out.append((image.astype(np.uint8), "bright" if i % 2 else "dark"))
    return out


@pytest.fixture
def dinov2(tmp_path):
    torch.manual_seed(0)
    config = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8)
    T.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    T.BitImageProcessorPil(size={"height": 16, "width": 16}, do_center_crop=False).save_pretrained(tmp_path / "dinov2")
    return tmp_path / "dinov2"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_train_on_image_files_and_bytes(dinov2, tmp_path):
    rows = []
    for i, (image, label) in enumerate(two_kinds(32)):
        (tmp_path / f"{i}.png").write_bytes(png(image))
        rows.append({"image": f"{i}.png", "label": label})
    write_jsonl(tmp_path / "train.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [png(image) for image, _ in two_kinds(16, seed=1)]  # bytes in a Parquet column
    labels = [label for _, label in two_kinds(16, seed=1)]
    pq.write_table(pa.table({"image": images, "label": labels}), tmp_path / "val.parquet")
    args = ["train", "--task", "image-classification", "--model", str(dinov2), "--data", str(tmp_path / "train.jsonl"),
            "--validation", str(tmp_path / "val.parquet"), "--adapter", "lora", "--lr", "1e-2", "--epochs", "4",
            "--batch-size", "8", "--output", str(tmp_path / "o")]  # fmt: skip
    assert cli.main(args) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["selection_metric"] == "accuracy" and metrics["best"] >= 0.9  # chance is 0.5
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()
    scores = evaluate_output(str(dinov2), tmp_path / "o", str(tmp_path / "val.parquet"))
    assert scores["accuracy"] == pytest.approx(metrics["best"], abs=1e-9)  # the kept adapter, reloaded


def table(tmp_path) -> Table:
    return Table(str(tmp_path / "data.jsonl"), [{}], ["line 1"])


def test_hostile_images_are_clear_errors(tmp_path, monkeypatch):
    from adapterkit.training.tasks.image import decode_image

    good = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))  # incompressible
    assert open_image(good).size == (64, 64)
    with pytest.raises(ValueError, match="damaged"):
        open_image(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="not an image in a known format"):
        open_image(b"%PDF-1.4 not a picture")
    with pytest.raises(ValueError, match="not an image in a known format"):
        open_image(b"GIF89a" + b"\x00" * 4)  # a polyglot's header, nothing behind it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4,096 pixels: over 2x the limit
    with pytest.raises(ValueError, match="refused: .*decompression bomb"):
        open_image(good)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit but under 2x: Pillow only warns
    with pytest.raises(ValueError, match="refused"):
        open_image(good)
    with pytest.raises(DataError, match=r"data\.jsonl, line 1, column 'image': .*missing\.png"):
        decode_image(table(tmp_path), 0, "missing.png", "image")
    with pytest.raises(DataError, match="line 1, column 'image': image bytes: not an image"):
        decode_image(table(tmp_path), 0, b"nope", "image")
    with pytest.raises(DataError, match="expected an image file path or bytes, got int"):
        decode_image(table(tmp_path), 0, 7, "image")
