"""LN tuning (Zhao et al. 2024, "Tuning LayerNorm in Attention"): train a copy of each normalisation
layer's scale and shift, nothing else.

The norm is computed by the host's own ``forward`` with the adapter's ``weight`` (and ``bias``) in
place of its own for that call (so LayerNorm, Llama's RMSNorm and the rest keep their exact math),
as peft's LN_TUNING computes its copied layer. Targets: ``target_modules``, by default every
``LayerNorm`` / ``RMSNorm`` of the model. Init: the host's values (the model is unchanged). Merging
copies the adapter's values into the host (and back on unmerge).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec
from adapterkit.core.entries import Entry
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, find_targets, param_dtype
from adapterkit.core.peft_spec import PeftFormat, exact_targets, targets
from adapterkit.core.state import base_modules

NAMES = ("weight", "bias")


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm (``nn``'s or a model's own) with a learned scale."""
    norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return norm and isinstance(getattr(module, "weight", None), nn.Parameter)


@contextlib.contextmanager
def swapped(host: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """``host`` with ``params`` in place of its own parameters of those names, for one call."""
    saved = {k: host._parameters[k] for k in params}
    host._parameters.update(params)
    try:
        yield
    finally:
        host._parameters.update(saved)


class LNTuning(AdapterModule):
    """``(..., dim) -> (..., dim)``: the host's normalisation with this adapter's scale and shift."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        dtype = param_dtype(host)
        self.ln_weight = nn.Parameter(host.weight.detach().to(dtype).clone())
        bias = getattr(host, "bias", None)
        self.ln_bias = nn.Parameter(bias.detach().to(dtype).clone()) if isinstance(bias, nn.Parameter) else None
        self.merged_base: dict[str, torch.Tensor] | None = None

    def own(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in zip(NAMES, (self.ln_weight, self.ln_bias), strict=True) if p is not None}

    def adapt(self, host, x, out):
        params = {k: p.to(host.weight.dtype) if p.dtype != host.weight.dtype else p for k, p in self.own().items()}
        with swapped(host, params):
            return host.forward(x)  # forward, not __call__: no adapter hooks

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        self.merged_base = {k: getattr(host, k).detach().clone() for k in self.own()}
        for k, p in self.own().items():
            getattr(host, k).copy_(p)

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        for k, value in self.merged_base.items():
            getattr(host, k).copy_(value)
        self.merged_base = None


def _from_peft(data: dict, model: nn.Module) -> LNTuningConfig:
    return LNTuningConfig(target_modules=targets(data["target_modules"]))


def _peft_fields(config: LNTuningConfig, model: nn.Module, found: list[Entry]) -> dict:
    return {"target_modules": exact_targets(found)}


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(AdapterConfig):
    """LN tuning config; ``target_modules`` None = every normalisation layer."""

    method = "ln_tuning"
    peft = PeftFormat(
        "LN_TUNING",
        _from_peft,
        _peft_fields,
        keys={"ln_weight": "ln_tuning_layers.weight", "ln_bias": "ln_tuning_layers.bias"},
    )
    target_modules: tuple[str, ...] | str | None = None

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, LNTuning]]:
        if self.target_modules:
            names = find_targets(model, self.target_modules, (is_norm,), "LayerNorm or RMSNorm")
        else:
            names = [n for n, m in base_modules(model) if is_norm(m)]
        return [(n, LNTuning(model.get_submodule(n))) for n in names]
