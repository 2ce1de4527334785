"""LoKr (Yeh et al. 2024, LyCORIS): a Kronecker-product update.

With ``out = a * b`` and ``in = c * d`` split near their square roots (peft's ``factorization``, or
``decompose_factor``), ``delta = s * kron(W1, W2)``, ``W1`` (a, c) and ``W2`` (b, d), ``s = alpha /
r``; a factor larger than ``2 r`` along either side is itself a rank-r product (``W2 = W2a W2b``;
``W1`` too with ``decompose_both``). peft's init: ``W1`` (or ``W1a``) zero, the rest Kaiming-uniform.
Training only: ``rank_dropout`` (rescaled with ``rank_dropout_scale``) and ``module_dropout``. Linear
and GPT-2 ``Conv1D`` hosts (peft's LoKr: ``nn.Linear`` only); mergeable, per row as a stacked dense delta.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, features
from adapterkit.core.entries import Entry
from adapterkit.core.methods.base import AdapterConfig, check, lora_targets, param_dtype
from adapterkit.core.methods.loha import LycorisDelta, dropped, low_rank
from adapterkit.core.peft_spec import PeftFormat, exact_targets, linear_only, targets


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)``, ``m <= n``, ``m * n = dimension``: ``factor`` and the rest where it divides, else the
    divisor pair nearest the square root whose first part is at most ``factor`` (peft's search, exactly)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` of two matrices, ``(p, q), (r, s) -> (p r, q s)``, as products that ONNX can export."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


class LoKr(LycorisDelta):
    """``(..., in) -> (..., out)``: the host's output plus ``delta x``."""

    def __init__(self, host: nn.Module, config: LoKrConfig) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        (a, b), (c, d) = (factorization(n, config.decompose_factor) for n in (fan_out, fan_in))
        kw = dict(dtype=param_dtype(host), device=host.weight.device)
        if config.decompose_both and config.r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = low_rank(a, config.r, c, host)
            nn.init.zeros_(self.lokr_w1_a)
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c, **kw))
        if config.r < max(b, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = low_rank(b, config.r, d, host)
        else:
            self.lokr_w2 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(b, d, **kw), a=5**0.5))
        self.scaling, self.module_dropout = config.alpha / config.r, config.module_dropout
        self.config = config

    def factor(self, which: int) -> torch.Tensor:
        """``W1`` or ``W2``, whole or as its low-rank product."""
        whole = getattr(self, f"lokr_w{which}", None)
        return whole if whole is not None else getattr(self, f"lokr_w{which}_a") @ getattr(self, f"lokr_w{which}_b")

    def delta(self) -> torch.Tensor:
        delta = kron(self.factor(1), self.factor(2)) * self.scaling
        return dropped(self, delta, self.config.rank_dropout, rescale=self.config.rank_dropout_scale)


_FIELDS = ("r", "alpha", "rank_dropout", "module_dropout", "decompose_both", "decompose_factor", "rank_dropout_scale")


def _from_peft(data: dict, model: nn.Module) -> LoKrConfig:
    fields = {k: data[k] for k in _FIELDS if k in data}
    return LoKrConfig(**fields, target_modules=targets(data["target_modules"]))


def _peft_fields(config: LoKrConfig, model: nn.Module, found: list[Entry]) -> dict:
    linear_only("LoKr", model, found)
    fields = {k: getattr(config, k) for k in _FIELDS}
    return {**fields, "target_modules": exact_targets(found), "use_effective_conv2d": False, "init_weights": True}


@dataclasses.dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """LoKr config, peft's field names. ``target_modules`` None = the architecture's LoRA targets."""

    method = "lokr"
    peft = PeftFormat("LOKR", _from_peft, _peft_fields)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        check(0 <= self.rank_dropout < 1 and 0 <= self.module_dropout < 1, "dropouts must be in [0, 1)")
        check(self.decompose_factor == -1 or self.decompose_factor > 0, "decompose_factor must be -1 or > 0")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, LoKr]]:
        names = lora_targets(model, arch, self.target_modules)
        return [(name, LoKr(model.get_submodule(name), self)) for name in names]
