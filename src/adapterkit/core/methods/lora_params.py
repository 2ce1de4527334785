"""LoRA on bare parameters (peft's ``target_parameters``): the stacked expert weights of a mixture of experts.

A parameter ``(E, out, in)`` (Mixtral, Qwen-MoE; ``(E, in, out)`` where the module says ``is_transposed``, as
GPT-OSS does) or ``(out, in)`` gets ``W + s * delta`` with, as peft builds it, ``A`` (r E, in) and ``B`` (out,
r E) split per expert: ``delta[e] = B[:, :, e] A[e]`` with ``B`` seen as (out, r, E) and ``A`` as (E, r, in).
The module's forward runs with ``W + s delta`` in place of ``W`` (swapped in before it, back after it), so
every expert implementation computes with the adapted weights. Mergeable. Not per row: the parameter is one
for the whole call. A forward that raises between the two hooks leaves the sum in place until the module's
next call, which restores the weight first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adapterkit.core.methods.base import AdapterModule, check, param_dtype
from adapterkit.core.state import base_modules


def find_parameters(model: nn.Module, targets: tuple[str, ...]) -> dict[str, list[str]]:
    """Module path -> names of its own parameters whose full name ends with a target, in the module's order
    (peft's: it nests a module's first targeted parameter deepest)."""
    found: dict[str, list[str]] = {}
    for path, module in base_modules(model):
        for name in module._parameters:
            full = f"{path}.{name}" if path else name
            if any(full == t or full.endswith("." + t) for t in targets):
                found.setdefault(path, []).append(name)
    check(bool(found), f"no parameter of {type(model).__name__} matches target_parameters={list(targets)!r}")
    return found


class LoRAParams(AdapterModule):
    """LoRA factors for one module's targeted parameters (``lora_A.<name>``, ``lora_B.<name>``)."""

    edits_inputs = True
    blocks = frozenset()
    why_not = "a LoRA of a bare parameter changes it for the whole call, so its rows cannot differ"

    def __init__(self, host: nn.Module, names: list[str], r: int, scaling: float) -> None:
        super().__init__()
        self.names, self.r, self.scaling = names, r, scaling
        self.transposed = bool(getattr(host, "is_transposed", False))
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.ndim = {name: host._parameters[name].ndim for name in names}
        for name in names:
            fan_in, fan_out, experts = self.shape(host._parameters[name])
            kw = dict(dtype=param_dtype(host), device=host._parameters[name].device)
            self.lora_A[name] = nn.Parameter(torch.empty(r * experts, fan_in, **kw))
            self.lora_B[name] = nn.Parameter(torch.zeros(fan_out, r * experts, **kw))
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
        self.saved: dict[str, nn.Parameter] = {}

    def shape(self, param: torch.Tensor) -> tuple[int, int, int]:
        """``(in, out, experts)`` of a targeted parameter."""
        check(param.ndim in (2, 3), f"target_parameters takes 2-D or 3-D parameters, not {tuple(param.shape)}")
        if param.ndim == 2:
            return param.shape[1], param.shape[0], 1
        experts, a, b = param.shape
        return (a, b, experts) if self.transposed else (b, a, experts)

    def delta(self, name: str) -> torch.Tensor:
        """``s * delta`` in the parameter's own layout."""
        a, b = self.lora_A[name], self.lora_B[name]
        if self.ndim[name] == 2:
            return (b @ a) * self.scaling
        experts = a.shape[0] // self.r
        a3, b3 = a.reshape(experts, self.r, -1), b.reshape(b.shape[0], self.r, experts)
        layout = "e i o" if self.transposed else "e o i"
        return torch.einsum(f"o r e, e r i -> {layout}", b3, a3) * self.scaling

    def restore(self, host: nn.Module) -> None:
        host._parameters.update(self.saved)
        self.saved = {}

    def adapt_inputs(self, host, args, kwargs):
        self.restore(host)  # a call that raised left its sum in place
        self.saved = {name: host._parameters[name] for name in self.names}
        for name, weight in self.saved.items():
            host._parameters[name] = weight + self.delta(name).to(weight.dtype)
        return args, kwargs

    def adapt(self, host, x, out):
        self.restore(host)
        return out

    def peft_local(self, local: str) -> str:
        """peft's key of a factor: a module's first targeted parameter nests deepest (``base_layer.``)."""
        factor, name = local.split(".", 1)
        depth = len(self.names) - 1 - self.names.index(name)
        return f"{'base_layer.' * depth}{factor}.weight"

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        for name in self.names:
            host._parameters[name].add_(self.delta(name).to(host._parameters[name].dtype))

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        for name in self.names:
            host._parameters[name].sub_(self.delta(name).to(host._parameters[name].dtype))
