"""The speech demo: adapters against full fine-tuning on synthesised speech, chosen on validation.

``adapterkit speech-demo [--quick] [--model tiny.en|base]``: for each method (full fine-tuning,
Houlsby, LoRA, prefix, E, L, EL; ELP where the backbone allows it) and each task a fresh copy of
Whisper is tuned on the training speakers, its learning rate and epoch chosen on the validation
speakers (the grid is :data:`ROWS`' learning rates x every epoch), and the choice scored once on
the test speakers:

* ASR, the way Whisper is adapted in practice: its own sequence-to-sequence loss, decoded with
  ``generate()``, on fast, noisy commands naming people it never heard of (WER; the untouched
  model is scored too). Houlsby, LoRA and prefix adapt the encoder and the decoder; the E-adapter
  is an encoder adapter. The L-adapter replaces the encoder's output by a mix of its un-normalised
  layers, which the pre-trained decoder cannot read, so L and EL are left out of ASR.
* speaker verification (EER of cosine trials between held-out speakers, with a bootstrap 95%
  interval over trials) and emotion (accuracy): the encoder with a task head.

Whisper's encoder sees a 3 s window (150 positions of its 1500). E and L use bottlenecks 64 and
128: the papers' 256 and 512 are for 768/1024-wide encoders, Whisper tiny is 384 wide. Data:
:mod:`adapterkit.apps.speech_data`. The encoder-only path (a CTC head, for wav2vec 2.0 and kin)
is not in the table: from scratch on this budget it does not learn (CER 76-100% before), which
says nothing about adapters; tests/test_speech_heads.py tests it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.apps import speech_data
from adapterkit.apps.ct2whisper import load_tokenizer, load_whisper
from adapterkit.core import adapters
from adapterkit.core.arch import WHISPER_SEQ2SEQ
from adapterkit.core.methods import EAdapterConfig, LAdapterConfig, PAdapterConfig, UnionConfig
from adapterkit.errors import ConfigError
from adapterkit.speech import heads, metrics
from adapterkit.training.fit import Loop, Schedule

WINDOW = 3.0  # seconds: 300 mel frames, 150 encoder frames
E, L = EAdapterConfig(bottleneck_size=64), LAdapterConfig(bottleneck_size=128)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    preset: Any  # a preset name or config; None: full fine-tuning
    rates: tuple[float, ...]  # the learning-rate grid, chosen on validation
    decoder: bool = True  # in ASR, also adapt the decoder (an encoder adapter says False)
    asr: str | None = None  # why the row does not apply to ASR, if it does not


NOT_ASR = "replaces the encoder output the pre-trained decoder reads"
ROWS = [
    Row("full fine-tuning", None, (3e-5, 1e-4)),
    Row("Houlsby", "houlsby", (1e-3, 3e-3)),
    Row("LoRA", "lora", (1e-3, 3e-3)),
    Row("prefix", "prefix", (1e-3, 3e-3)),
    Row("E", E, (1e-3, 3e-3), decoder=False),
    Row("L", L, (1e-3, 3e-3), asr=NOT_ASR),
    Row("EL", UnionConfig([E, L]), (1e-3, 3e-3), asr=NOT_ASR),
    Row("ELP", UnionConfig([E, L, PAdapterConfig()]), (1e-3, 3e-3), asr=NOT_ASR),
]
TASKS = ("asr", "speaker", "emotion")
LOWER_IS_BETTER = {"asr": True, "speaker": True, "emotion": False}
BATCH = 16
TRIALS = 8  # verification trials per utterance, half of them same-speaker
HEAD_LR = 1e-3  # every row's task head


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Training utterances and epochs per task; validation and test utterances (None: all)."""

    train: dict[str, int]
    epochs: dict[str, int]
    validation: int
    test: int | None


