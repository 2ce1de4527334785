"""IA3 (Liu et al. 2022): learned vectors, init ones, that rescale activations elementwise.

Two published conventions, both offered (``convention``):

* ``"peft"`` (default): key and value outputs ``(W x + b) * l`` and the feed-forward *input*
  ``W (x * l) + b`` of its output projection (BERT: ``output.dense``); peft's ``feedforward_modules``.
* ``"adapterhub"``: key and value outputs and the feed-forward *hidden* output, i.e. the output of
  its first projection before the activation (BERT: ``intermediate.dense``); AdapterHub's IA3Config.

``target_modules`` / ``feedforward_modules`` override the table with peft's semantics: targets
get their output scaled, except those also in ``feedforward_modules``, whose input is scaled.
Mergeable: output scaling multiplies W's rows and b, input scaling W's columns.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.adapterhub_spec import (
    HUB,
    LORA,
    HubFormat,
    lora_hosts,
    lora_key,
    lora_layout,
    refuse_lora_variants,
)
from adapterkit.core.arch import ArchSpec, features, find_layers, out_in, spec_for
from adapterkit.core.entries import Entry, exact_regex, unsupported
from adapterkit.core.hosts import first_input, stack_rows, with_first_input
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, find_targets, param_dtype
from adapterkit.core.peft_spec import PeftFormat, fan_in_fan_out, targets
from adapterkit.errors import AdapterError


def _scale_weight(host: nn.Module, vector: torch.Tensor, along_out: bool) -> None:
    """Multiply the host's (out, in) weight by ``vector`` along out (rows) or in (columns)."""
    weight = out_in(host, host.weight)
    weight.mul_((vector[:, None] if along_out else vector[None, :]).to(weight.dtype))


class IA3Output(AdapterModule):
    """``out * l`` with ``ia3_l`` (out_features,)."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(features(host)[1], dtype=param_dtype(host), device=host.weight.device))

    def adapt(self, host, x, out):
        return out * self.ia3_l.to(out.dtype)

    def row_key(self):
        return (IA3Output, self.ia3_l.shape[0])

    @staticmethod
    def row_tables(modules: list[IA3Output]) -> list[torch.Tensor]:
        return [stack_rows([m.ia3_l for m in modules], identity=1)]

    @staticmethod
    def adapt_tables(host, x, out, rows, modules):
        return out * _broadcast(rows[0], out)

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        _refuse_zeros(self.ia3_l)
        _scale_weight(host, self.ia3_l, along_out=True)
        if host.bias is not None:
            host.bias.mul_(self.ia3_l.to(host.bias.dtype))

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        _scale_weight(host, 1 / self.ia3_l, along_out=True)
        if host.bias is not None:
            host.bias.div_(self.ia3_l.to(host.bias.dtype))


class IA3Input(AdapterModule):
    """``W (x * l) + b`` with ``ia3_l`` (in_features,), applied to the host's input."""

    edits_inputs = True

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(features(host)[0], dtype=param_dtype(host), device=host.weight.device))

    blocks = frozenset({"average", "split", "rows"})
    why_not = "IA3 scales its host's input, which is sliced per row only for a direct PerRow entry"

    def adapt_inputs(self, host, args, kwargs):
        x = first_input(args, kwargs)
        return with_first_input(args, kwargs, x * self.ia3_l.to(x.dtype))

    def row_key(self):
        return (IA3Input, self.ia3_l.shape[0])

    @staticmethod
    def row_tables(modules: list[IA3Input]) -> list[torch.Tensor]:
        return [stack_rows([m.ia3_l for m in modules], identity=1)]

    @staticmethod
    def adapt_inputs_tables(host, args, kwargs, rows, modules):
        x = first_input(args, kwargs)
        return with_first_input(args, kwargs, x * _broadcast(rows[0], x))

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        _refuse_zeros(self.ia3_l)
        _scale_weight(host, self.ia3_l, along_out=False)

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        _scale_weight(host, 1 / self.ia3_l, along_out=False)


