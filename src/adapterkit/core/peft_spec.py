"""What peft's folder format needs to know about one method, registered in the method's own file.

A method that peft also has sets ``peft = PeftFormat(...)`` on its config class; :mod:`.peft` reads
and writes folders through these records only, so a new method touches no central file. The helpers
below are the pieces several methods' records share (targets, ``fan_in_fan_out``, refusals).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from adapterkit.core.arch import is_conv1d
from adapterkit.core.backbone import base_prefix
from adapterkit.core.entries import CONFIG_FILE, Entry, exact_regex, unsupported

PEFT = "peft"
WRAPPER = "base_model.model."  # peft's keys of the wrapped model's modules start so


def same_tensor(entry: Entry) -> torch.Tensor:
    return entry.param


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """One method in peft's format (peft 0.21).

    Attributes:
        peft_type: peft's ``peft_type`` for it (``"LORA"``).
        to_config: peft's ``adapter_config.json`` -> the equivalent config (raises for options it lacks).
        fields: ``(config, model, entries)`` -> peft's method fields of ``adapter_config.json``.
        keys: adapterkit's parameter name in a module -> peft's (``lora_A`` -> ``lora_A.weight``).
        shared: parameter names (or their first part) that peft keys without a module path, and its key
            (one tensor for the whole model: a prompt).
        outside: parameter names that peft keys outside the wrapped model, and the whole key (VeRA's
            shared projections, ``base_model.vera_A``).
        tensor: an adapterkit parameter in peft's layout (the default: as it is).
        task_type: ``task_type`` for a model without a head peft knows (prompt methods need one).
    """

    peft_type: str
    to_config: Callable[[dict[str, Any], nn.Module], Any]  # -> the method's AdapterConfig
    fields: Callable[[Any, nn.Module, list[Entry]], dict[str, Any]]
    keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    shared: Mapping[str, str] = dataclasses.field(default_factory=dict)
    outside: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tensor: Callable[[Entry], torch.Tensor] = same_tensor
    local: Callable[[Entry], str] | None = None  # peft's name of a parameter in its module, where ``keys`` cannot say
    # what a method's files hold beyond one tensor per parameter: (model, entries, tensors) -> tensors, written;
    # (adapter_config.json, tensors) -> tensors, read (trainable tokens' copy under a tied output layer)
    accepts: frozenset[str] = frozenset()  # options peft's other methods use for what this one reads itself
    writing: Callable[[nn.Module, list[Entry], dict], dict] | None = None
    reading: Callable[[dict[str, Any], dict], dict] | None = None
    task_type: str | None = None

    def key(self, entry: Entry) -> str:
        """peft's key of one parameter as :mod:`.formats.peft` reads files: relative to the backbone, or
        whole for one outside the wrapped model."""
        head = entry.local.split(".")[0]
        if entry.local in self.outside:
            return self.outside[entry.local]
        if head in self.shared:
            return self.shared[head]
        local = self.local(entry) if self.local else self.keys.get(entry.local, entry.local)
        return f"{entry.host}.{local}"

    def file_key(self, entry: Entry, backbone: str) -> str:
        """The parameter's key in peft's file (``backbone``: the task model's prefix of the backbone, ``bert.``)."""
        key = self.key(entry)
        if entry.local in self.outside:
            return key
        return WRAPPER + (key if entry.local.split(".")[0] in self.shared else backbone + key)


def targets(value: list[str] | str) -> list[str] | str:
    """peft's ``target_modules`` as adapterkit takes them (a regex string, or names sorted)."""
    if value in ("all-linear", ["all-linear"]):
        raise unsupported(CONFIG_FILE, "target_modules", value, "list the module names instead")
    return value if isinstance(value, str) else sorted(value)


def exact_targets(found: list[Entry]) -> str:
    """``target_modules`` naming exactly the adapter's hosts (a full-match regex)."""
    return exact_regex(sorted({e.host for e in found}))


def host_module(model: nn.Module, host: str) -> nn.Module:
    """The module at ``host`` (a path relative to the backbone, "" for the backbone itself)."""
    return model.get_submodule(base_prefix(model) + host if host else base_prefix(model)[:-1])


def fan_in_fan_out(model: nn.Module, found: list[Entry]) -> bool:
    """peft's ``fan_in_fan_out``: whether the hosts are GPT-2 ``Conv1D`` layers (refused when mixed)."""
    conv1d = {is_conv1d(host_module(model, h)) for h in sorted({e.host for e in found})}
    if len(conv1d) > 1:
        raise unsupported(PEFT, "target_modules", "Conv1D and Linear", "peft cannot mix Conv1D and Linear targets")
    return True in conv1d


def linear_only(method: str, model: nn.Module, found: list[Entry]) -> None:
    """Refuse GPT-2 ``Conv1D`` hosts for a peft method that adapts ``nn.Linear`` only."""
    if fan_in_fan_out(model, found):
        raise unsupported(PEFT, "target_modules", "Conv1D", f"peft's {method} adapts nn.Linear layers only")


def refuse_gating(config: Any) -> None:
    if getattr(config, "use_gating", False):
        raise unsupported(PEFT, "use_gating", True, "peft has no gated adapters (UniPELT)")


def prompt_fields(model: nn.Module, n: int) -> dict[str, Any]:
    """The fields peft's prompt methods (prefix and prompt tuning) share."""
    return {
        "num_virtual_tokens": n,
        "num_transformer_submodules": 1,
        "num_attention_heads": model.config.num_attention_heads,
        "num_layers": model.config.num_hidden_layers,
        "token_dim": model.config.hidden_size,
    }
