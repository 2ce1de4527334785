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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterkit.core import images
from adapterkit.core.images import open_image
from adapterkit.core.methods import AdapterConfig, ImageConfig, union
from adapterkit.training.tables import DataError, Table
from adapterkit.training.tasks.base import Example, pack_batch, pad_batch
from adapterkit.training.tasks.lm import Chat, conversation
from adapterkit.training.tasks.text import Classification


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


class ImageChat(Chat):
    """Conversations whose user turns hold images (``--task image-chat``), LLaVA's recipe: a trainable projector
    from a frozen vision encoder (``--vision-encoder``) into the frozen LLM's embeddings, in a union with the
    ``--adapter`` family on the LLM; the loss is on the assistant's turns, as ``chat``.

    A message's ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` and ``{"type":
    "image", "image": <a path relative to the data file, or the file's bytes>}``. The encoder is frozen, so
    each image's features are computed once, when the rows are read.
    """

    name = "image-chat"
    group_by_length = False  # every row of the demo's data has about one length

    def prepare(self, config: Any) -> None:
        if not config.vision_encoder:
            raise DataError("--task image-chat needs --vision-encoder (the vision model's folder, e.g. DINOv2)")
        self.vision = images.encoder(config.vision_encoder, config.image_size, config.image_pool)
        self.image = ImageConfig(
            encoder=config.vision_encoder,
            features=self.vision.width,
            image_size=config.image_size,
            patch=self.vision.patch,
            pool=config.image_pool,
            image_token_id=0,  # set from the tokenizer in encode
        )

    def adapter_config(self, config: AdapterConfig) -> AdapterConfig:
        return union(self.image, config)

    def encode(self, table: Table, tokenizer) -> list[Example]:
        self.image = self.image.replace(image_token_id=images.image_token(tokenizer))
        placeholder = tokenizer.convert_ids_to_tokens(self.image.image_token_id) * self.image.tokens
        column = table.column(self.text_column, "--text-column")
        examples = []
        for i, value in enumerate(column):
            messages, pictures = self._messages(table, i, value, placeholder)
            example = self._example(table, i, tokenizer, messages)
            if example["input_ids"].count(self.image.image_token_id) != len(pictures) * self.image.tokens:
                raise table.fail(i, self.text_column, "--max-length cuts an image (or the text holds the image token)")
            example["image_features"] = self.vision(pictures).numpy() if pictures else None
            examples.append(example)
        return examples

    def _messages(self, table: Table, row: int, value: Any, placeholder: str) -> tuple[list[dict[str, str]], list]:
        """The row's conversation with its images as placeholders (checked as ``chat`` checks it), and the images."""
        try:
            raw = json.loads(value) if isinstance(value, str) else value
            parts = [
                {**m, "content": [self._part(table, row, p) for p in m["content"]]}
                if isinstance(m.get("content"), list)
                else m
                for m in raw
            ]
            messages, pictures = images.flatten(parts, placeholder)
        except (ValueError, TypeError, AttributeError) as e:  # ImageError is a ValueError
            raise table.fail(row, self.text_column, f"expected a list of messages with image parts ({e})") from None
        return conversation(table, row, self.text_column, messages), pictures

    def _part(self, table: Table, row: int, part: Any) -> Any:
        """An image part's file read (paths are relative to the data file); other parts as they are."""
        if not isinstance(part, dict) or part.get("type") != "image" or not isinstance(part.get("image"), str):
            return part
        data, _ = _image_bytes(table, row, part.get("image"), self.text_column)
        return {"type": "image", "image": data}

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_batch(examples, pad_id) | {"image_features": _features(examples)}

    def pack(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return pack_batch(examples) | {"image_features": _features(examples)}

    def loss(self, model, batch):
        rest = dict(batch)
        with images.feeding(rest.pop("image_features")):
            return super().loss(model, rest)

    def predict(self, model, batch):
        rest = dict(batch)
        with images.feeding(rest.pop("image_features")):
            return super().predict(model, rest)


def _features(examples: Sequence[Example]) -> torch.Tensor:
    """The examples' image features in row order, ``(images, tokens, width)`` (rows without images add none)."""
    found = [e["image_features"] for e in examples if e.get("image_features") is not None]
    return torch.from_numpy(np.concatenate(found)) if found else torch.zeros(0, 1)
