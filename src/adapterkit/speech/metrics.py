"""Speech metrics: character / word error rate, and equal error rate / minDCF of trial scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions cost 1)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1]


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Total edits over total reference length."""
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True))
    return edits / max(1, sum(len(r) for r in refs))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate."""
    return error_rate(refs, hyps)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate (words split on whitespace)."""
    return error_rate([r.split() for r in refs], [h.split() for h in hyps])


def _rates(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Miss and false-alarm rates at every threshold between sorted scores (accept: score >= t)."""
    order = torch.argsort(scores, descending=True)
    hits = targets[order].double()
    n_target, n_non = hits.sum(), (1 - hits).sum()
    accepted_targets = torch.cat([hits.new_zeros(1), hits.cumsum(0)])
    accepted_non = torch.cat([hits.new_zeros(1), (1 - hits).cumsum(0)])
    return 1 - accepted_targets / n_target, accepted_non / n_non


def eer(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Equal error rate: where the miss and false-alarm rates cross (their mean at the closest point)."""
    miss, false_alarm = _rates(scores, targets)
    i = torch.argmin((miss - false_alarm).abs())
    return float((miss[i] + false_alarm[i]) / 2)


def min_dcf(
    scores: torch.Tensor, targets: torch.Tensor, p_target: float = 0.01, c_miss: float = 1, c_fa: float = 1
) -> float:
    """Minimum normalised detection cost (NIST SRE):
    ``min_t (c_miss p FNR(t) + c_fa (1 - p) FPR(t)) / min(c_miss p, c_fa (1 - p))``."""
    miss, false_alarm = _rates(scores, targets)
    cost = c_miss * p_target * miss + c_fa * (1 - p_target) * false_alarm
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def eer_interval(
    scores: torch.Tensor, targets: torch.Tensor, level: float = 0.95, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of the EER: trials resampled with replacement ``rounds`` times, the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled EERs (percentile method)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(scores), (rounds, len(scores)), generator=generator)
    values = torch.tensor([eer(scores[pick], targets[pick]) for pick in picks])
    low, high = torch.quantile(values.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return float(low), float(high)
