"""VeRA (Kopiczko et al. 2024): one pair of frozen random projections shared by every layer, and two
trained scaling vectors per layer.

``y = W x + b + lambda_b ⊙ (B[:out] (lambda_d ⊙ (A[:, :in] dropout(x))))`` with ``A`` (r, in_max) and
``B`` (out_max, r) drawn once for the model from ``projection_prng_key`` (Kaiming-uniform as peft's
``_kaiming_init``: the same values as peft's for the same key and torch), sized to the largest target;
``lambda_d`` (r,) starts at ``d_initial``, ``lambda_b`` (out,) at zero. The projections are saved with
the adapter (peft's ``save_projection``) under a ``fixed`` submodule, so they never train. Linear and
GPT-2 ``Conv1D`` hosts; mergeable, per row as a stacked dense delta.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.arch import ArchSpec, features
from adapterkit.core.entries import Entry
from adapterkit.core.methods.base import AdapterConfig, check, lora_targets, param_dtype, share
from adapterkit.core.methods.delta import DenseDelta
from adapterkit.core.peft_spec import PeftFormat, exact_targets, fan_in_fan_out, targets
from adapterkit.core.state import FIXED


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's ``_kaiming_init``: uniform in ``±sqrt(3) * sqrt(2) / sqrt(fan_in)``, from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(config: VeRAConfig, fan_in: int, fan_out: int, dtype: torch.dtype) -> nn.ParameterDict:
    """The shared ``vera_A`` (r, fan_in) and ``vera_B`` (fan_out, r), drawn in that order from the key."""
    generator = torch.Generator().manual_seed(config.projection_prng_key)
    a = kaiming_uniform((config.r, fan_in), generator)
    b = kaiming_uniform((fan_out, config.r), generator)
    return nn.ParameterDict({"vera_A": a.to(dtype), "vera_B": b.to(dtype)}).requires_grad_(False)


class VeRA(DenseDelta):
    """``(..., in) -> (..., out)``: the host's output plus the scaled shared projections of ``x``."""

    def __init__(self, host: nn.Module, config: VeRAConfig, shared: nn.ParameterDict, owner: bool) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        share(self, FIXED, shared, owner)  # registered once (by the first layer), read by all
        kw = dict(dtype=param_dtype(host), device=host.weight.device)
        self.vera_lambda_b = nn.Parameter(torch.zeros(fan_out, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.fan_in, self.fan_out = fan_in, fan_out

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's part of the projections: ``A[:, :in]``, ``B[:out]``."""
        fixed = getattr(self, FIXED)
        return fixed["vera_A"][:, : self.fan_in], fixed["vera_B"][: self.fan_out]

    def adapt(self, host, x, out):
        a, b = self.sliced()
        x = self.dropout(x.to(a.dtype))
        return out + (self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)).to(out.dtype)

    def delta(self) -> torch.Tensor:
        a, b = self.sliced()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def row_key(self):
        return (VeRA, self.fan_in, self.fan_out, self.vera_lambda_d.shape[0], self.vera_lambda_d.dtype)


def _from_peft(data: dict, model: nn.Module) -> VeRAConfig:
    return VeRAConfig(
        r=data["r"],
        target_modules=targets(data["target_modules"]),
        projection_prng_key=data.get("projection_prng_key", 0),
        dropout=data.get("vera_dropout", 0.0),
        d_initial=data.get("d_initial", 0.1),
    )


def _peft_fields(config: VeRAConfig, model: nn.Module, found: list[Entry]) -> dict:
    return {
        "r": config.r,
        "target_modules": exact_targets(found),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": True,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": fan_in_fan_out(model, found),
        "bias": "none",
        "init_weights": True,
    }


@dataclasses.dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    """VeRA config, peft's field names (``dropout``: peft's ``vera_dropout``); ``target_modules`` None =
    the architecture's LoRA targets."""

    method = "vera"
    peft = PeftFormat(
        "VERA",
        _from_peft,
        _peft_fields,
        outside={f"{FIXED}.vera_A": "base_model.vera_A", f"{FIXED}.vera_B": "base_model.vera_B"},
    )
    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    dropout: float = 0.0
    d_initial: float = 0.1

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, VeRA]]:
        names = lora_targets(model, arch, self.target_modules)
        hosts = [model.get_submodule(n) for n in names]
        fan_in, fan_out = (max(features(h)[i] for h in hosts) for i in (0, 1))
        shared = projections(self, fan_in, fan_out, param_dtype(hosts[0])).to(hosts[0].weight.device)
        return [(n, VeRA(h, self, shared, owner=i == 0)) for i, (n, h) in enumerate(zip(names, hosts, strict=True))]
