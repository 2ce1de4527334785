"""A host module's call and output as adapters see them, and rows of a batch taken and put back.

Shared by every method's file and the composition blocks: the first input of a call, the hidden state of an
output, a row subset of either, and the per-row tables of a ``PerRow`` group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


# A host's call and output, the one place that knows their shapes: the first input is the first positional
# argument or ``hidden_states=`` (else the first keyword); the hidden state of an output is the tensor itself
# or the first item of a tuple or ModelOutput.
def first_input(args: tuple, kwargs: dict) -> Any:
    """The host call's first input: positional, ``hidden_states=``, or else the first keyword (None if none)."""
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def with_first_input(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with its first input (as :func:`first_input` finds it) replaced."""
    if args:
        return (value, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: value}


def hidden(out: Any) -> torch.Tensor:
    """A module output's hidden state: the tensor, or the first item of a tuple or ModelOutput."""
    return out if isinstance(out, torch.Tensor) else out[0]


def with_hidden(out: Any, value: torch.Tensor) -> Any:
    """``out`` with its hidden state (as :func:`hidden` finds it) replaced by ``value``."""
    if isinstance(out, torch.Tensor):
        return value
    if isinstance(out, tuple):
        return (value, *out[1:])
    return type(out)(**{**out, next(iter(out.keys())): value})


def map_hidden(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``out`` with ``fn`` applied to its hidden state."""
    return with_hidden(out, fn(hidden(out)))


def take(value: Any, index: torch.Tensor, dim: int = 0) -> Any:
    """Rows (or positions, ``dim=1``) ``index`` of a tensor or of a tuple's hidden state."""
    if isinstance(value, tuple):
        return (take(value[0], index, dim), *value[1:])
    return value.index_select(dim, index) if isinstance(value, torch.Tensor) else value


def put(out: Any, index: torch.Tensor, new: Any) -> Any:
    """``out`` with rows ``index`` replaced by ``new`` (out of place, so autograd sees it)."""
    return with_hidden(out, hidden(out).index_copy(0, index, hidden(new)))


def stack_rows(values: Sequence[torch.Tensor] | Sequence[float], identity: float = 0, device=None) -> torch.Tensor:
    """The table of a ``PerRow`` group: ``values`` (one per adapter, equal shapes) stacked with a last entry
    filled with ``identity`` (what "no adapter of this group" means: 0 for an update, 1 for a scale).
    Numbers give a tensor on ``device``."""
    if not isinstance(values[0], torch.Tensor):
        return torch.tensor([*values, identity], device=device)
    return torch.stack([*values, torch.full_like(values[0], identity)])


def gather_rows(
    values: Sequence[torch.Tensor] | Sequence[float], index: torch.Tensor, identity: float = 0
) -> torch.Tensor:
    """Row ``i`` of the batch takes entry ``index[i]`` of :func:`stack_rows` (``len(values)``: the identity)."""
    # index_select, not table[index]: the same copy, an order of magnitude faster on CPU (16 rows of a
    # bottleneck's weights: 51 us vs 673 us)
    return stack_rows(values, identity, index.device).index_select(0, index)


def take_rows(tables: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Row ``i`` of the batch takes entry ``index[i]`` of each table."""
    return [table.index_select(0, index) for table in tables]


def loop_rows(host, x, out, modules: list, index: torch.Tensor):
    """Each adapter on its own rows: the fallback for adapters that cannot compute together."""
    for k, module in enumerate(modules):
        rows = (index == k).nonzero().squeeze(1)
        if len(rows):
            out = put(out, rows, module.adapt(host, take(x, rows), take(out, rows)))
    return out


def loop_kv_rows(modules: list, index: torch.Tensor, key: torch.Tensor) -> list:
    """Each adapter's prefix for all rows, visible only to its own rows."""
    out = []
    for k, module in enumerate(modules):
        mine = index == k
        for keys, values in module.kv_prefix(key):
            out.append((keys, values, mine[:, None].expand(-1, keys.shape[2])))
    return out
