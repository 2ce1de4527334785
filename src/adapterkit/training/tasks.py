"""The tasks ``adapterkit train`` knows: how rows become tensors, which model class, which metric.

Each task turns a :class:`~adapterkit.training.tables.Table` into examples (plain lists), batches
them with ``labels`` so the model computes its own loss, and scores predictions. Adding a task is
one class and one entry in :data:`TASKS`.
"""

from __future__ import annotations

import abc
import json
import math
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from adapterkit.training.tables import DataError, Table

Example = dict[str, Any]
IGNORE = -100  # label positions the loss skips (padding, continuation sub-words)


class Task(abc.ABC):
    """A task: ``encode``, ``predict`` and ``score`` are its own; ``labels`` is its label vocabulary
    (classes, tags or characters)."""

    name: ClassVar[str]
    auto_class: ClassVar[str]  # the transformers Auto* class
    metrics: ClassVar[tuple[str, ...]]  # the first is the default selection metric
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    group_by_length: ClassVar[bool] = False  # batch examples of similar length (see ``training.loop.epoch_batches``)
    packs: ClassVar[bool] = False  # ``pack`` works: the model keeps examples apart by their position ids

    def __init__(self, text_column: str, label_column: str, max_length: int, labels: list[str] | None = None):
        self.text_column, self.label_column, self.max_length = text_column, label_column, max_length
        self.labels = labels

    def fit_labels(self, table: Table) -> None:
        """Learn the label vocabulary from the training table (tasks without one keep ``None``)."""
        self.labels = None

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def prepare(self, config: Any) -> None:  # noqa: B027 - optional hook
        """Read what the task needs from the run's ``TrainConfig`` before the rows are encoded."""

    def adapter_config(self, config: Any) -> Any:
        """The adapter the run trains for the ``--adapter`` config (image-chat adds its projector)."""
        return config

    @abc.abstractmethod
    def encode(self, table: Table, tokenizer) -> list[Example]:
        """The table's rows as examples: ``input_ids`` (or ``input_values``) and ``labels``."""

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_batch(examples, pad_id)

    def pack(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """The examples as one row without padding (``--packing``; tasks whose ``packs`` is True)."""
        raise DataError(f"task {self.name} cannot pack its examples into one row; drop --packing")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch: the model's own."""
        return model(**batch).loss

    def loss_terms(self, examples: Sequence[Example]) -> int:
        """How many terms the loss of these examples averages: one per row."""
        return len(examples)

    @abc.abstractmethod
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[Any]:
        """One prediction per row of ``batch`` (a class, a value, tags, a text, or an NLL sum and count)."""

    def gold(self, examples: Sequence[Example]) -> list[Any]:
        return [example["labels"] for example in examples]

    @abc.abstractmethod
    def score(self, predicted: list[Any], gold: list[Any]) -> dict[str, float]:
        """The task's ``metrics`` from all predictions and their gold values."""

    def _label_index(self, table: Table) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        values = table.column(self.label_column, "--label-column")
        out = []
        for i, value in enumerate(values):
            if str(value) not in index:
                raise table.fail(i, self.label_column, f"unknown label {value!r}; the training data has {self.labels}")
            out.append(index[str(value)])
        return out


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``) and list-valued ``labels`` (with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": _labels([e["labels"] for e in examples])}


def pack_batch(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """The examples end to end in one row, as transformers' ``DataCollatorWithFlattening`` makes them.

    No padding and no attention mask: position ids restart at 0 with each example, from which the model
    builds a block-diagonal causal mask (transformers' ``find_packed_sequence_indices``, on sdpa and eager;
    flash attention reads them directly), so no token attends across examples and each sees the positions
    it has alone. Each example's first token is not a target: the previous example's last would predict it.
    """
    ids = [torch.tensor(e["input_ids"], dtype=torch.long) for e in examples]
    labels = [torch.tensor(e["labels"], dtype=torch.long) for e in examples]
    for row in labels:
        row[:1] = IGNORE
    positions = [torch.arange(len(row)) for row in ids]
    return {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(positions)[None],
        "labels": torch.cat(labels)[None],
    }


def _labels(values: list[Any]) -> torch.Tensor:
    if not isinstance(values[0], list):
        return torch.tensor(values)
    out = torch.full((len(values), max(map(len, values))), IGNORE, dtype=torch.long)
    for row, value in enumerate(values):
        out[row, : len(value)] = torch.tensor(value, dtype=torch.long)
    return out


class Classification(Task):
    name, auto_class = "classification", "AutoModelForSequenceClassification"
    metrics = ("accuracy", "f1")

    def fit_labels(self, table: Table) -> None:
        values = {str(v) for v in table.column(self.label_column, "--label-column")}
        numeric = all(v.lstrip("-").isdigit() for v in values)
        self.labels = sorted(values, key=int if numeric else str)
        if len(self.labels) < 2:
            raise DataError(f"{table.path}: column {self.label_column!r} has one label only ({self.labels})")

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels))}

    def encode(self, table: Table, tokenizer) -> list[Example]:
        texts = [str(t) for t in table.column(self.text_column, "--text-column")]
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [{"input_ids": i, "labels": y} for i, y in zip(ids, self._label_index(table), strict=True)]

    def predict(self, model, batch):
        return model(**batch).logits.argmax(-1).tolist()

    def score(self, predicted, gold):
        return {"accuracy": accuracy(predicted, gold), "f1": macro_f1(predicted, gold, len(self.labels))}


