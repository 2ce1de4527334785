"""The tasks ``adapterkit train`` knows: how rows become tensors, which model class, which metric.

Each task turns a :class:`~adapterkit.training.tables.Table` into examples (plain lists), batches
them with ``labels`` so the model computes its own loss, and scores predictions. Adding a task is
one class (a module of this package by family) and one entry in :data:`TASKS`.
"""

from __future__ import annotations

from typing import Any

from adapterkit.training.tables import DataError
from adapterkit.training.tasks.base import IGNORE, Example, Task, labels_tensor, pack_batch, pad_batch
from adapterkit.training.tasks.image import ImageChat, ImageClassification
from adapterkit.training.tasks.lm import CausalLM, Chat, conversation, token_nll
from adapterkit.training.tasks.metrics import accuracy, macro_f1
from adapterkit.training.tasks.speech import CTC
from adapterkit.training.tasks.text import Classification, Regression
from adapterkit.training.tasks.tokens import TokenClassification, entities

__all__ = [
    "CTC",
    "IGNORE",
    "TASKS",
    "CausalLM",
    "Chat",
    "Classification",
    "Example",
    "ImageChat",
    "ImageClassification",
    "Regression",
    "Task",
    "TokenClassification",
    "accuracy",
    "conversation",
    "entities",
    "labels_tensor",
    "macro_f1",
    "make_task",
    "pack_batch",
    "pad_batch",
    "token_nll",
]
TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (Classification, Regression, TokenClassification, CTC, CausalLM, Chat, ImageClassification, ImageChat)
}


def make_task(name: str, **kwargs: Any) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
