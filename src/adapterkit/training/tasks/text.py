"""Sequence classification and regression of texts."""

from __future__ import annotations

from typing import Any

import numpy as np

from adapterkit.training.tables import DataError, Table
from adapterkit.training.tasks.base import Example, Task
from adapterkit.training.tasks.metrics import accuracy, macro_f1


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
