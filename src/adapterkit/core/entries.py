"""An adapter's parameters as saved folders see them: each with its key, host module and owner.

Below both the methods (which register their peer formats, :mod:`.peft_spec`) and the peer formats
(:mod:`.formats`), so that neither imports the other's package.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adapterkit.core.backbone import base_prefix
from adapterkit.core.state import SLOT, Slot
from adapterkit.errors import AdapterFileError

CONFIG_FILE = "adapter_config.json"


@dataclasses.dataclass
class Entry:
    """One adapter parameter: its adapterkit key, host path (both relative to the backbone)."""

    key: str
    host: str
    module: nn.Module
    local: str
    param: torch.Tensor


def entries(model: nn.Module, name: str) -> Iterator[Entry]:
    """Every parameter of adapter ``name`` with the module that owns it."""
    prefix = base_prefix(model)
    for path, host in model.named_modules():
        slot = host._modules.get(SLOT)
        if not isinstance(slot, Slot) or name not in slot:
            continue
        host_path = path.removeprefix(prefix) if path != prefix[:-1] else ""
        for local, param in slot[name].named_parameters():
            key = f"{host_path}.{local}" if host_path else local
            yield Entry(key, host_path, slot[name], local, param.detach())


def exact_regex(names: list[str]) -> str:
    """A full-match regex for exactly these module names, under any task-model prefix."""
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"


def unsupported(file: str, option: str, value: Any, hint: str = "") -> AdapterFileError:
    return AdapterFileError(f"{file}: {option}={value!r} is not supported by adapterkit{'; ' + hint if hint else ''}")
