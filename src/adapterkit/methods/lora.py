"""LoRA (Hu et al. 2021): ``y = W x + b + (alpha / r) * B A dropout(x)``.

``A`` (r, in) is Kaiming-uniform (a=sqrt(5)) and ``B`` (out, r) zero, so the model is unchanged at
init; ``use_rslora`` scales by ``alpha / sqrt(r)``. This is peft's and AdapterHub's formula and
initialisation; on equal weights the outputs are equal. Works on ``nn.Linear`` and GPT-2's
``Conv1D`` (weight stored (in, out), peft's ``fan_in_fan_out``). Mergeable:
``W += scaling * B A`` (transposed for ``Conv1D``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, features, spec_for
from ..state import SLOT
from .base import AdapterConfig, AdapterModule, check, param_dtype


class LoRA(AdapterModule):
    """Low-rank update of one linear host: ``(..., in) -> (..., out)`` added to its output."""

    def __init__(self, host: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        dtype, device = param_dtype(host), host.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, fan_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        if config.init_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapt(self, host, x, out):
        x = self.dropout(x.to(self.lora_A.dtype))
        return out + (F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """``scaling * B A`` in the host's weight layout (transposed for ``Conv1D``)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta if isinstance(host, nn.Linear) else delta.T

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        host.weight += self.delta_weight(host).to(host.weight.dtype)

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        host.weight -= self.delta_weight(host).to(host.weight.dtype)


def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Module names matching ``targets``: a list of name suffixes, or one full-match regex."""

    def hit(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    names = [n for n, _ in model.named_modules() if f".{SLOT}." not in f".{n}." and hit(n)]
    check(bool(names), f"no module of {type(model).__name__} matches target_modules={targets!r}")
    for name in names:
        kind = type(model.get_submodule(name)).__name__
        check(
            _supported(model.get_submodule(name)), f"LoRA cannot wrap {name} ({kind}); target Linear or Conv1D modules"
        )
    return names


@dataclasses.dataclass
class LoRAConfig(AdapterConfig):
    """LoRA config, peft's field names. ``target_modules`` None = the architecture's default."""

    method = "lora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_weights: str = "kaiming"

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.init_weights in ("kaiming", "gaussian"), f"unknown init_weights {self.init_weights!r}")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        targets = self.target_modules or list(spec_for(model, arch).lora_targets)
        return [(name, LoRA(model.get_submodule(name), self)) for name in find_targets(model, targets)]
