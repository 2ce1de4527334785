"""Unions: one adapter made of several methods (AdapterHub's ``ConfigUnion``).

Each part places its modules as it would alone; parts that meet at one host run in order there
(:class:`adapterkit.core.state.Chain`). Presets: ``"mam"`` (He et al. 2022: prefix tuning with an
800-wide MLP + a parallel adapter) and ``"unipelt"`` (Mao et al. 2022: gated LoRA r=8 alpha=2 +
gated prefix of 10 + gated Pfeiffer adapter), both with AdapterHub's settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from adapterkit.core.arch import ArchSpec
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check


@dataclasses.dataclass(frozen=True)
class UnionConfig(AdapterConfig):
    """Several method configs trained, saved and activated as one adapter."""

    method = "union"
    merge_methods = frozenset()  # its parts' tensors are of several methods: merge the parts' adapters instead
    configs: tuple[AdapterConfig, ...] = ()

    def validate(self) -> None:
        check(len(self.configs) >= 2, "a union needs at least two configs")
        for config in self.configs:
            check(isinstance(config, AdapterConfig), f"a union holds configs, not {type(config).__name__}")
            check(not isinstance(config, UnionConfig), "unions do not nest; list the parts in one union")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        return [placement for config in self.configs for placement in config.build(model, arch)]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "configs": [config.to_dict() for config in self.configs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnionConfig:
        from adapterkit.core.methods import config_from_dict

        return cls([config_from_dict(part) for part in data["configs"]])

    def baked(self) -> UnionConfig:
        return UnionConfig(tuple(getattr(c, "baked", lambda c=c: c)() for c in self.configs))


def union(*configs: AdapterConfig) -> UnionConfig:
    """``ak.union(ak.PrefixConfig(...), ak.BottleneckConfig(...))``: one adapter of several methods."""
    return UnionConfig(configs)
