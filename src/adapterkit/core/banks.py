"""Adapters kept stacked at every site, for running many adapters at once on a frozen model.

A ``PerRow`` batch finds its groups and stacks their weights at every site on every call: what
autograd needs while adapters train. A server's adapters (and ``generate``'s) do not change between
steps, only when one is loaded or evicted. So a :class:`Bank` gives each adapter a slot and keeps, at
each site, each group's tables (``AdapterModule.row_tables``: the adapters that compute together)
with one entry per member, written when an adapter enters or leaves; a step's :class:`Banked` setup
carries one slot index per row. A site's work per step is then, per group, one index lookup and a
gather of its tables, whatever the number of adapters the bank holds (vLLM's stacked LoRA slots and
per-step mapping; LoRAX's batch adapter metadata).

A row's result is the same bits as in a ``PerRow`` batch: the gathered entries are copies of the same
tables, and the batched computation is the method's own (``adapt_tables``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.composition import PerRow, check_support
from adapterkit.core.hosts import hidden, take_rows
from adapterkit.errors import AdapterError

NONE = 0  # the slot of rows without an adapter


class Group:
    """The adapters at one site with one ``row_key``: their tables (one entry per member, free entries
    and the last entry the identity) or, for methods without tables, the members in a list."""

    def __init__(self, module: nn.Module, capacity: int, device: torch.device) -> None:
        self.cls, self.edits_inputs = type(module), module.edits_inputs
        self.slots: dict[int, int] = {}  # bank slot -> entry
        self.entries: list[nn.Module | None] = []
        self.tables: list[torch.Tensor] | None = None
        self.identity: list[torch.Tensor] = []
        self.remap = self.order = torch.empty(0, dtype=torch.long)  # bank slot -> entry; entry -> member
        self.members: list[nn.Module] = []  # the entries that hold an adapter, in entry order
        self.capacity, self.device = capacity, device

    def add(self, slot: int, module: nn.Module) -> None:
        one = self.cls.row_tables([module])  # (2, ...) each: the module's entry, then the identity
        if one is None:
            self.slots[slot] = len(self.entries)
            self.entries.append(module)
            self._index()
            return
        entry = self.entries.index(None) if None in self.entries else self._grow(one)
        self.entries[entry] = module
        for table, new in zip(self.tables, one, strict=True):
            table[entry] = new[0]
        self.slots[slot] = entry
        self._index()

    def remove(self, slot: int) -> None:
        entry = self.slots.pop(slot)
        if self.tables is None:  # a list: later members move up
            del self.entries[entry]
            self.slots = {s: e - (e > entry) for s, e in self.slots.items()}
        else:
            self.entries[entry] = None
            for table, identity in zip(self.tables, self.identity, strict=True):
                table[entry] = identity
        self._index()

    def _grow(self, one: list[torch.Tensor]) -> int:
        """Room for twice the entries (the identity stays last); the first free entry."""
        old = len(self.entries)
        size = max(4, 2 * old)
        self.identity = [t[1] for t in one]
        fresh = [t[1:].expand(size + 1, *t.shape[1:]).clone() for t in one]
        if self.tables is not None:
            for table, new in zip(self.tables, fresh, strict=True):
                new[:old] = table[:old]
        self.tables = fresh
        self.entries += [None] * (size - old)
        return old

    def _index(self) -> None:
        """The bank slot -> entry map (non-members: the identity entry, or "none of the list"), and the
        entry -> position among the members map that methods reading a member list need."""
        none = len(self.entries)
        remap = torch.full((self.capacity,), none, dtype=torch.long)
        if self.slots:
            remap[list(self.slots)] = torch.tensor(list(self.slots.values()), dtype=torch.long)
        members = [e for e, m in enumerate(self.entries) if m is not None]
        order = torch.full((none + 1,), len(members), dtype=torch.long)
        order[members] = torch.arange(len(members))
        self.remap, self.order = remap.to(self.device), order.to(self.device)
        self.members = [self.entries[e] for e in members]

    def adapt(self, host: nn.Module, x: Any, out: Any, index: torch.Tensor) -> Any:
        local = self.remap.index_select(0, index)
        if self.tables is None:
            return self.cls.adapt_rows(host, x, out, self.entries, local)
        return self.cls.adapt_tables(host, x, out, take_rows(self.tables, local), self.members)

    def adapt_inputs(self, host: nn.Module, args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict]:
        local = self.remap.index_select(0, index)
        if self.tables is None:
            return self.cls.adapt_inputs_rows(host, args, kwargs, self.entries, local)
        return self.cls.adapt_inputs_tables(host, args, kwargs, take_rows(self.tables, local), self.members)

    def kv(self, key: torch.Tensor, index: torch.Tensor) -> list:
        """Attention prefixes per row (the method's ``kv_rows`` over the members)."""
        local = self.order.index_select(0, self.remap.index_select(0, index))
        return self.cls.kv_rows(self.members, local, key)


class Bank:
    """Slots for the adapters of ``model``: :meth:`sync` gives every adapter the model holds a slot (or
    only ``names``), :meth:`rows` a setup that runs row ``i`` through adapter ``rows[i]``."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        self.model, self.only = model, None if names is None else list(dict.fromkeys(names))
        self.slots: dict[str, int] = {}
        # where an adapter's first module sat when it came, and that module: a replaced adapter's differs
        self.stamps: dict[str, tuple[nn.Module, nn.Module]] = {}
        self.sites: dict[int, dict[Any, Group]] = {}  # id(host slot) -> row_key -> group
        self.placed: dict[str, list[tuple[dict, Any]]] = {}
        self.whole: set[str] = set()  # adapters whose prompts must be seen whole (``chunked_prompts`` False)
        self.capacity = 8
        self.device = next(model.parameters()).device
        self.sync()

    def sync(self, reload: bool = False) -> None:
        """Match the model: adapters deleted (or replaced) since leave their slots, new ones take one. The
        tables are copies, taken when an adapter takes its slot: after changing weights in place (training),
        ``reload=True`` takes them again."""
        state = self.model.__dict__.get(st.STATE)
        present = [n for n in (state.configs if state else []) if self.only is None or n in self.only]
        stale = [n for n in self.slots if reload or n not in present or not self._same(n)]
        for name in stale:
            self.remove(name)
        for name in present:
            if name not in self.slots:
                self.add(name)

    def add(self, name: str) -> None:
        """Give adapter ``name`` a slot and write its weights into every site's group tables."""
        self._check(name)
        slot = next(i for i in range(1, len(self.slots) + 2) if i not in self.slots.values())
        if slot >= self.capacity:
            self._widen(2 * self.capacity)
        self.slots[name], self.placed[name] = slot, []
        with torch.no_grad():
            for host, module in st.adapter_modules(self.model, name):
                self.stamps.setdefault(name, (host._modules[st.SLOT], module))
                if not getattr(module, "chunked_prompts", True):
                    self.whole.add(name)
                site = self.sites.setdefault(id(host._modules[st.SLOT]), {})
                key = module.row_key()
                group = site.setdefault(key, Group(module, self.capacity, self.device))
                group.add(slot, module)
                self.placed[name].append((site, key))

    def remove(self, name: str) -> None:
        """Free adapter ``name``'s slot: its entries become the identity, and nothing of it is kept."""
        slot = self.slots.pop(name)
        self.stamps.pop(name, None)
        self.whole.discard(name)
        with torch.no_grad():
            for site, key in self.placed.pop(name):
                site[key].remove(slot)
                if not site[key].slots:
                    del site[key]

    def _check(self, name: str) -> None:
        """What ``adapters.use`` checks of a ``PerRow`` setup, once per adapter rather than per step."""
        state = st.get_state(self.model)
        if name in state.merged:
            raise AdapterError(f"adapter {name!r} is merged into the weights; unmerge_adapter it before banking it")
        method = state.configs[name].method
        check_support(PerRow([name]), lambda n: ((method, m) for _, m in st.adapter_modules(self.model, n)))

    def _widen(self, capacity: int) -> None:
        self.capacity = capacity
        for site in self.sites.values():
            for group in site.values():
                group.capacity = capacity
                group._index()

    def _same(self, name: str) -> bool:
        """Whether adapter ``name`` is still the one that took its slot (a dict lookup, not a model walk)."""
        if name not in self.stamps:
            return True  # an adapter with no module (all merged away): nothing to go stale
        host_slot, module = self.stamps[name]
        return host_slot._modules.get(name) is module

    def slot(self, name: str | None) -> int:
        if name is None:
            return NONE
        if name not in self.slots:
            raise AdapterError(f"adapter {name!r} has no slot in this bank; add it to the model, then bank.sync()")
        return self.slots[name]

    def groups(self, host_slot: nn.Module, used: frozenset[int]) -> Iterator[Group]:
        """The groups at a site that some row of the step uses."""
        for group in self.sites.get(id(host_slot), {}).values():
            if not used.isdisjoint(group.slots):
                yield group

    def rows(self, names: Sequence[str | None]) -> Banked:
        """The setup that runs row ``i`` through adapter ``names[i]`` (None: the base model)."""
        return Banked(self, names)

    def use(self, names: Sequence[str | None]) -> contextlib.AbstractContextManager[None]:
        """Run row ``i`` through adapter ``names[i]`` inside the block (this thread / task only): what
        ``adapters.use(model, PerRow(names))`` runs, its checks made when each adapter took its slot."""
        state = st.get_state(self.model)
        if state.merged:
            raise AdapterError(
                f"adapters {sorted(state.merged)} are merged into the weights; unmerge_adapter them first"
            )
        return state.override(self.rows(names))


class Banked(PerRow):
    """``PerRow`` over a :class:`Bank`: the same rows and results, each site's groups read from the bank.
    Equal to (and checked as) the ``PerRow`` of the same names."""

    def __init__(self, bank: Bank, rows: Sequence[str | None]) -> None:
        super().__init__(rows)
        slots = [bank.slot(r) for r in rows]
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "index", torch.tensor(slots, device=bank.device))
        object.__setattr__(self, "used", frozenset(slots) - {NONE})

    def apply(self, slot, host, x, out):
        self._check(hidden(out).shape[0])
        for group in self.bank.groups(slot, self.used):
            out = group.adapt(host, x, out, self.index)
        return out

    def apply_inputs(self, slot, host, args, kwargs):
        for group in self.bank.groups(slot, self.used):
            if group.edits_inputs:
                args, kwargs = group.adapt_inputs(host, args, kwargs, self.index)
        return args, kwargs

    def prefixes(self, slot, key):
        self._check(key.shape[0])
        return [p for group in self.bank.groups(slot, self.used) for p in group.kv(key, self.index)]


__all__ = ["Bank", "Banked"]
