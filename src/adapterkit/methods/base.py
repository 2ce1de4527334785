"""The protocol every adapter method follows.

A method is a config dataclass (``method`` names it) whose :meth:`AdapterConfig.build` returns
``(host module path, adapter module)`` placements, and adapter modules whose ``adapt`` edits the
host's output. Central code only attaches, activates, saves and merges; it never asks which
method it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import ArchSpec
from ..errors import AdapterError, ConfigError


class AdapterModule(nn.Module):
    """One adapter at one host module."""

    def adapt(self, host: nn.Module, x: torch.Tensor, out: Any) -> Any:
        """Return the host's output with this adapter applied.

        Args:
            host: the module this adapter is attached to.
            x: the host's first input, e.g. ``(batch, seq, in_features)``.
            out: the host's output, e.g. ``(batch, seq, out_features)``.
        """
        raise NotImplementedError

    def merge(self, host: nn.Module) -> None:
        """Fold this adapter into ``host``'s weights (only linear methods can)."""
        raise AdapterError(
            f"{type(self).__name__} is not linear in the host's weights and cannot be merged; "
            "keep it unmerged (it still runs at inference)"
        )

    def unmerge(self, host: nn.Module) -> None:
        """Undo :meth:`merge`."""
        raise AdapterError(f"{type(self).__name__} cannot be merged, so it cannot be unmerged")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not AdapterModule.merge


@dataclasses.dataclass
class AdapterConfig:
    """Base of every method's config. Fields are plain JSON values."""

    method: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a value the method cannot use."""

    def build(self, model: nn.Module, spec: ArchSpec) -> list[tuple[str, AdapterModule]]:
        """Create the adapter modules and say where each goes (full module paths)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def replace(self, **overrides: Any) -> AdapterConfig:
        """A copy with some fields changed; an unknown field is a :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for a {self.method} adapter; valid fields: {sorted(names)}")
        config = dataclasses.replace(self, **overrides)
        config.validate()
        return config


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def map_hidden(out: Any, fn) -> Any:
    """Apply ``fn`` to a module's hidden-state output, which some modules return in a tuple."""
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    return fn(out)


def param_dtype(host: nn.Module) -> torch.dtype:
    """Adapters train in fp32 even on a half-precision base model."""
    dtype = next(host.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