def _broadcast(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s vector ``rows[i]`` shaped to broadcast over ``like`` (B, ..., F)."""
    return rows.to(like.dtype).view(like.shape[0], *[1] * (like.ndim - 2), -1)


def _refuse_zeros(vector: torch.Tensor) -> None:
    if (vector == 0).any():
        raise AdapterError("an IA3 vector holds zeros: merging it could not be undone; keep it unmerged")


def _from_peft(data: dict, model: nn.Module) -> IA3Config:
    ff = data.get("feedforward_modules")
    return IA3Config(target_modules=targets(data["target_modules"]), feedforward_modules=targets(ff) if ff else None)


def _peft_fields(config: IA3Config, model: nn.Module, found: list[Entry]) -> dict:
    ff = sorted({e.host for e in found if isinstance(e.module, IA3Input)})
    return {
        "target_modules": exact_regex(sorted({e.host for e in found})),
        "feedforward_modules": exact_regex(ff) if ff else [],
        "fan_in_fan_out": fan_in_fan_out(model, found),
        "init_ia3_weights": True,
    }


def _peft_tensor(entry: Entry) -> torch.Tensor:
    """peft keeps IA3 vectors as (1, in) for inputs and (out, 1) for outputs."""
    return entry.param[None] if isinstance(entry.module, IA3Input) else entry.param[:, None]


_HUB_IA3 = {**LORA, "intermediate_lora": True, "r": 1, "alpha": 1, "attn_matrices": ["k", "v"]}
_HUB_IA3.update(composition_mode="scale", init_weights="ia3")


def _from_hub(config: dict, model: nn.Module) -> IA3Config:
    """AdapterHub's IA3 is its ``lora`` architecture with ``composition_mode="scale"``."""
    refuse_lora_variants(config)
    return IA3Config(convention="adapterhub", target_modules=exact_regex(lora_hosts(config, model)))


def _hub_fields(config: IA3Config, model: nn.Module, found: list[Entry]) -> dict:
    if any(isinstance(e.module, IA3Input) for e in found):
        raise unsupported(HUB, "feedforward_modules", config.feedforward_modules, "AdapterHub's IA3 scales outputs")
    return {**_HUB_IA3, **lora_layout(model, sorted({e.host for e in found}), config)}


@dataclasses.dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """IA3 config. ``convention`` picks the table's targets; the module lists override them."""

    method = "ia3"
    peft = PeftFormat("IA3", _from_peft, _peft_fields, tensor=_peft_tensor)
    adapterhub = HubFormat(
        "lora",
        _from_hub,
        _hub_fields,
        lora_key,
        claims=lambda c: c.get("composition_mode") == "scale",
        presets={"ia3": _HUB_IA3},
        tensor=lambda entry: entry.param[:, None],  # AdapterHub's lora_B of (out, 1)
    )
    convention: str = "peft"
    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        check(
            self.convention in ("peft", "adapterhub"),
            f"convention must be 'peft' or 'adapterhub', not {self.convention!r}",
        )

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        outputs, inputs = self._targets(model, arch)
        return [(n, IA3Output(model.get_submodule(n))) for n in outputs] + [
            (n, IA3Input(model.get_submodule(n))) for n in inputs
        ]

    def _targets(self, model: nn.Module, arch: ArchSpec | None) -> tuple[list[str], list[str]]:
        if self.target_modules:
            targets = find_targets(model, self.target_modules)
            ff = set(find_targets(model, self.feedforward_modules)) if self.feedforward_modules else set()
            return [n for n in targets if n not in ff], [n for n in targets if n in ff]
        spec = spec_for(model, arch)
        layers = [path for path, _ in find_layers(model, spec)]
        kv = [f"{path}.{name}" for path in layers for name in spec.kv]
        if self.convention == "adapterhub":
            return kv + [f"{path}.{spec.ffn_hidden}" for path in layers], []
        return kv, [f"{path}.{spec.ffn_out}" for path in layers]
