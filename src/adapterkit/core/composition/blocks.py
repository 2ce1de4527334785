"""The blocks that act at every site with the whole batch: ``Stack``, ``Average``, ``Split``, ``Fuse``,
``Arrow``, and their base class :class:`Block` (a frozen data class; ``to_dict`` and
:func:`adapterkit.core.composition.grammar.from_dict` round-trip it through JSON). The per-row blocks are
:mod:`.rows`; what may nest in what, and the checks, :mod:`.grammar`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from adapterkit.core.hosts import first_input, hidden, take, with_first_input, with_hidden
from adapterkit.errors import ConfigError

Child = Any  # str | Block (| None inside PerRow)


@dataclasses.dataclass(frozen=True, init=False)
class Block(abc.ABC):
    """A composition of adapters. ``children`` are adapter names or blocks."""

    children: tuple[Child, ...]
    kind: ClassVar[str] = ""

    def __init__(self, *children: Child) -> None:
        for child in children:
            if not isinstance(child, (str, Block)):
                raise ConfigError(f"{type(self).__name__} takes adapter names or blocks, not {child!r}")
        object.__setattr__(self, "children", tuple(children))

    def names(self) -> list[str]:
        """Adapter names in order, each once."""
        out: dict[str, None] = {}
        for child in self.children:
            for name in child.names() if isinstance(child, Block) else [child] if child else []:
                out[name] = None
        return list(out)

    def to_dict(self) -> dict[str, Any]:
        children = [c.to_dict() if isinstance(c, Block) else c for c in self.children]
        return {"block": self.kind, "children": children, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children] + [f"{k}={v!r}" for k, v in self._fields().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def replicas(self) -> int:
        """How many copies of the batch the model's input needs (``Parallel``)."""
        return max([c.replicas() for c in self.children if isinstance(c, Block)], default=1)

    # Evaluation at one slot: the output hook, the input hook, and attention prefixes.
    @abc.abstractmethod
    def apply(self, slot, host, x, out):
        """The host's output ``out`` (input ``x``) with this block's adapters applied."""

    def apply_inputs(self, slot, host, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def prefixes(self, slot, key: torch.Tensor) -> list:
        return []


def _apply(child: Child, slot, host, x, out):
    if isinstance(child, Block):
        return child.apply(slot, host, x, out)
    module = slot.adapter(child)
    return out if module is None else module.adapt(host, x, out)


def _apply_inputs(child: Child, slot, host, args, kwargs):
    if isinstance(child, Block):
        return child.apply_inputs(slot, host, args, kwargs)
    module = slot.adapter(child)
    if module is None or not module.edits_inputs:
        return args, kwargs
    return module.adapt_inputs(host, args, kwargs)


def _prefixes(child: Child, slot, key: torch.Tensor) -> list:
    """``[(keys (B, heads, P, hd), values, visible (B, P) or None)]``."""
    if isinstance(child, Block):
        return child.prefixes(slot, key)
    module = slot.adapter(child)
    return [] if module is None else [(k, v, None) for k, v in module.kv_prefix(key)]


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Stack(Block):
    """Adapters one after another at every site; ``Stack()`` is the base model."""

    kind = "stack"

    def apply(self, slot, host, x, out):
        for child in self.children:
            out = _apply(child, slot, host, x, out)
        return out

    def apply_inputs(self, slot, host, args, kwargs):
        for child in self.children:
            args, kwargs = _apply_inputs(child, slot, host, args, kwargs)
        return args, kwargs

    def prefixes(self, slot, key):
        return [p for child in self.children for p in _prefixes(child, slot, key)]


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """The weighted mean of the children's outputs (weights normalised to sum to 1)."""

    weights: tuple[float, ...]
    kind = "average"

    def __init__(self, *children: Child, weights: Sequence[float] | None = None) -> None:
        super().__init__(*children)
        weights = [1.0] * len(children) if weights is None else [float(w) for w in weights]
        if len(weights) != len(children) or not children or sum(weights) == 0:
            raise ConfigError(f"Average needs one weight per child ({len(children)}) and a non-zero sum, got {weights}")
        object.__setattr__(self, "weights", tuple(w / sum(weights) for w in weights))

    def _fields(self) -> dict[str, Any]:
        return {"weights": list(self.weights)}

    def apply(self, slot, host, x, out):
        outs = [_apply(child, slot, host, x, out) for child in self.children]
        if all(o is out for o in outs):
            return out
        return with_hidden(out, sum(w * hidden(o) for w, o in zip(self.weights, outs, strict=True)))

    def apply_inputs(self, slot, host, args, kwargs):
        calls = [_apply_inputs(child, slot, host, args, kwargs) for child in self.children]
        if all(c[0] is args and c[1] is kwargs for c in calls):
            return args, kwargs
        return with_first_input(
            args, kwargs, sum(w * first_input(*c) for w, c in zip(self.weights, calls, strict=True))
        )


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Split(Block):
    """Consecutive spans of the sequence through different children."""

    splits: tuple[int, ...]
    kind = "split"

    def __init__(self, *children: Child, splits: Sequence[int]) -> None:
        super().__init__(*children)
        if len(splits) != len(children) or any(int(s) <= 0 for s in splits):
            raise ConfigError(f"Split needs one positive length per child ({len(children)}), got {list(splits)}")
        object.__setattr__(self, "splits", tuple(int(s) for s in splits))

    def _fields(self) -> dict[str, Any]:
        return {"splits": list(self.splits)}

    def _spans(self, length: int, device) -> Iterator[torch.Tensor]:
        if sum(self.splits) != length:
            raise ConfigError(
                f"Split(splits={list(self.splits)}) covers {sum(self.splits)} positions, the input {length}"
            )
        start = 0
        for n in self.splits:
            yield torch.arange(start, start + n, device=device)
            start += n

    def apply(self, slot, host, x, out):
        h = hidden(out)
        parts = [
            hidden(_apply(child, slot, host, take(x, span, 1), take(out, span, 1)))
            for child, span in zip(self.children, self._spans(h.shape[1], h.device), strict=True)
        ]
        return with_hidden(out, torch.cat(parts, dim=1))

    def apply_inputs(self, slot, host, args, kwargs):
        first = first_input(args, kwargs)
        parts = []
        for child, span in zip(self.children, self._spans(first.shape[1], first.device), strict=True):
            part_args, part_kwargs = with_first_input(args, kwargs, first.index_select(1, span))
            parts.append(first_input(*_apply_inputs(child, slot, host, part_args, part_kwargs)))
        return with_first_input(args, kwargs, torch.cat(parts, dim=1))


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Fuse(Block):
    """AdapterFusion over bottleneck adapters; ``name`` defaults to the children joined by commas."""

    name: str
    kind = "fuse"

    def __init__(self, *children: str, name: str | None = None) -> None:
        super().__init__(*children)
        if len(children) < 2 or not all(isinstance(c, str) for c in children):
            raise ConfigError(f"Fuse takes two or more adapter names, got {list(children)}")
        object.__setattr__(self, "name", name or ",".join(children))

    def _fields(self) -> dict[str, Any]:
        return {} if self.name == ",".join(self.children) else {"name": self.name}

    def apply(self, slot, host, x, out):
        modules = [m for m in map(slot.adapter, self.children) if m is not None]
        if not modules:
            return out
        fusion = slot.fusion(self.name)
        kinds = {type(m) for m in modules}
        if len(kinds) > 1:
            raise ConfigError(
                f"Fuse({self.name}) meets {sorted(k.__name__ for k in kinds)} at one site; "
                "fuse adapters of one placement (e.g. all pfeiffer)"
            )
        return type(modules[0]).fuse(host, x, out, modules, fusion)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Arrow(Block):
    """Arrow (peft's ``ArrowConfig``): at each site, each token goes through the ``top_k`` LoRA adapters whose
    prototype (the top right-singular vector of their ``B A``) has the largest ``|<x, prototype>|``, mixed
    by a softmax of those over ``temperature``. Adapters absent at a site are left out there."""

    top_k: int
    temperature: float
    kind = "arrow"

    def __init__(self, *children: str, top_k: int = 3, temperature: float = 1.0) -> None:
        super().__init__(*children)
        if len(children) < 2 or not all(isinstance(c, str) for c in children):
            raise ConfigError(f"Arrow takes two or more adapter names, got {list(children)}")
        if int(top_k) < 1 or not float(temperature) > 0:
            raise ConfigError(f"Arrow needs top_k >= 1 and temperature > 0, got {top_k} and {temperature}")
        object.__setattr__(self, "top_k", int(top_k))
        object.__setattr__(self, "temperature", float(temperature))

    def _fields(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature}

    def apply(self, slot, host, x, out):
        modules = [m for m in map(slot.adapter, self.children) if m is not None]
        if not modules:
            return out
        if len({type(m) for m in modules}) > 1 or not hasattr(modules[0], "arrow"):
            raise ConfigError(f"{self!r} meets {sorted({type(m).__name__ for m in modules})} at one site; route LoRAs")
        return type(modules[0]).arrow(host, x, out, modules, min(self.top_k, len(modules)), self.temperature)