FULL = Sizes({"asr": 240, "speaker": 480, "emotion": 192}, {"asr": 3, "speaker": 3, "emotion": 2}, 96, None)
QUICK = Sizes({"asr": 128, "speaker": 384, "emotion": 96}, {"asr": 2, "speaker": 2, "emotion": 2}, 48, 64)
# --quick: three rows, one learning rate each (what the full run's validation chose), so it fits 4 minutes.
QUICK_RATES = {"full fine-tuning": 1e-4, "LoRA": 3e-3, "EL": 3e-3}


@dataclasses.dataclass
class Split:
    features: torch.Tensor  # (N, 80, 300)
    valid: torch.Tensor  # (N, 150) encoder frames with speech
    labels: list[str]


def prepare(task: str, split: str, limit: int | None, seconds: float = WINDOW) -> Split:
    from transformers import WhisperFeatureExtractor

    audio, labels = speech_data.load(task, split, limit=limit)
    extractor = WhisperFeatureExtractor(chunk_length=int(seconds))
    features = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    frames = features.shape[-1] // 2
    lengths = torch.tensor([min(frames, -(-len(a) // 320)) for a in audio])
    return Split(features, torch.arange(frames)[None] < lengths[:, None], labels)


# -- ASR through Whisper's decoder ------------------------------------------------------------------
def prompt_ids(model: nn.Module) -> list[int]:
    """The tokens Whisper's decoder starts a transcript with: start, [English, transcribe,] no timestamps."""
    config = model.generation_config
    language = [config.lang_to_id["<|en|>"], config.task_to_id["transcribe"]] if config.is_multilingual else []
    return [config.decoder_start_token_id, *language, config.no_timestamps_token_id]


def targets(model: nn.Module, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decoder_input_ids, labels)``: prompt + text + end, shifted; the prompt's own tokens are not scored."""
    prompt, end = prompt_ids(model), model.generation_config.eos_token_id
    rows = [prompt + tokenizer.encode(" " + text, add_special_tokens=False) + [end] for text in texts]
    width = max(map(len, rows)) - 1
    inputs = torch.full((len(rows), width), end)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        labels[i, len(prompt) - 1 : len(row) - 1] = torch.tensor(row[len(prompt) :])
    return inputs, labels


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


@torch.no_grad()
def transcribe(model: nn.Module, tokenizer, features: torch.Tensor) -> list[str]:
    """Greedy transcripts with Whisper's ``generate()``, 32 utterances at a time."""
    model.eval()
    config = model.generation_config
    language = {"language": "en", "task": "transcribe"} if config.is_multilingual else {}
    out = []
    for i in range(0, len(features), 32):
        ids = model.generate(input_features=features[i : i + 32], max_new_tokens=24, **language)
        out += [normalise(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


# -- the tasks --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """One run's model, head and trainable parameters for one task."""

    model: nn.Module  # the whole Whisper (ASR) or its encoder
    head: nn.Module | None
    classes: list[str]


def setup(base: nn.Module, row: Row, task: str, train: Split) -> Setup:
    torch.manual_seed(0)  # adapter and head initial values: each cell reproducible on its own
    model = copy.deepcopy(base if task == "asr" else base.model.encoder)
    if row.preset is not None:
        arch = WHISPER_SEQ2SEQ if task == "asr" and row.decoder else None
        adapters.add_adapter(model, "task", row.preset, arch=arch)
        adapters.train_adapter(model, "task", train_head=False)
    classes = sorted(set(train.labels))
    dim = base.config.d_model
    head = None if task == "asr" else heads.SpeakerHead(dim, len(classes)) if task == "speaker" else (
        heads.UtteranceHead(dim, len(classes), pooling="attentive"))  # fmt: skip
    return Setup(model, head, classes)


def step_loss(s: Setup, task: str, tokenizer, train: Split, rows: torch.Tensor) -> torch.Tensor:
    labels = [train.labels[i] for i in rows]
    if task == "asr":
        inputs, scored = targets(s.model, tokenizer, labels)
        return s.model(input_features=train.features[rows], decoder_input_ids=inputs, labels=scored).loss
    h = s.model(train.features[rows]).last_hidden_state
    wanted = torch.tensor([s.classes.index(label) for label in labels])
    if task == "speaker":
        return s.head.loss(s.head(h, train.valid[rows]), wanted)
    return nn.functional.cross_entropy(s.head(h, train.valid[rows]), wanted)


@torch.no_grad()
def embed(s: Setup, split: Split) -> torch.Tensor:
    s.model.eval(), s.head.eval()
    outs = [s.head(s.model(split.features[i : i + 32]).last_hidden_state, split.valid[i : i + 32])
            for i in range(0, len(split.labels), 32)]  # fmt: skip
    return torch.cat(outs)


def trial_scores(s: Setup, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores and same-speaker flags of the split's verification trials."""
    vectors, pairs = embed(s, split), speech_data.trials(split.labels, per_utterance=TRIALS)
    first, second = zip(*[(vectors[i], vectors[j]) for i, j, _ in pairs], strict=True)
    return heads.cosine_scores(torch.stack(first), torch.stack(second)), torch.tensor([same for *_, same in pairs])


def score(s: Setup, task: str, tokenizer, split: Split) -> dict[str, Any]:
    """``{"score": ...}`` (WER, EER or accuracy, as a fraction), with a 95% interval for EER."""
    if task == "asr":
        return {"score": metrics.wer(split.labels, transcribe(s.model, tokenizer, split.features))}
    if task == "speaker":
        scores, same = trial_scores(s, split)
        return {"score": metrics.eer(scores, same), "interval": metrics.eer_interval(scores, same)}
    predicted = [s.classes[k] for k in embed(s, split).argmax(-1).tolist()]
    return {"score": float(np.mean([p == t for p, t in zip(predicted, split.labels, strict=True)]))}


def trainable(s: Setup) -> list[nn.Parameter]:
    return [p for p in s.model.parameters() if p.requires_grad]


def fit(base: nn.Module, row: Row, lr: float, task: str, tokenizer, splits: dict[str, Split], epochs: int) -> dict:
    """Train one (row, learning rate); keep the epoch that scores best on validation."""
    train, validation = splits["train"], splits["validation"]
    s = setup(base, row, task, train)
    groups = [{"params": trainable(s), "lr": lr}]
    groups += [{"params": list(s.head.parameters()), "lr": HEAD_LR}] if s.head is not None else []
    generator = torch.Generator().manual_seed(0)
    modules = [m for m in (s.model, s.head) if m is not None]
    loop = Loop(groups, Schedule(lr, epochs * math.ceil(len(train.labels) / BATCH)), modules=modules)
    best: dict[str, Any] = {"validation": None}
    sign = 1 if LOWER_IS_BETTER[task] else -1

    def on_epoch(epoch: int) -> bool:
        value = score(s, task, tokenizer, validation)["score"]
        if best["validation"] is None or sign * value < sign * best["validation"]:
            kept = [p.detach().clone() for g in groups for p in g["params"]]
            best.update(validation=value, epoch=epoch + 1, kept=kept)
        return False

    start = time.perf_counter()
    batches = lambda epoch: torch.randperm(len(train.labels), generator=generator).split(BATCH)  # noqa: E731
    loop.run(batches, lambda rows: step_loss(s, task, tokenizer, train, rows), on_epoch=on_epoch, show=False)
    with torch.no_grad():
        for p, value in zip([p for g in groups for p in g["params"]], best.pop("kept"), strict=True):
            p.copy_(value)
    return {**best, "lr": lr, "setup": s, "trainable": sum(p.numel() for p in trainable(s)),
            "seconds": time.perf_counter() - start}  # fmt: skip


def cell(base: nn.Module, row: Row, task: str, tokenizer, splits: dict[str, Split], epochs: int) -> dict:
    """The row's grid on one task: the validation's choice, scored on the test speakers."""
    if task == "asr" and row.asr:
        return {"refused": row.asr}
    runs = [fit(base, row, lr, task, tokenizer, splits, epochs) for lr in row.rates]
    sign = 1 if LOWER_IS_BETTER[task] else -1
    chosen = min(runs, key=lambda r: sign * r["validation"])
    test = score(chosen.pop("setup"), task, tokenizer, splits["test"])
    grid = {r["lr"]: r["validation"] for r in runs}
    return {**chosen, **test, "grid": grid, "seconds": sum(r["seconds"] for r in runs)}


def untouched(model: str, tokenizer, limit: int | None) -> dict:
    """The model as it ships, with its own 30 s window (on a 3 s one, untrained, it repeats itself)."""
    test = prepare("asr", "test", limit, seconds=30.0)
    return {
        "score": metrics.wer(test.labels, transcribe(load_whisper(model), tokenizer, test.features)),
        "trainable": 0,
    }


# -- the table --------------------------------------------------------------------------------------
def shown(result: dict, task: str) -> str:
    if "refused" in result:
        return "n/a"
    text = f"{100 * result['score']:.1f}"
    if "interval" in result:
        text += " [{:.1f}, {:.1f}]".format(*(100 * v for v in result["interval"]))
    return text


def table(results: dict[str, dict[str, Any]], sizes: dict[str, int]) -> str:
    lines = [
        "| method | trainable params, ASR (% of Whisper) | trainable params, encoder tasks (% of encoder) "
        "| ASR WER % | ASV EER % [95% CI] | emotion acc % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in results.items():
        if "refused" in row:
            lines.append(f"| {label} | - | - | n/a: {row['refused']} | | |")
            continue
        counts = [_share(row.get(task), sizes[key]) for task, key in (("asr", "whisper"), ("speaker", "encoder"))]
        cells = [shown(row[task], task) if task in row else "" for task in TASKS]
        lines.append(f"| {label} | {' | '.join(counts)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _share(result: dict | None, total: int) -> str:
    if result is None or "trainable" not in result:
        return "-"
    return f"{result['trainable']:,} ({100 * result['trainable'] / total:.2f}%)"


def choices(results: dict[str, dict[str, Any]]) -> str:
    """What validation chose per cell: learning rate and epochs."""
    lines = ["| method | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for label, row in results.items():
        picked = [f"lr {row[t]['lr']:g}, {row[t]['epoch']} ep" if "lr" in row.get(t, {}) else "" for t in TASKS]
        lines.append(f"| {label} | " + " | ".join(picked) + " |")
    return "\n".join(lines)


def limit(sizes: Sizes, task: str, split: str) -> int | None:
    """How many utterances of a split to use: verification tests every trial among the test speakers."""
    if split == "train":
        return sizes.train[task]
    return None if (task, split) == ("speaker", "test") else getattr(sizes, split)


def main(quick: bool = False, output: str | None = None, threads: int | None = None, model: str = "tiny.en") -> dict:
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    sizes = QUICK if quick else FULL
    base, tokenizer = load_whisper(model, seconds=WINDOW), load_tokenizer(model)
    counts = {
        "whisper": sum(p.numel() for p in base.parameters()),
        "encoder": sum(p.numel() for p in base.model.encoder.parameters()),
    }
    splits = {t: {s: prepare(t, s, limit(sizes, t, s)) for s in speech_data.SPLITS} for t in TASKS}
    results: dict[str, dict[str, Any]] = {"untouched": {"asr": untouched(model, tokenizer, sizes.test)}}
    rows = (
        [dataclasses.replace(r, rates=(QUICK_RATES[r.label],)) for r in ROWS if r.label in QUICK_RATES]
        if quick
        else ROWS
    )
    for row in rows:
        try:
            results[row.label] = {t: cell(base, row, t, tokenizer, splits[t], sizes.epochs[t]) for t in TASKS}
        except ConfigError as e:
            results[row.label] = {"refused": str(e).split(";")[0]}
        print(f"  {row.label}: {results[row.label]}", flush=True)
    text = table(results, counts) + "\n\nChosen on validation:\n\n" + choices(results)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return results