class Regression(Classification):
    name = "regression"
    metrics = ("pearson", "mse")
    lower_is_better = frozenset({"mse"})

    fit_labels = Task.fit_labels  # a value, no label vocabulary

    def model_kwargs(self):
        return {"num_labels": 1, "problem_type": "regression"}

    def _label_index(self, table: Table) -> list[float]:
        values = table.column(self.label_column, "--label-column")
        out = []
        for i, value in enumerate(values):
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise table.fail(i, self.label_column, f"{value!r} is not a number") from None
        return out

    def predict(self, model, batch):
        return model(**batch).logits[:, 0].tolist()

    def score(self, predicted, gold):
        p, g = np.asarray(predicted, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        pearson = float(np.corrcoef(p, g)[0, 1]) if p.std() > 0 and g.std() > 0 else 0.0
        return {"pearson": pearson, "mse": float(np.mean((p - g) ** 2))}


class TokenClassification(Task):
    """Tokens (a list, or a string split on spaces) and one tag per token; the first sub-word carries it."""

    name, auto_class = "token-classification", "AutoModelForTokenClassification"
    metrics = ("f1", "precision", "recall", "accuracy")  # entity-level (as seqeval/conlleval), token accuracy

    def _pairs(self, table: Table) -> list[tuple[list[str], list[str]]]:
        words = table.column(self.text_column, "--text-column")
        tags = table.column(self.label_column, "--label-column")
        pairs = []
        for i, (w, t) in enumerate(zip(words, tags, strict=True)):
            w = w.split() if isinstance(w, str) else list(w)
            t = t.split() if isinstance(t, str) else list(t)
            if len(w) != len(t):
                raise table.fail(i, self.label_column, f"{len(w)} tokens but {len(t)} tags")
            pairs.append((w, [str(tag) for tag in t]))
        return pairs

    def fit_labels(self, table: Table) -> None:
        self.labels = sorted({tag for _, tags in self._pairs(table) for tag in tags})

    def model_kwargs(self):
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels))}

    def loss_terms(self, examples):
        """One per tagged sub-word: the model's loss is their mean."""
        return max(1, sum(sum(y != IGNORE for y in e["labels"]) for e in examples))

    def encode(self, table: Table, tokenizer) -> list[Example]:
        index, examples = {tag: i for i, tag in enumerate(self.labels)}, []
        for i, (words, tags) in enumerate(self._pairs(table)):
            unknown = [t for t in tags if t not in index]
            if unknown:
                raise table.fail(
                    i, self.label_column, f"unknown tag {unknown[0]!r}; the training data has {self.labels}"
                )
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
            previous, labels = None, []
            for word in enc.word_ids():
                labels.append(IGNORE if word is None or word == previous else index[tags[word]])
                previous = word
            examples.append({"input_ids": enc["input_ids"], "labels": labels})
        return examples

    def predict(self, model, batch):
        best = model(**batch).logits.argmax(-1)
        return [row[gold != IGNORE].tolist() for row, gold in zip(best, batch["labels"], strict=True)]

    def gold(self, examples):
        return [[y for y in e["labels"] if y != IGNORE] for e in examples]

    def score(self, predicted, gold):
        """Entity-level precision, recall and F1 over every sentence's chunks, and token accuracy."""
        found, wanted = set(), set()
        for i, (p, g) in enumerate(zip(predicted, gold, strict=True)):
            found |= {(i, *chunk) for chunk in entities([self.labels[t] for t in p])}
            wanted |= {(i, *chunk) for chunk in entities([self.labels[t] for t in g])}
        hits = len(found & wanted)
        precision = hits / len(found) if found else float(not wanted)
        recall = hits / len(wanted) if wanted else float(not found)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "f1": f1,
            "precision": precision,
            "recall": recall,
            "accuracy": accuracy(sum(predicted, []), sum(gold, [])),
        }


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The chunks ``(type, first, last)`` of one sentence's tags, read as conlleval and seqeval's default
    mode read them: IOB1, IOB2 and IOBES prefixes (``B-PER``), ``O`` outside; a tag without such a
    prefix is one type (runs of it form one chunk)."""
    chunks, start, kind, prev = set(), None, None, "O"
    for i, tag in enumerate([*tags, "O"]):
        mark, here = _split_tag(tag)
        ends = prev in "ES" or (prev != "O" and (mark in "BSO" or here != kind))
        if start is not None and ends:
            chunks.add((kind, start, i - 1))
            start = None
        if mark in "BS" or (mark != "O" and (prev in "ESO" or here != kind)):
            start = i
        prev, kind = mark, here
    return chunks


def _split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", None)``, ``"PER"`` -> ``("I", "PER")``."""
    if tag == "O":
        return "O", None
    if len(tag) > 1 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag


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
        return {"input_values": values, "attention_mask": mask, "labels": _labels([e["labels"] for e in examples])}

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


