"""The scores tasks report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
