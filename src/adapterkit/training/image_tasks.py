"""Image classification for ``adapterkit train --task image-classification``.

Rows hold an ``image`` (a file path, relative to the data file, or the file's bytes; also a ``datasets``
Image value ``{"bytes": ..., "path": ...}``) and a ``label``. Images go through the model folder's image
processor (``preprocessor_config.json``) and a transformers ``AutoModelForImageClassification`` (for DINOv2 a
linear head on [CLS] and the mean patch token; for ViT on [CLS]).

Image files are input from outside: they are decoded with Pillow from a short list of formats, under Pillow's
decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, raised as an error, not a warning), and a file that
does not decode names its row and column.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterkit.training.tables import Table
from adapterkit.training.tasks import TASKS, Classification, Example

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # what Pillow may try to decode


class ImageProcessing:
    """The image processor in the place of a tokenizer: ``pad_token_id`` (unused) and ``save_pretrained``
    for ``adapterkit train``; not callable, so no text routing signature is computed from image paths."""

    pad_token_id = 0

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def save_pretrained(self, path: str | Path) -> None:
        self.processor.save_pretrained(path)


class ImageClassification(Classification):
    """One class per image; accuracy and macro F1 (the text task's metrics)."""

    name, auto_class = "image-classification", "AutoModelForImageClassification"

    def __init__(self, text_column: str, label_column: str, max_length: int, labels: list[str] | None = None):
        # the input column is "image" unless named (--text-column): "text", the text tasks' default, is not
        super().__init__("image" if text_column == "text" else text_column, label_column, max_length, labels)

    @staticmethod
    def load_preprocessor(model: str) -> ImageProcessing:
        """The model folder's image processor (``preprocessor_config.json``)."""
        from transformers import AutoImageProcessor

        from adapterkit.core.pretrained import from_pretrained

        return ImageProcessing(from_pretrained(AutoImageProcessor, model))

    def encode(self, table: Table, tokenizer: ImageProcessing) -> list[Example]:
        images = table.column(self.text_column, "--text-column")
        labels = self._label_index(table)
        examples = []
        for i, (value, label) in enumerate(zip(images, labels, strict=True)):
            pixels = tokenizer.processor(decode_image(table, i, value, self.text_column), return_tensors="np")
            examples.append({"pixel_values": pixels["pixel_values"][0].astype(np.float32), "labels": label})
        return examples

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.stack([e["pixel_values"] for e in examples]))
        return {"pixel_values": pixels, "labels": torch.tensor([e["labels"] for e in examples])}


def decode_image(table: Table, row: int, value: Any, column: str):
    """Row ``row``'s image as an RGB Pillow image, or a :class:`DataError` naming the row and the problem."""
    data, where = _image_bytes(table, row, value, column)
    try:
        return open_image(data)
    except ValueError as e:
        raise table.fail(row, column, f"{where}: {e}") from e


def open_image(data: bytes):
    """Decode ``data`` (a whole image file) to RGB; ``ValueError`` for anything Pillow will not decode safely:
    an unknown or truncated file, or more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"refused: {e}") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"not an image in a known format ({', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ValueError(f"a damaged image file ({e})") from e


def _image_bytes(table: Table, row: int, value: Any, column: str) -> tuple[bytes, str]:
    if isinstance(value, dict):  # a datasets Image value
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "image bytes"
    if not isinstance(value, str):
        raise table.fail(row, column, f"expected an image file path or bytes, got {type(value).__name__}")
    path = Path(value) if Path(value).is_absolute() else Path(table.path).parent / value
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise table.fail(row, column, f"cannot read {path} ({e.strerror or e})") from e


TASKS[ImageClassification.name] = ImageClassification  # imported by training.loop, so make_task finds it
