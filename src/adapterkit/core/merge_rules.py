"""The merge rules on tensors: task arithmetic, TIES, DARE, magnitude pruning (see :mod:`.merging`).

A method with its own way to merge (LoRA: its two factors, or an exact SVD) applies these to its own
tensors in its file; :mod:`.merging` applies them to every parameter of the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from adapterkit.errors import ConfigError

METHODS = ("linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
GENERIC = frozenset(METHODS) - {"svd"}  # the rules that act on any tensor


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` largest-magnitude entries of ``t``, zero the rest."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().flatten().topk(k).indices] = 1
    return t * mask.view_as(t)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by ``1 / density``."""
    keep = torch.rand(t.shape, generator=generator) < density
    return t * keep.to(t.dtype) / density


def majority_sign(stacked: torch.Tensor, rule: str = "total") -> torch.Tensor:
    """``(n, ...) -> (n, ...)`` bool: which entries agree with the elected sign (ties: +)."""
    votes = stacked.sum(0) if rule == "total" else stacked.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == elected


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float = 0.5,
    sign_rule: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One merged tensor from same-shape ``tensors`` (see the module docstring)."""
    generator = generator or torch.Generator().manual_seed(0)
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method.startswith("dare"):
        tensors = [random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.ndim - 1))
    if method not in ("ties", "dare_ties"):
        return (w * stacked).sum(0)
    agree = majority_sign(stacked, sign_rule).to(stacked.dtype)
    return (w * stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


@dataclasses.dataclass(frozen=True)
class MergeRule:
    """How to merge: the rule (one of :data:`METHODS`) and its knobs, validated when built."""

    method: str = "linear"
    density: float = 0.5
    sign_rule: str = "total"
    rank: int | None = None  # svd's new LoRA rank (None: the sum of the ranks, exact)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown merge method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 0 < self.density <= 1 or self.sign_rule not in ("total", "frequency"):
            raise ConfigError(
                f"density must be in (0, 1] and sign_rule total or frequency, got {self.density}, {self.sign_rule!r}"
            )

    def generator(self) -> torch.Generator:
        """DARE's random pruning, seeded: one generator for all tensors of one merge."""
        return torch.Generator().manual_seed(self.seed)

    def apply(self, tensors: Sequence[torch.Tensor], weights: Sequence[float], generator: torch.Generator):
        """One merged tensor from same-shape ``tensors``."""
        return combine(tensors, weights, self.method, self.density, self.sign_rule, generator)
