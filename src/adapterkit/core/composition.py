"""Composition blocks: how several adapters run together.

A block is a small frozen data class; blocks nest and round-trip through JSON (``to_dict`` /
:func:`from_dict`). The model's :class:`~adapterkit.core.state.State` holds one block (a list of names
is a :class:`Stack`) and every slot evaluates it at its host:

* ``Stack(a, b)``: ``b`` runs on ``a``'s output at every site.
* ``Average(a, b, weights=[.7, .3])``: the site's output is ``sum_i w_i out_i``, weights
  normalised to 1 (so for residual adapters ``out + sum_i w_i A_i(out)``).
* ``Fuse(a, b, c)``: AdapterFusion (Pfeiffer et al. 2021), a trained attention over the frozen
  bottleneck adapters' outputs (:mod:`adapterkit.core.fusion`).
* ``Arrow(a, b, c, top_k=3, temperature=1.0)``: Arrow routing among LoRA adapters (Ostapenko et al.
  2024, as peft implements it): per token and site, gradient-free, from each LoRA's weights alone.
* ``Split(a, b, splits=[3, 5])``: the first 3 positions through ``a``, the next 5 through ``b``.
* ``PerRow(["a", None, "b"])``: one adapter (or none, or a block) per row of the batch. Adapters
  of one method at one site run as one batched computation (stacked weights gathered per row).
* ``BatchSplit(a, b, batch_sizes=[2, 3])``: rows 0-1 through ``a``, rows 2-4 through ``b``.
* ``Parallel(a, b)``: the model's inputs are repeated once per branch; branch ``i`` sees rows
  ``i*B .. (i+1)*B - 1`` and the outputs come back concatenated along the batch.

Adapter modules say which blocks they can run in (``AdapterModule.blocks``); :func:`check_support`
turns a combination that makes no sense into an error naming it and the reason.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from adapterkit.core.hosts import first_input, hidden, put, take, with_first_input, with_hidden
from adapterkit.core.lru import LRU
from adapterkit.errors import ConfigError

Child = Any  # str | Block (| None inside PerRow)


# Per-row index tensors of PerRow groups, and the PerRow that a BatchSplit/Parallel means per batch size:
# cheap to make, so a small cache serves the many slots of one forward and a server's recurring mixes.
INDEX_CACHE = LRU(256)
ROWS_CACHE = LRU(64)
CACHES: dict[str, LRU] = {"per_row_index": INDEX_CACHE, "rows_by_batch": ROWS_CACHE}


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


class _Rows(Block):
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
class BatchSplit(_Rows):
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
class Parallel(_Rows):
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


BLOCKS: dict[str, type[Block]] = {b.kind: b for b in (Stack, Average, Split, Fuse, Arrow, PerRow, BatchSplit, Parallel)}
# Which blocks each block may hold (AdapterHub's table, plus PerRow).
ALLOWED: dict[type[Block], tuple[type, ...]] = {
    Stack: (str, Fuse, Split, Parallel, BatchSplit, Average, PerRow, Arrow),
    Fuse: (str,),
    Arrow: (str,),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, Split, BatchSplit, Average),
    Average: (str, Stack, Split, BatchSplit),
    PerRow: (str, type(None), Stack, Split, Average, Fuse, Arrow),
}


def from_dict(data: Any) -> Block | str | None:
    """Inverse of ``Block.to_dict`` (names and ``None`` pass through)."""
    if data is None or isinstance(data, str):
        return data
    if not isinstance(data, dict) or data.get("block") not in BLOCKS:
        raise ConfigError(f"not a composition block: {data!r}; known blocks: {', '.join(BLOCKS)}")
    data = dict(data)
    cls = BLOCKS[data.pop("block")]
    if cls is PerRow:
        return PerRow([from_dict(r) for r in data["rows"]])
    children = [from_dict(c) for c in data.pop("children")]
    return cls(*children, **data)


def parse(setup: str | Sequence[str] | Block | None) -> Block:
    """A name, a list of names (stacked), a block, or None (no adapter) as a block."""
    if setup is None:
        return Stack()
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, Block):
        _check_nesting(setup, top=True)
        return setup
    return Stack(*setup)


def _check_nesting(block: Block, top: bool, inside: type | None = None) -> None:
    if isinstance(block, Parallel) and not (top or inside is Stack):
        raise ConfigError("Parallel repeats the model's input, so it must be the outermost block or sit in a Stack")
    for child in block.children:
        if not isinstance(child, ALLOWED[type(block)]):
            allowed = ", ".join(t.__name__ for t in ALLOWED[type(block)] if t is not type(None))
            raise ConfigError(f"{type(block).__name__} cannot hold {child!r}; it may hold {allowed}")
        if isinstance(child, Block):
            _check_nesting(child, top=False, inside=type(block))
    if top and sum(1 for b in walk(block) if isinstance(b, Parallel)) > 1:
        raise ConfigError("one Parallel block per setup: the input is repeated once")


def walk(block: Block) -> Iterator[Block]:
    """The block and every block inside it."""
    yield block
    for child in block.children:
        if isinstance(child, Block):
            yield from walk(child)


def contexts(block: Block, around: frozenset[str] = frozenset()) -> Iterator[tuple[str, frozenset[str]]]:
    """``(adapter name, kinds of block it runs in)``. Row blocks say ``rows`` for a name that is a
    direct entry (computed batched) and ``rows_nested`` for one inside a block entry (sliced)."""
    around = around | ({block.kind} if block.kind in ("average", "split", "fuse", "arrow") else set())
    rows = isinstance(block, (PerRow, _Rows))
    for child in block.children:
        if isinstance(child, Block):
            yield from contexts(child, around | ({"rows_nested"} if rows else set()))
        elif child is not None:
            yield child, around | ({"rows"} if rows else set())


def check_support(setup: Block, modules_of) -> None:
    """Raise for an adapter placed in a block its method cannot run in.

    ``modules_of(name)`` yields ``(method, module)`` for each module of adapter ``name``.
    """
    for name, kinds in contexts(setup):
        for method, module in modules_of(name):
            missing = sorted(kinds - module.blocks)
            if missing:
                where = {
                    "rows": "PerRow/BatchSplit/Parallel",
                    "rows_nested": "a block inside PerRow/BatchSplit/Parallel",
                }
                raise ConfigError(
                    f"adapter {name!r} ({method}) cannot run in {where.get(missing[0], missing[0].title())}: "
                    f"{module.explain(missing[0])}"
                )


def parse_expression(text: str) -> Block:
    """A setup written as text: ``"a"``, ``"a, b"`` (a stack), ``"Fuse(a, b, c)"``,
    ``"Average(a, b, weights=[1, 3])"``, ``"PerRow([a, None, b])"``, or ``to_dict()`` JSON.

    Only block names, adapter names (quote names with ``-``), numbers and lists are read: the
    text is parsed, never executed.
    """
    text = text.strip()
    if text.startswith("{"):
        return parse(from_dict(json.loads(text)))
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"cannot parse setup {text!r}: {e.msg}") from e
    value = _read(node)
    return parse(list(value) if isinstance(value, tuple) else value)


def _read(node: ast.AST) -> Any:
    constructors = {cls.__name__: cls for cls in BLOCKS.values()}
    if isinstance(node, ast.Name):
        return None if node.id == "None" else node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_read(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_read(e) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in constructors:
        args = [_read(a) for a in node.args]
        return constructors[node.func.id](*args, **{k.arg: _read(k.value) for k in node.keywords})
    raise ConfigError(
        f"cannot read {ast.unparse(node)!r} in a setup; use adapter names, numbers, lists and {', '.join(constructors)}"
    )
