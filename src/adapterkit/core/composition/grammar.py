"""What may nest in what (AdapterHub's table, plus ``PerRow``), JSON round trips, and the checks a setup passes
before it runs: its nesting, and whether each adapter's method can run in the blocks around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from adapterkit.core.composition.blocks import Arrow, Average, Block, Fuse, Split, Stack
from adapterkit.core.composition.rows import BatchSplit, Parallel, PerRow, Rows
from adapterkit.errors import ConfigError

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
    rows = isinstance(block, (PerRow, Rows))
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
