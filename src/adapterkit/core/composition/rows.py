"""Blocks that send rows of the batch through different adapters: ``PerRow`` (one adapter, block or the base per
row; adapters of one method at one site run as one batched computation), and ``BatchSplit`` and ``Parallel``,
which are a :class:`PerRow` once the batch size is known.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from adapterkit.core.composition.blocks import Block, Child
from adapterkit.core.hosts import first_input, hidden, put, take
from adapterkit.core.lru import LRU
from adapterkit.errors import ConfigError

# Per-row index tensors of PerRow groups, and the PerRow that a BatchSplit/Parallel means per batch size:
# cheap to make, so a small cache serves the many slots of one forward and a server's recurring mixes.
INDEX_CACHE = LRU(256)
ROWS_CACHE = LRU(64)
CACHES: dict[str, LRU] = {"per_row_index": INDEX_CACHE, "rows_by_batch": ROWS_CACHE}


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class PerRow(Block):
    """Row ``i`` of the batch through ``rows[i]``: an adapter name, a block, or ``None`` (base)."""

    kind = "per_row"

    def __init__(self, rows: Sequence[Child | None]) -> None:
        for row in rows:
            if row is not None and not isinstance(row, (str, Block)):
                raise ConfigError(f"PerRow takes adapter names, blocks or None per row, not {row!r}")
        if not rows:
            raise ConfigError("PerRow needs one entry per row of the batch")
        object.__setattr__(self, "children", tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.kind, "rows": [c.to_dict() if isinstance(c, Block) else c for c in self.children]}

    def __repr__(self) -> str:
        return f"PerRow({list(self.children)!r})"

    def _check(self, batch: int) -> None:
        if batch != len(self.children):
            raise ConfigError(f"PerRow has {len(self.children)} rows, the batch {batch}; give one entry per row")

    def _index(self, names: tuple[str, ...], device) -> torch.Tensor:
        """Per row: its position in ``names``, or ``len(names)`` (no adapter of this group)."""

        def make() -> torch.Tensor:
            position = {n: i for i, n in enumerate(names)}
            rows = [position.get(r, len(names)) if isinstance(r, str) else len(names) for r in self.children]
            return torch.tensor(rows, device=device)

        return INDEX_CACHE.get((self.children, names, str(device)), make)

    def _groups(self, slot, device) -> Iterator[tuple[type, list, torch.Tensor]]:
        """Adapters present here, grouped by ``row_key`` (those that compute together)."""
        groups: dict[Any, dict[str, Any]] = {}
        for name in dict.fromkeys(r for r in self.children if isinstance(r, str)):
            module = slot.adapter(name)
            if module is not None:
                groups.setdefault(module.row_key(), {})[name] = module
        for members in groups.values():
            modules = list(members.values())
            yield type(modules[0]), modules, self._index(tuple(members), device)

    def _blocks(self, device) -> Iterator[tuple[Block, torch.Tensor]]:
        for entry in dict.fromkeys(r for r in self.children if isinstance(r, Block)):
            yield entry, torch.tensor([i for i, r in enumerate(self.children) if r == entry], device=device)

    def apply(self, slot, host, x, out):
        h = hidden(out)
        self._check(h.shape[0])
        for cls, modules, index in self._groups(slot, h.device):
            out = cls.adapt_rows(host, x, out, modules, index)
        for block, rows in self._blocks(h.device):
            out = put(out, rows, block.apply(slot, host, take(x, rows), take(out, rows)))
        return out

    def apply_inputs(self, slot, host, args, kwargs):
        first = first_input(args, kwargs)
        device = first.device if isinstance(first, torch.Tensor) else None
        for cls, modules, index in self._groups(slot, device):
            if modules[0].edits_inputs:
                args, kwargs = cls.adapt_inputs_rows(host, args, kwargs, modules, index)
        return args, kwargs

    def prefixes(self, slot, key):
        self._check(key.shape[0])
        out = [p for cls, modules, index in self._groups(slot, key.device) for p in cls.kv_rows(modules, index, key)]
        for block, rows in self._blocks(key.device):
            mine = torch.zeros(key.shape[0], dtype=torch.bool, device=key.device).index_fill(0, rows, True)
            for k, v, visible in block.prefixes(slot, key):
                seen = mine[:, None] if visible is None else mine[:, None] & visible
                out.append((k, v, seen.expand(-1, k.shape[2])))
        return out


class Rows(Block):
    """A block that is a :class:`PerRow` once the batch size is known."""

    @abc.abstractmethod
    def per_row(self, batch: int) -> PerRow:
        """The :class:`PerRow` this block means for a batch of ``batch`` rows."""

    def _rows(self, batch: int) -> PerRow:
        return ROWS_CACHE.get((self, batch), lambda: self.per_row(batch))

    def apply(self, slot, host, x, out):
        return self._rows(hidden(out).shape[0]).apply(slot, host, x, out)

    def apply_inputs(self, slot, host, args, kwargs):
        return self._rows(first_input(args, kwargs).shape[0]).apply_inputs(slot, host, args, kwargs)

    def prefixes(self, slot, key):
        return self._rows(key.shape[0]).prefixes(slot, key)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class BatchSplit(Rows):
    """Consecutive row spans of the batch through different children."""

    batch_sizes: tuple[int, ...]
    kind = "batch_split"

    def __init__(self, *children: Child, batch_sizes: Sequence[int]) -> None:
        super().__init__(*children)
        if len(batch_sizes) != len(children) or any(int(s) < 0 for s in batch_sizes):
            raise ConfigError(f"BatchSplit needs one size per child ({len(children)}), got {list(batch_sizes)}")
        object.__setattr__(self, "batch_sizes", tuple(int(s) for s in batch_sizes))

    def _fields(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}

    def per_row(self, batch: int) -> PerRow:
        if batch != sum(self.batch_sizes):
            raise ConfigError(
                f"BatchSplit(batch_sizes={list(self.batch_sizes)}) covers {sum(self.batch_sizes)} rows, "
                f"the batch {batch}"
            )
        return PerRow([c for c, n in zip(self.children, self.batch_sizes, strict=True) for _ in range(n)])


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Parallel(Rows):
    """The same input through each child; outputs concatenated along the batch, branch by branch."""

    kind = "parallel"

    def replicas(self) -> int:
        return len(self.children)

    def per_row(self, batch: int) -> PerRow:
        if batch % len(self.children):
            raise ConfigError(
                f"Parallel with {len(self.children)} branches got a batch of {batch} rows; "
                "the model's input is repeated once per branch"
            )
        return PerRow([c for c in self.children for _ in range(batch // len(self.children))])