class CausalLM(Task):
    """Language modelling on a text column; the loss is over the text's tokens (padding ignored).

    Logits are computed only at the positions that predict a labelled token (``logits_to_keep``):
    the output layer over a 49k-word vocabulary is a fifth of a 135M model's compute, and a chat
    example's prompt carries no loss. Examples are batched by length, so padding stays small.
    """

    name, auto_class = "causal-lm", "AutoModelForCausalLM"
    metrics = ("perplexity", "loss")
    lower_is_better = frozenset({"perplexity", "loss"})
    group_by_length = True
    packs = True

    def pack(self, examples):
        return pack_batch(examples)

    def encode(self, table: Table, tokenizer) -> list[Example]:
        texts = [str(t) for t in table.column(self.text_column, "--text-column")]
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [{"input_ids": i, "labels": list(i)} for i in ids]

    def loss_terms(self, examples):
        """One per labelled token (the first token predicts nothing)."""
        return max(1, sum(sum(y != IGNORE for y in e["labels"][1:]) for e in examples))

    def loss(self, model, batch):
        """The mean cross-entropy over labelled tokens, as ``model(**batch).loss``."""
        nll, counted = token_nll(model, batch)
        return nll.sum() / counted.sum().clamp(min=1)

    def predict(self, model, batch):
        nll, counted = token_nll(model, batch)
        return list(zip(nll.sum(-1).tolist(), counted.sum(-1).tolist(), strict=True))

    def gold(self, examples):
        return [None] * len(examples)

    def score(self, predicted, gold):
        loss = sum(n for n, _ in predicted) / max(1, sum(c for _, c in predicted))
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}


class Chat(CausalLM):
    """Conversations through the model's chat template; the loss is on the assistant's turns only.

    The column (``--text-column``; ``messages`` when left at ``text``) holds a list of
    ``{"role", "content"}`` messages per row (a JSON string in CSV). Each assistant turn's tokens are
    what the template adds after the prompt up to that turn (with the generation prompt): the
    system and user turns, the assistant header and the padding are masked out of the loss.
    """

    name = "chat"

    def __init__(self, text_column: str, label_column: str, max_length: int, labels: list[str] | None = None):
        super().__init__("messages" if text_column == "text" else text_column, label_column, max_length, labels)

    def encode(self, table: Table, tokenizer) -> list[Example]:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--task chat needs a tokenizer with a chat template (an instruct model's)")
        column = table.column(self.text_column, "--text-column")
        return [
            self._example(table, i, tokenizer, conversation(table, i, self.text_column, v))
            for i, v in enumerate(column)
        ]

    def _example(self, table: Table, row: int, tokenizer, messages: list[dict[str, str]]) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _render(tokenizer, messages[:k], prompt=True)
            full = _render(tokenizer, messages[: k + 1], prompt=False)
            if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
                raise table.fail(
                    row, self.text_column, "the chat template does not render this conversation turn by turn"
                )
            labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt) :]
            ids = full
        if not ids:
            raise table.fail(row, self.text_column, "no assistant message to learn from")
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}


def _render(tokenizer, messages: list[dict[str, str]], prompt: bool) -> list[int]:
    if not messages:
        return []
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)["input_ids"])


def conversation(table: Table, row: int, column: str, value: Any) -> list[dict[str, str]]:
    """One row's conversation, checked: a list of {"role": str, "content": str}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise table.fail(row, column, f"not a JSON list of messages ({e})") from None
    fits = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )
    if not fits:
        raise table.fail(row, column, 'expected a list of {"role": ..., "content": ...} messages')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each labelled token's negative log-likelihood (0 elsewhere) and the mask of labelled tokens.

    Position p predicts token p + 1; logits are computed only at the positions some row needs. No KV cache:
    none is needed, and with one transformers would not detect a packed row (:func:`pack_batch`).
    """
    targets = batch["labels"][:, 1:]  # B x (L-1)
    counted = targets != IGNORE
    where = counted.any(0).nonzero().squeeze(1)  # the positions that predict a labelled token
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=where, use_cache=False).logits.float()  # B x len(where) x V
    kept = targets[:, where]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), kept, ignore_index=IGNORE, reduction="none")
    return nll, counted[:, where]


def accuracy(predicted: Sequence, gold: Sequence) -> float:
    return float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)])) if gold else 0.0


def macro_f1(predicted: Sequence[int], gold: Sequence[int], classes: int) -> float:
    """Mean over classes of 2TP / (2TP + FP + FN); a class absent from both counts as 1."""
    scores = []
    for k in range(classes):
        tp = sum(p == g == k for p, g in zip(predicted, gold, strict=True))
        fp_fn = sum((p == k) != (g == k) for p, g in zip(predicted, gold, strict=True))
        scores.append(2 * tp / (2 * tp + fp_fn) if tp + fp_fn else 1.0)
    return float(np.mean(scores))


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (Classification, Regression, TokenClassification, CTC, CausalLM, Chat)
}


def make_task(name: str, **kwargs: Any) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
