"""Speech recognition with a CTC head: audio files or arrays to characters."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterkit.training.tables import Table
from adapterkit.training.tasks.base import Example, Task, labels_tensor


class CTC(Task):
    """Speech recognition: 16 kHz mono audio (a WAV path, relative to the data file, or samples) and its text."""

    name, auto_class = "ctc", "AutoModelForCTC"
    metrics = ("cer", "wer")
    lower_is_better = frozenset({"cer", "wer"})
    BLANK = "<blank>"

    def fit_labels(self, table: Table) -> None:
        chars = {c for text in table.column(self.label_column, "--label-column") for c in str(text)}
        self.labels = [self.BLANK, *sorted(chars)]

    def model_kwargs(self):
        return {"vocab_size": len(self.labels), "pad_token_id": 0, "ctc_loss_reduction": "mean"}

    def encode(self, table: Table, tokenizer) -> list[Example]:
        index = {c: i for i, c in enumerate(self.labels)}
        audio = table.column(self.text_column, "--text-column")
        texts = [str(t) for t in table.column(self.label_column, "--label-column")]
        examples = []
        for i, (source, text) in enumerate(zip(audio, texts, strict=True)):
            unknown = [c for c in text if c not in index]
            if unknown:
                raise table.fail(i, self.label_column, f"character {unknown[0]!r} is not in the training texts")
            samples = _audio(table, i, source, self.text_column)
            samples = (samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)
            examples.append({"input_values": samples.astype(np.float32), "labels": [index[c] for c in text]})
        return examples

    def collate(self, examples, pad_id):
        width = max(len(e["input_values"]) for e in examples)
        values = torch.zeros(len(examples), width)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        for row, e in enumerate(examples):
            values[row, : len(e["input_values"])] = torch.from_numpy(e["input_values"])
            mask[row, : len(e["input_values"])] = 1
        return {
            "input_values": values,
            "attention_mask": mask,
            "labels": labels_tensor([e["labels"] for e in examples]),
        }

    def predict(self, model, batch):
        best = model(**batch).logits.argmax(-1)
        texts = []
        for row in best.tolist():
            kept = [k for j, k in enumerate(row) if k != 0 and (j == 0 or k != row[j - 1])]
            texts.append("".join(self.labels[k] for k in kept))
        return texts

    def gold(self, examples):
        return ["".join(self.labels[k] for k in e["labels"]) for e in examples]

    def score(self, predicted, gold):
        from adapterkit.speech.metrics import cer, wer

        return {"cer": cer(gold, predicted), "wer": wer(gold, predicted)}


def _audio(table: Table, i: int, source: Any, column: str) -> np.ndarray:
    if not isinstance(source, str):
        return np.asarray(source, dtype=np.float64)
    path = Path(source) if Path(source).is_absolute() else Path(table.path).parent / source
    try:
        with wave.open(str(path), "rb") as f:
            if (f.getframerate(), f.getnchannels(), f.getsampwidth()) != (16000, 1, 2):
                raise table.fail(i, column, f"{path}: expected 16 kHz mono 16-bit WAV")
            raw = f.readframes(f.getnframes())
    except (OSError, wave.Error, EOFError) as e:
        raise table.fail(i, column, f"cannot read {path} ({e})") from e
    return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
