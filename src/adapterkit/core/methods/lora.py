"""LoRA's config, its peft and AdapterHub formats and its merging; the modules (LoRA, DoRA, PiSSA / OLoRA starts,
Embedding and Conv variants) and their formulas are :mod:`.lora_layers`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

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
from adapterkit.core.arch import ArchSpec, spec_for
from adapterkit.core.entries import CONFIG_FILE, Entry, entries, exact_regex, unsupported
from adapterkit.core.merge_rules import GENERIC, MergeRule
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, find_targets, is_linear
from adapterkit.core.methods.loftq import BITS, start_lora
from adapterkit.core.methods.lora_layers import RESIDUAL, DoRA, LoRA, LoRAConv, LoRAEmbedding, is_conv, make_lora
from adapterkit.core.methods.lora_params import LoRAParams, find_parameters
from adapterkit.core.peft_spec import PeftFormat, fan_in_fan_out, refuse_gating, targets
from adapterkit.core.quantize import is_quantized
from adapterkit.core.state import FIXED
from adapterkit.errors import ConfigError

OWN_INITS = (*RESIDUAL, "loftq")  # the inits adapterkit computes from the host weight, peft's names
__all__ = ["RESIDUAL", "DoRA", "LoRA", "LoRAConfig", "LoRAConv", "LoRAEmbedding", "make_lora"]


# peft's inits that leave the base weights as they are (the file's A and B replace the values); PiSSA, OLoRA and
# LoftQ change them, which adapterkit reproduces; the others (pissa_niter_*, corda, lora_ga) it does not
_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "eva": "kaiming", "orthogonal": "kaiming"}


def _from_peft(data: dict, model: nn.Module) -> LoRAConfig:
    init = data.get("init_lora_weights", True)
    if init not in (*_INITS, *OWN_INITS):
        raise unsupported(
            CONFIG_FILE, "init_lora_weights", init, "it changes the base weights in a way adapterkit does not reproduce"
        )
    loftq = (data.get("loftq_config") or {}) if init == "loftq" else {}
    if not isinstance(loftq, dict):
        raise unsupported(CONFIG_FILE, "loftq_config", loftq, "peft writes an object of loftq_bits and loftq_iter")
    return LoRAConfig(
        init_weights=init if init in OWN_INITS else _INITS[init],
        loftq_bits=loftq.get("loftq_bits", 4),
        loftq_iter=loftq.get("loftq_iter", 1),
        r=data["r"],
        alpha=data["lora_alpha"],
        dropout=data.get("lora_dropout", 0.0),
        target_modules=targets(data["target_modules"]) if data.get("target_modules") else None,
        use_rslora=data.get("use_rslora", False),
        use_dora=data.get("use_dora", False),
        target_parameters=data.get("target_parameters") or None,
    )


def _peft_targets(config: LoRAConfig, model: nn.Module) -> list[str] | str:
    if config.target_modules:
        return config.target_modules
    return [] if config.target_parameters else list(spec_for(model).lora_targets)


def _peft_local(entry: Entry) -> str:
    if isinstance(entry.module, LoRAParams):
        return entry.module.peft_local(entry.local)
    return _PEFT_KEYS.get(entry.local, entry.local)


_PEFT_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def _peft_fields(config: LoRAConfig, model: nn.Module, found: list[Entry]) -> dict:
    refuse_gating(config)
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _peft_targets(config, model),
        "target_parameters": list(config.target_parameters) if config.target_parameters else None,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": fan_in_fan_out(model, found),
        "bias": "none",
        "init_lora_weights": config.init_weights if config.init_weights in OWN_INITS else True,
        "loftq_config": {"loftq_bits": config.loftq_bits, "loftq_iter": config.loftq_iter} if _loftq(config) else {},
    }


def _loftq(config: LoRAConfig) -> bool:
    return config.init_weights == "loftq"


def _merge_loras(
    model: nn.Module, names: Sequence[str], configs: list[LoRAConfig], weights: list[float], rule: MergeRule
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """``svd``: the exact update ``sum_i w_i s_i B_i A_i`` of each layer, re-factored to rank ``rule.rank``; the
    other rules act on ``A`` and ``B`` apart with weights ``sqrt(w_i s_i)`` (peft's ``add_weighted_adapter``).
    The new adapter has scaling 1: its factors carry it."""
    if any(c.use_dora for c in configs):
        raise ConfigError("merging DoRA adapters is not supported (their magnitudes do not add)")
    loftq = {(c.loftq_bits, c.loftq_iter) if _loftq(c) else None for c in configs}
    if len(loftq) > 1:
        raise ConfigError("LoftQ adapters were trained against a quantized base: merge them with LoftQ adapters of "
                          "the same loftq_bits and loftq_iter only")  # fmt: skip
    same = {"init_weights": "loftq", "loftq_bits": configs[0].loftq_bits, "loftq_iter": configs[0].loftq_iter}
    hosts = [_loras(model, n) for n in names]
    if any(h.keys() != hosts[0].keys() for h in hosts):
        raise ConfigError(f"LoRA adapters {list(names)} adapt different modules; they cannot be merged")
    if rule.method == "svd":
        rank = rule.rank or sum(c.r for c in configs)
        tensors = {}
        for path in hosts[0]:
            delta = sum(w * h[path].delta().detach() for w, h in zip(weights, hosts, strict=True))
            tensors[f"{path}.lora_B"], tensors[f"{path}.lora_A"] = _factor(delta, rank)
    else:
        rank, tensors = _merge_factors(hosts, configs, weights, rule)
    kept = same if _loftq(configs[0]) else {}  # the merged update still sits on the quantized base
    return LoRAConfig(r=rank, alpha=rank, target_modules=configs[0].target_modules, **kept), tensors


def _merge_factors(hosts: list[dict[str, LoRA]], configs: list[LoRAConfig], weights: list[float], rule: MergeRule):
    if len({c.r for c in configs}) > 1:
        raise ConfigError(f"{rule.method} merges LoRA factors of equal rank; ranks {[c.r for c in configs]}: use svd")
    if any(m.residual for h in hosts for m in h.values()):
        raise ConfigError(f"{rule.method} merges LoRA factors; PiSSA / OLoRA updates (B A - B0 A0) merge with svd")
    scaled = [math.sqrt(w * c.scaling) for w, c in zip(weights, configs, strict=True)]
    generator, tensors = rule.generator(), {}
    for path in hosts[0]:
        for part in ("lora_A", "lora_B"):
            tensors[f"{path}.{part}"] = rule.apply([getattr(h[path], part).detach() for h in hosts], scaled, generator)
    return configs[0].r, tensors


_FACTORS = ("lora_A", "lora_B", "lora_A0", "lora_B0")


def _loras(model: nn.Module, name: str) -> dict[str, LoRA]:
    """Host path (relative to the backbone) -> the LoRA module of adapter ``name``."""
    found = {}
    for e in entries(model, name):
        if not isinstance(e.module, LoRA) or e.local not in (
            "lora_A",
            "lora_B",
            f"{FIXED}.lora_A0",
            f"{FIXED}.lora_B0",
        ):
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


def _from_hub(config: dict, model: nn.Module) -> LoRAConfig:
    refuse_lora_variants(config)
    hosts = exact_regex(lora_hosts(config, model))
    return LoRAConfig(r=config["r"], alpha=config["alpha"], dropout=config.get("dropout", 0.0), target_modules=hosts)


def _hub_fields(config: LoRAConfig, model: nn.Module, found: list[Entry]) -> dict:
    if _loftq(config):
        raise unsupported(HUB, "init_weights", "loftq", "AdapterHub loads it onto the unquantized base; save as 'peft'")
    if config.use_dora:
        raise unsupported(HUB, "use_dora", True, "AdapterHub's DoRA computes differently; save as 'peft'")
    if any(e.local not in ("lora_A", "lora_B") for e in found):
        local = next(e.local for e in found if e.local not in ("lora_A", "lora_B"))
        raise unsupported(HUB, "parameter", local, "AdapterHub has no equivalent; save as 'peft' or 'adapterkit'")
    layout = lora_layout(model, sorted({e.host for e in found}), config)
    alpha = config.scaling * config.r if config.use_rslora else config.alpha  # AdapterHub scales by alpha / r
    return {**LORA, **layout, "r": config.r, "alpha": alpha, "dropout": config.dropout}


@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA config, peft's field names. ``target_modules`` None = the architecture's default.

    Targets may be ``nn.Linear``, ``Conv1D``, ``nn.Embedding``, ``nn.Conv1d`` or ``nn.Conv2d``.
    ``use_gating`` (Linear/Conv1D, UniPELT) scales the update by ``mean_t sigmoid(Linear(x_t))``.
    """

    method = "lora"
    peft = PeftFormat(
        "LORA",
        _from_peft,
        _peft_fields,
        local=_peft_local,
    )
    adapterhub = HubFormat(
        "lora",
        _from_hub,
        _hub_fields,
        lora_key,
        claims=lambda c: c.get("composition_mode") != "scale",
        presets={"lora": LORA},
    )
    merge_methods = GENERIC | {"svd"}
    merge_adapters = staticmethod(_merge_loras)
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_weights: str = "kaiming"
    use_gating: bool = False
    target_parameters: tuple[str, ...] | None = None
    loftq_bits: int = 4  # init_weights="loftq": the host's quantization, 4 (NF4) or 8 (int8) bits
    loftq_iter: int = 1  # init_weights="loftq": alternating quantize / SVD steps

    @property
    def scaling(self) -> float:
        """What the update ``B A x`` is multiplied by: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.init_weights in ("kaiming", "gaussian", *OWN_INITS), f"unknown init_weights {self.init_weights!r}")
        check(not (self.use_dora and self.init_weights in OWN_INITS), "PiSSA / OLoRA / LoftQ do not combine with DoRA")
        check(self.loftq_bits in BITS, f"loftq_bits must be one of {BITS}, got {self.loftq_bits!r}")
        check(isinstance(self.loftq_iter, int) and self.loftq_iter >= 1, f"loftq_iter must be >= 1: {self.loftq_iter}")
        plain = not (self.use_dora or self.use_gating or self.init_weights in OWN_INITS)
        check(plain or not self.target_parameters, "target_parameters takes plain LoRA (no DoRA, gating or PiSSA)")
        check(not (self.use_gating and self.use_dora), "use_gating and use_dora cannot be combined")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        placements = []
        if self.target_modules or not self.target_parameters:  # peft: parameters alone need no module targets
            targets = self.target_modules or list(spec_for(model, arch).lora_targets)
            kinds = (is_linear, is_conv, lambda m: isinstance(m, nn.Embedding))
            names = find_targets(model, targets, kinds, "Linear, Conv1D, Embedding or Conv1d/2d")
            placements = [(name, make_lora(model.get_submodule(name), self)) for name in names]
            for name, module in placements if _loftq(self) else ():
                check(type(module) is LoRA, f"LoftQ quantizes Linear / Conv1D weights; {name} is not one")
                check(not is_quantized(model.get_submodule(name)), f"{name} is quantized already: LoftQ quantizes "
                      "a full-precision base itself (drop --quantize)")  # fmt: skip
                start_lora(model, name, module, self)
        taken = {name for name, _ in placements}
        for path, params in (find_parameters(model, self.target_parameters) if self.target_parameters else {}).items():
            check(path not in taken, f"{path} is both a target module and holds target parameters; pick one")
            placements.append((path, LoRAParams(model.get_submodule(path), params, self.r, self.scaling)))
        return placements
