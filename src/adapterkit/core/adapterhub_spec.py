"""What AdapterHub's folder format needs to know about one method, registered in the method's own file.

A method AdapterHub also has sets ``adapterhub = HubFormat(...)`` on its config class; :mod:`.formats.adapterhub`
reads and writes folders through these records only. The helpers below are what several records share:
AdapterHub's names of a layer's matrices, and LoRA / IA3's target layout (both are its ``lora`` architecture).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from adapterkit.core.arch import find_layers, model_type, spec_for
from adapterkit.core.backbone import base_prefix
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported

HUB = "adapterhub"
_BERT_MATRICES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
# LoRA/IA3 targets; GPT-2's fused c_attn takes AdapterHub's grouped q/k/v LoRA, not covered here
MATRICES = {kind: _BERT_MATRICES for kind in ("bert", "roberta", "xlm-roberta", "electra")}


def same_tensor(entry: Entry) -> torch.Tensor:
    return entry.param


def always(config: dict[str, Any]) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class HubFormat:
    """One method in AdapterHub's format (adapters 1.3.0).

    Attributes:
        architecture: the config's ``architecture`` (None: a bottleneck adapter, which has none).
        to_config: AdapterHub's config dict -> the equivalent config (raises for options it lacks).
        fields: ``(config, model, entries)`` -> AdapterHub's config dict.
        key: ``(model, entry, saved name)`` -> the parameter's key (relative to the backbone).
        claims: whether a config of ``architecture`` is this method's (LoRA and IA3 share ``lora``).
        presets: AdapterHub's preset names for it -> their config dicts.
        tensor: a parameter in AdapterHub's layout.
        writing: ``(model, entries, tensors)`` -> tensors, for what the files hold beyond one tensor per
            parameter (prefix tuning's copies under every layer); ``reading`` drops it again.
    """

    architecture: str | None
    to_config: Callable[[dict[str, Any], nn.Module], Any]
    fields: Callable[[Any, nn.Module, list[Entry]], dict[str, Any]]
    key: Callable[[nn.Module, Entry, str], str]
    claims: Callable[[dict[str, Any]], bool] = always
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    tensor: Callable[[Entry], torch.Tensor] = same_tensor
    writing: Callable[[nn.Module, list[Entry], dict], dict] | None = None
    reading: Callable[[dict[str, Any], dict], dict] | None = None  # (adapter_config.json, tensors) -> tensors


def layers(model: nn.Module) -> list[str]:
    """The model's layer paths, relative to the backbone."""
    prefix = base_prefix(model)
    return [path.removeprefix(prefix) for path, _ in find_layers(model, spec_for(model))]


def refuse(config: dict[str, Any], defaults: Mapping[str, Any], options: tuple[str, ...]) -> None:
    """Refuse ``options`` set in ``config`` to anything but their AdapterHub default."""
    for option in options:
        if option in config and config[option] != defaults[option]:
            raise unsupported(CONFIG_FILE, option, config[option])


def lora_hosts(config: dict[str, Any], model: nn.Module) -> list[str]:
    """The modules AdapterHub's ``lora`` architecture adapts (LoRA and IA3 alike)."""
    kind = model_type(model)
    if kind not in MATRICES:
        raise unsupported(CONFIG_FILE, "architecture", "lora", f"AdapterHub LoRA/IA3 on {kind!r} is not mapped")
    names = MATRICES[kind]
    wanted = [names[m] for m in config.get("attn_matrices", [])] if config.get("selfattn_lora", True) else []
    wanted += [names[m] for m in ("intermediate", "output") if config.get(f"{m}_lora")]
    skip = set(config.get("leave_out") or ())
    return [f"{layer}.{m}" for i, layer in enumerate(layers(model)) if i not in skip for m in wanted]


def refuse_lora_variants(config: dict[str, Any]) -> None:
    """``lora`` architecture options whose computation adapterkit does not reproduce (LoRA's and IA3's)."""
    for option in ("use_dora", "use_gating", "vera_d", "vera_b"):
        if config.get(option):
            raise unsupported(CONFIG_FILE, option, config[option])


def lora_key(model: nn.Module, entry: Entry, peer: str) -> str:
    """``<module>.loras.<name>.lora_A`` (IA3's vector is AdapterHub's ``lora_B``)."""
    return f"{entry.host}.loras.{peer}.{'lora_B' if entry.local == 'ia3_l' else entry.local}"


def lora_layout(model: nn.Module, hosts: list[str], config: Any) -> dict[str, Any]:
    """AdapterHub's (attn_matrices, intermediate_lora, output_lora, leave_out) for these hosts."""
    kind, all_layers = model_type(model), layers(model)
    inverse = {v: k for k, v in MATRICES.get(kind, {}).items()}
    per_layer: list[set[str]] = [set() for _ in all_layers]
    targets = getattr(config, "target_modules", None)
    for host in hosts:
        i = next((i for i, lay in enumerate(all_layers) if host.startswith(lay + ".")), None)
        rest = host.removeprefix(f"{all_layers[i]}.") if i is not None else host
        if rest not in inverse:
            raise unsupported(HUB, "target_modules", targets, f"{host} has no AdapterHub name")
        per_layer[i].add(inverse[rest])
    kinds = {frozenset(s) for s in per_layer if s}
    if len(kinds) != 1:
        raise unsupported(HUB, "target_modules", targets, "AdapterHub adapts the same matrices in every layer")
    (chosen,) = kinds
    return {
        "selfattn_lora": bool(chosen & {"q", "k", "v"}),
        "attn_matrices": [m for m in "qkv" if m in chosen],
        "intermediate_lora": "intermediate" in chosen,
        "output_lora": "output" in chosen,
        "leave_out": [i for i, s in enumerate(per_layer) if not s],
    }


LORA = {
    "architecture": "lora",
    "selfattn_lora": True,
    "intermediate_lora": False,
    "output_lora": False,
    "leave_out": [],
    "r": 8,
    "alpha": 8,
    "dropout": 0.0,
    "attn_matrices": ["q", "v"],
    "composition_mode": "add",
    "init_weights": "lora",
    "init_weights_seed": None,
    "use_gating": False,
    "use_dora": False,
    "vera_d": None,
    "vera_b": None,
    "dtype": None,
}
