"""What every task is: the :class:`Task` protocol, its examples and their batches (padded or packed)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

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
    group_by_length: ClassVar[bool] = False  # batch examples of similar length (see ``training.data.epoch_batches``)
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels_tensor([e["labels"] for e in examples])}


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


def labels_tensor(values: list[Any]) -> torch.Tensor:
    if not isinstance(values[0], list):
        return torch.tensor(values)
    out = torch.full((len(values), max(map(len, values))), IGNORE, dtype=torch.long)
    for row, value in enumerate(values):
        out[row, : len(value)] = torch.tensor(value, dtype=torch.long)
    return out
