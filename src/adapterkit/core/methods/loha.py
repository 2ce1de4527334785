"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a low-rank Hadamard product update.

``delta = s * (W1a W1b) ⊙ (W2a W2b)`` with ``W1a, W2a`` (out, r), ``W1b, W2b`` (r, in) and
``s = alpha / r``: rank up to r² from 4r(in + out)/2 parameters. peft's init: ``W1a, W1b, W2a``
Kaiming-uniform, ``W2b`` zero (the model is unchanged at init). Training only: ``rank_dropout``
drops rows of the delta (rescaled by the share kept), ``module_dropout`` the whole update. Linear
and GPT-2 ``Conv1D`` hosts (peft's LoHa: ``nn.Linear`` only); mergeable, per row as a stacked dense delta.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, features
from adapterkit.core.entries import Entry
from adapterkit.core.methods.base import AdapterConfig, check, lora_targets, param_dtype
from adapterkit.core.methods.delta import DenseDelta
from adapterkit.core.peft_spec import PeftFormat, exact_targets, linear_only, targets


def low_rank(out: int, r: int, fan_in: int, like: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """Two factors ``(out, r), (r, in)``, Kaiming-uniform as peft's LyCORIS methods initialise them."""
    kw = dict(dtype=param_dtype(like), device=like.weight.device)
    a, b = nn.Parameter(torch.empty(out, r, **kw)), nn.Parameter(torch.empty(r, fan_in, **kw))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return a, b


def dropped(module: DenseDelta, delta: torch.Tensor, rank_dropout: float, rescale: bool) -> torch.Tensor:
    """LyCORIS' rank dropout in training: rows of ``delta`` zeroed with probability ``rank_dropout``."""
    if not (module.training and rank_dropout):
        return delta
    keep = (torch.rand(delta.shape[0], device=delta.device) > rank_dropout).to(delta.dtype)
    return delta * (keep / keep.mean() if rescale else keep)[:, None]


class LycorisDelta(DenseDelta):
    """A dense delta whose whole update is dropped in training with probability ``module_dropout`` (LyCORIS')."""

    module_dropout = 0.0

    def adapt(self, host, x, out):
        if self.training and torch.rand(1).item() < self.module_dropout:
            return out
        return super().adapt(host, x, out)


class LoHa(LycorisDelta):
    """``(..., in) -> (..., out)``: the host's output plus ``delta x``."""

    def __init__(self, host: nn.Module, config: LoHaConfig) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        self.hada_w1_a, self.hada_w1_b = low_rank(fan_out, config.r, fan_in, host)
        self.hada_w2_a, self.hada_w2_b = low_rank(fan_out, config.r, fan_in, host)
        nn.init.zeros_(self.hada_w2_b)
        self.scaling = config.alpha / config.r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout

    def delta(self) -> torch.Tensor:
        delta = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling
        return dropped(self, delta, self.rank_dropout, rescale=True)


def _from_peft(data: dict, model: nn.Module) -> LoHaConfig:
    return LoHaConfig(
        r=data["r"],
        alpha=data["alpha"],
        rank_dropout=data.get("rank_dropout", 0.0),
        module_dropout=data.get("module_dropout", 0.0),
        target_modules=targets(data["target_modules"]),
    )


def _peft_fields(config: LoHaConfig, model: nn.Module, found: list[Entry]) -> dict:
    linear_only("LoHa", model, found)
    return {
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "target_modules": exact_targets(found),
        "use_effective_conv2d": False,
        "init_weights": True,
    }


@dataclasses.dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    """LoHa config, peft's field names. ``target_modules`` None = the architecture's LoRA targets."""

    method = "loha"
    peft = PeftFormat("LOHA", _from_peft, _peft_fields)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        check(0 <= self.rank_dropout < 1 and 0 <= self.module_dropout < 1, "dropouts must be in [0, 1)")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, LoHa]]:
        names = lora_targets(model, arch, self.target_modules)
        return [(name, LoHa(model.get_submodule(name), self)) for name in names]
