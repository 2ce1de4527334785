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

import math
from collections.abc import Sequence

import torch
from torch import nn

from adapterkit.core import adapters
from adapterkit.core.formats import entries
from adapterkit.core.io import adapter_state_dict
from adapterkit.core.methods import AdapterConfig, LoRAConfig
from adapterkit.core.methods.lora import LoRA
from adapterkit.errors import ConfigError

METHODS = ("linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


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
    configs = [adapters.known(model, n).configs[n] for n in names]
    weights = list(weights) if weights is not None else [1 / len(names)] * len(names)
    _check(names, configs, weights, method, density, sign_rule)
    if isinstance(configs[0], LoRAConfig):
        config, tensors = _merge_lora(model, names, configs, weights, method, rank, density, sign_rule, seed)
    else:
        config = configs[0]
        parts = [adapter_state_dict(model, n) for n in names]
        generator = torch.Generator().manual_seed(seed)
        tensors = {k: combine([p[k] for p in parts], weights, method, density, sign_rule, generator) for k in parts[0]}
    adapters.add_adapter(model, into, config)
    with torch.no_grad():
        for key, param in adapter_state_dict(model, into).items():
            param.copy_(tensors[key])
    return config


def _check(names, configs, weights, method, density, sign_rule) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if len(names) < 2 or len(weights) != len(names):
        raise ConfigError(f"merge needs at least two adapters and one weight each, got {names} and {weights}")
    if not 0 < density <= 1 or sign_rule not in ("total", "frequency"):
        raise ConfigError(f"density must be in (0, 1] and sign_rule total or frequency, got {density}, {sign_rule!r}")
    kinds = {type(c) for c in configs}
    if len(kinds) > 1:
        raise ConfigError(f"adapters {list(names)} use different methods ({sorted(c.method for c in configs)})")
    first = configs[0]
    if getattr(first, "use_dora", False) or getattr(first, "use_gating", False) or first.method == "union":
        raise ConfigError(f"merging {first.method} adapters with DoRA, gating or unions is not supported")
    if method == "svd" and not isinstance(first, LoRAConfig):
        raise ConfigError(f"svd re-factors LoRA updates; {first.method} adapters merge with linear, ties, dare_*")
    if not isinstance(first, LoRAConfig) and any(c != first for c in configs):
        raise ConfigError(f"adapters {list(names)} have different configs; only equal shapes can be merged")


def _merge_lora(model, names, configs, weights, method, rank, density, sign_rule, seed):
    hosts = [_loras(model, n) for n in names]
    if any(h.keys() != hosts[0].keys() for h in hosts):
        raise ConfigError(f"LoRA adapters {list(names)} adapt different modules; they cannot be merged")
    tensors = {}
    if method == "svd":
        rank = rank or sum(c.r for c in configs)
        for path in hosts[0]:
            delta = sum(w * h[path].delta().detach() for w, h in zip(weights, hosts, strict=True))
            tensors[f"{path}.lora_B"], tensors[f"{path}.lora_A"] = _factor(delta, rank)
    else:
        if len({c.r for c in configs}) > 1:
            raise ConfigError(f"{method} merges LoRA factors of equal rank; ranks {[c.r for c in configs]}: use svd")
        rank = configs[0].r
        scaled = [math.sqrt(w * c.scaling) for w, c in zip(weights, configs, strict=True)]
        generator = torch.Generator().manual_seed(seed)
        for path in hosts[0]:
            for part in ("lora_A", "lora_B"):
                factors = [getattr(h[path], part).detach() for h in hosts]
                tensors[f"{path}.{part}"] = combine(factors, scaled, method, density, sign_rule, generator)
    new = LoRAConfig(r=rank, alpha=rank, target_modules=configs[0].target_modules)  # scaling 1: the factors carry it
    return new, tensors


def _loras(model: nn.Module, name: str) -> dict[str, LoRA]:
    """Host path (relative to the backbone) -> the LoRA module of adapter ``name``."""
    found = {}
    for e in entries(model, name):
        if not isinstance(e.module, LoRA) or e.local not in ("lora_A", "lora_B"):
            raise ConfigError(f"adapter {name!r} has {e.key}; LoRA merging handles Linear/Conv1D LoRA factors")
        found[e.host] = e.module
    return found


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta`` (out, in) ~= B A with B (out, rank), A (rank, in): the truncated SVD, exact if rank allows."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())
    b, a = delta.new_zeros(delta.shape[0], rank), delta.new_zeros(rank, delta.shape[1])
    b[:, :keep], a[:keep] = u[:, :keep] * s[:keep], vh[:keep]
    return b, a
