"""A run's data: the task and its encoded examples, and the rows of each step (seeded, so a resumed run
sees the same batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapterkit.core import pretrained
from adapterkit.training.config import TrainConfig
from adapterkit.training.tables import read_table
from adapterkit.training.tasks import Task, make_task


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """The rows of each batch of ``epoch``: a permutation seeded by ``seed + epoch``, cut in order.

    With ``lengths``, rows are grouped by length as transformers' ``group_by_length`` does: each
    run of 50 batches of the permutation is sorted longest first and cut, and the batches are then
    shuffled, so a batch pads to a similar length while every epoch still sees every row once.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    mega = 50 * batch_size
    batches = []
    for start in range(0, n, mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def micro_batches(rows: list[int], n: int, world: int = 1) -> list[list[int]]:
    """``rows`` cut in order into ``n`` micro-batches (a full step: ``n`` batches of ``batch_size``); fewer
    when a short last step would leave a rank without rows."""
    n = max(1, min(n, len(rows) // max(world, 1)))
    return [rows[k * len(rows) // n : (k + 1) * len(rows) // n] for k in range(n)]


def load_data(config: TrainConfig, labels: list | None = None) -> tuple[Task, list, list, Any]:
    """The task, encoded training and validation examples, tokenizer.

    The labels are learned from the training file unless given (evaluating a finished run).
    """

    task = make_task(
        config.task, text_column=config.text_column, label_column=config.label_column, max_length=config.max_length
    )
    train_table = read_table(config.data)
    if labels is None:
        task.fit_labels(train_table)
    task.labels = task.labels if labels is None else labels
    task.prepare(config)
    preprocessor = getattr(task, "load_preprocessor", None)  # image tasks: the model's image processor
    if preprocessor is not None:
        tokenizer = preprocessor(config.model)
    else:
        tokenizer = None if task.name == "ctc" else pretrained.tokenizer(config.model)
    val = task.encode(read_table(config.validation), tokenizer) if config.validation else []
    return task, task.encode(train_table, tokenizer), val, tokenizer or _NoTokenizer()


class _NoTokenizer:
    """Speech input has no tokenizer; padding uses zeros."""

    pad_token_id = 0

    def save_pretrained(self, path: Path) -> None:
        pass
