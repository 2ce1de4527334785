"""Merge adapters into a new one: task arithmetic, TIES, DARE, magnitude pruning, LoRA SVD.

The combination rules are peft's (``add_weighted_adapter``) and AdapterHub's (``average_adapter``):

* ``linear``: ``sum_i w_i t_i`` per parameter tensor (AdapterHub's average for bottleneck, IA3,
  prefix and prompt adapters);
* ``magnitude_prune``: each ``t_i`` keeps its ``density`` share of largest-magnitude entries, then
  ``linear``;
* ``ties`` (Yadav et al. 2023): magnitude pruning, a majority sign per entry (``"total"``: the sign of
  ``sum_i t_i``; ``"frequency"``: of ``sum_i sign(t_i)``), and per entry the mean of the weighted
  ``w_i t_i`` that agree with it;
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): random pruning that keeps each entry with
  probability ``density`` and rescales by ``1 / density``, then ``linear`` / TIES' sign election;
* ``svd`` (LoRA only): the exact update ``sum_i w_i s_i B_i A_i`` of every layer, re-factored by a
  truncated SVD to rank ``rank``: exact when ``rank >= sum_i r_i``.

For LoRA the other rules act on ``A`` and ``B`` separately with weights ``sqrt(w_i s_i)`` and give
the new adapter scaling 1, as peft does: ``linear`` then contains cross terms ``B_i A_j``, so it is an
approximation of the weighted sum of updates; use ``svd`` for the exact one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapterkit.core import adapters
from adapterkit.core.io import adapter_state_dict
from adapterkit.core.merge_rules import METHODS, MergeRule, combine, magnitude_prune, majority_sign, random_prune
from adapterkit.core.methods import AdapterConfig
from adapterkit.errors import ConfigError

__all__ = ["METHODS", "MergeRule", "combine", "combine_adapters", "magnitude_prune", "majority_sign", "random_prune"]


def combine_adapters(
    model: nn.Module,
    names: Sequence[str],
    into: str,
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    density: float = 0.5,
    sign_rule: str = "total",
    rank: int | None = None,
    seed: int = 0,
) -> AdapterConfig:
    """Add adapter ``into``, merged from adapters ``names`` (same method and targets).

    Args:
        weights: one per adapter; default ``1 / len(names)`` each.
        method: one of :data:`METHODS`.
        density: the share of entries kept by the pruning methods.
        sign_rule: ``"total"`` or ``"frequency"``, TIES' sign election.
        rank: the new LoRA rank for ``svd`` (default: the sum of the ranks: exact).
    """
    rule = MergeRule(method, density, sign_rule, rank, seed)
    configs = [adapters.known(model, n).configs[n] for n in names]
    weights = list(weights) if weights is not None else [1 / len(names)] * len(names)
    _check(names, configs, weights, rule)
    own = type(configs[0]).merge_adapters  # a method that merges its own way (LoRA's factors)
    config, tensors = own(model, names, configs, weights, rule) if own else _per_tensor(model, names, weights, rule)
    adapters.add_adapter(model, into, config)
    with torch.no_grad():
        for key, param in adapter_state_dict(model, into).items():
            param.copy_(tensors[key])
    return config


def _per_tensor(model: nn.Module, names: Sequence[str], weights: list[float], rule: MergeRule):
    """Every parameter merged by ``rule`` (equal configs, so equal shapes)."""
    parts = [adapter_state_dict(model, n) for n in names]
    generator = rule.generator()
    tensors = {k: rule.apply([p[k] for p in parts], weights, generator) for k in parts[0]}
    return adapters.known(model, names[0]).configs[names[0]], tensors


def _check(names, configs, weights, rule: MergeRule) -> None:
    if len(names) < 2 or len(weights) != len(names):
        raise ConfigError(f"merge needs at least two adapters and one weight each, got {names} and {weights}")
    kinds = {type(c) for c in configs}
    if len(kinds) > 1:
        raise ConfigError(f"adapters {list(names)} use different methods ({sorted(c.method for c in configs)})")
    first = configs[0]
    if getattr(first, "use_gating", False) or not type(first).merge_methods:
        raise ConfigError(f"merging gated or {first.method} adapters is not supported")
    if rule.method not in type(first).merge_methods:
        raise ConfigError(
            f"{first.method} adapters merge with {', '.join(sorted(type(first).merge_methods))}, not {rule.method}"
            + ("; svd re-factors LoRA updates" if rule.method == "svd" else "")
        )
    if type(first).merge_adapters is None and any(c != first for c in configs):
        raise ConfigError(f"adapters {list(names)} have different configs; only equal shapes can be merged")
