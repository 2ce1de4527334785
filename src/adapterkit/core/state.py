"""Where adapters live in a model, and the one place that says which are active.

Each host module that carries adapters gets one child :class:`Slot` named ``adapterkit`` (a
``ModuleDict`` keyed by adapter name), so adapter parameters are ordinary parameters of the model
(``.to()``, optimizers, ``Trainer`` and DDP see them) and their names read
``<host>.adapterkit.<adapter>.<param>``: freezing and saving are one name filter.

The slot's forward hook asks the model's :class:`State` which adapters are active. A
``ContextVar`` can override that per thread / asyncio task (``disable_adapters``), so the state
is never copied into flags on modules.

Hooks of one forward hand values to later hooks (a sub-layer's input to a parallel adapter, a
prompt's "insert now" flag, gates, the L-adapter's taps) through :class:`Relay` objects, whose values
live in the forward's :func:`scratch` area: one per thread and model forward, opened by the model's
pre-hook and dropped by its forward hook, which PyTorch runs even when the forward raises. Nothing
a forward leaves there outlives it, and the caches are :class:`~adapterkit.core.lru.LRU` (:func:`caches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from adapterkit.core import composition as co
from adapterkit.core.hosts import first_input, loop_kv_rows, loop_rows
from adapterkit.core.lru import LRU
from adapterkit.errors import AdapterError

SLOT = "adapterkit"
STATE = "_adapterkit_state"  # the model attribute holding its State
CHECKED_SIZE = 256  # setups remembered as valid, per model
_OVERRIDE: ContextVar[dict[int, co.Block] | None] = ContextVar("adapterkit_active", default=None)


class _Frames(threading.local):
    """Per thread: the scratch areas of the model forwards running now, innermost last, each with the
    state that opened it. The first (owner None) serves modules called on their own, outside a model."""

    def __init__(self) -> None:
        self.stack: list[tuple[State | None, dict]] = [(None, {})]


_FRAMES = _Frames()


def scratch() -> dict:
    """The current model forward's scratch area (this thread's): what hooks hand to later hooks of the
    same forward, keyed by :class:`Relay`. Modules called on their own, outside a model forward, share
    one area per thread, emptied when the next model forward begins."""
    return _FRAMES.stack[-1][1]


class Relay:
    """A value that one hook hands to a later hook of the same forward (per thread), kept in the
    forward's :func:`scratch` area so that it goes when the forward ends, even by an error."""

    def put(self, value: Any) -> None:
        scratch()[self] = value

    def get(self, default: Any = None) -> Any:
        return scratch().get(self, default)

    def take(self, default: Any = None) -> Any:
        """The value, removed from the scratch area (``default`` if none was put)."""
        return scratch().pop(self, default)


@dataclasses.dataclass
class Change:
    """A change to the model outside adapterkit's slots: what undoes it, and the adapters that need it."""

    undo: Callable[[], None]
    users: set[str]


@dataclasses.dataclass(eq=False)
class State:
    """Adapters of one model: configs, fusions, the active setup, merged adapters, the base fingerprint,
    and the changes methods made to the model outside their slots (undone when no adapter needs them)."""

    configs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fusions: dict[str, Any] = dataclasses.field(default_factory=dict)
    active: co.Block = dataclasses.field(default_factory=co.Stack)
    merged: set[str] = dataclasses.field(default_factory=set)
    fingerprint: str | None = None
    checked: LRU = dataclasses.field(default_factory=lambda: LRU(CHECKED_SIZE))  # valid setups; cleared on change
    changes: dict[str, Change] = dataclasses.field(default_factory=dict)
    building: str | None = None  # the adapter whose placements are being made: it owns the changes made now

    def current(self) -> co.Block:
        """The active setup here and now (a ``ContextVar`` override wins)."""
        overrides = _OVERRIDE.get()
        return self.active if overrides is None else overrides.get(id(self), self.active)

    @contextlib.contextmanager
    def override(self, setup: co.Block) -> Iterator[None]:
        token = _OVERRIDE.set({**(_OVERRIDE.get() or {}), id(self): setup})
        try:
            yield
        finally:
            _OVERRIDE.reset(token)

    def enter(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Model pre-hook: open this forward's scratch area, and repeat the batch per ``Parallel`` branch."""
        stack = _FRAMES.stack
        if len(stack) == 1:  # what modules called on their own left is dropped by the next model forward
            stack[0][1].clear()
        stack.append((self, {}))
        return self.replicate(args, kwargs)

    def leave(self, model: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        """Model forward hook, run even when the forward raises: drop the forward's scratch area."""
        stack = _FRAMES.stack
        if len(stack) > 1 and stack[-1][0] is self:  # not opened if an earlier pre-hook raised
            stack.pop()

    def install(self, model: nn.Module) -> None:
        """Hook ``model``: :meth:`enter` before its forward, :meth:`leave` after every other forward hook
        (the slot on the model itself runs before it), and when the forward raises."""
        _ensure_hook(model, model._forward_pre_hooks, self.enter, True)
        _ensure_hook(model, model._forward_hooks, self.leave, False)
        _ensure_hook(model, model._forward_hooks, self.leave, True, always_call=True)

    def replicate(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Repeat the batch once per ``Parallel`` branch (labels too)."""
        copies = self.current().replicas()
        if copies == 1:
            return None
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim]
        batch = tensors[0].shape[0]

        def repeat(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch:
                return v.repeat(copies, *[1] * (v.ndim - 1))
            return v

        return tuple(map(repeat, args)), {k: repeat(v) for k, v in kwargs.items()}


class Slot(nn.ModuleDict):
    """The adapters attached to one host module; runs them in its host's forward hooks.

    An adapter module implements ``adapt(host, x, out) -> out`` (``x`` the host's first input,
    ``out`` its output) and, if its class sets ``edits_inputs``, ``adapt_inputs(host, args,
    kwargs) -> (args, kwargs)``, run before the host's forward.
    """

    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state

    def adapter(self, name: str) -> nn.Module | None:
        """Adapter ``name``'s module here, or None (absent, or merged into the weights)."""
        module = self._modules.get(name)
        return None if module is None or name in self.state.merged else module

    def fusion(self, name: str) -> nn.Module | None:
        """Fusion ``name``'s layer here (None where the fused adapters only capture inputs)."""
        return self._modules.get(name)

    def prefixes(self, key: torch.Tensor) -> list:
        """The active setup's attention prefixes ``[(keys, values, visible rows or None)]``."""
        return self.state.current().prefixes(self, key)

    def prehook(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.state.current().apply_inputs(self, host, args, kwargs)

    def hook(self, host: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        return self.state.current().apply(self, host, first_input(args, kwargs), out)

    def sync(self, host: nn.Module) -> None:
        """Hook the host only while some adapter here is unmerged: merged LoRA costs nothing."""
        live = [a for name, a in self._modules.items() if name not in self.state.merged]
        _ensure_hook(host, host._forward_hooks, self.hook, bool(live))
        _ensure_hook(host, host._forward_pre_hooks, self.prehook, any(a.edits_inputs for a in live))
        if host.__dict__.get(STATE) is self.state:  # the model itself: its leave hook stays last
            self.state.install(host)


def _ensure_hook(host: nn.Module, hooks: dict, fn: Any, wanted: bool, always_call: bool = False) -> None:
    # Found by identity rather than a stored handle, so deep copies of the model stay right.
    key = next((k for k, h in hooks.items() if getattr(h, "__self__", None) is fn.__self__ and h == fn), None)
    if wanted and key is None:
        if hooks is host._forward_hooks:
            host.register_forward_hook(fn, with_kwargs=True, always_call=always_call)
        else:
            host.register_forward_pre_hook(fn, with_kwargs=True)
    elif not wanted and key is not None:
        del hooks[key]
        for options in (host._forward_hooks_with_kwargs, host._forward_pre_hooks_with_kwargs):
            options.pop(key, None)
        host._forward_hooks_always_called.pop(key, None)


def get_state(model: nn.Module, create: bool = False) -> State:
    state = model.__dict__.get(STATE)
    if state is None:
        if not create:
            raise AdapterError(f"{type(model).__name__} has no adapters; call ak.add_adapter first")
        state = model.__dict__[STATE] = State()
        state.install(model)
    return state


def forget(model: nn.Module) -> None:
    """Remove adapterkit's state and its model hooks: the model is as it was before the first adapter."""
    state = model.__dict__.pop(STATE, None)
    if state is not None:
        _ensure_hook(model, model._forward_pre_hooks, state.enter, False)
        _ensure_hook(model, model._forward_hooks, state.leave, False)


def caches(model: nn.Module) -> dict[str, LRU]:
    """Every cache adapterkit keeps that traffic could grow, by name: the setups ``model`` found valid,
    and the per-row indices and row layouts of ``PerRow``/``BatchSplit``/``Parallel`` (shared by all
    models). Each holds at most its ``maxsize`` entries."""
    state = model.__dict__.get(STATE)
    return {**({"checked_setups": state.checked} if state else {}), **co.CACHES}


def cache_sizes(model: nn.Module) -> dict[str, int]:
    """How many entries each of :func:`caches` holds now."""
    return {name: len(cache) for name, cache in caches(model).items()}


def change(model: nn.Module, key: str, apply: Callable[[], Callable[[], None]]) -> None:
    """Change ``model`` outside adapterkit's slots, once per ``key``: ``apply()`` makes the change and returns
    what undoes it. Called while an adapter is built (``State.building``); the change lasts as long as
    an adapter built with it remains (:func:`release`), so deleting adapters restores the model exactly."""
    state = get_state(model)
    if state.building is None:
        raise AdapterError(f"change {key!r} to the model was made outside an adapter's build(); make it there")
    if key not in state.changes:
        state.changes[key] = Change(apply(), set())
    state.changes[key].users.add(state.building)


def release(model: nn.Module, name: str) -> None:
    """Undo, newest first, the changes that no adapter but ``name`` needed; with no adapter or fusion
    left, adapterkit's state goes too."""
    state = get_state(model)
    for key in reversed(list(state.changes)):
        entry = state.changes[key]
        entry.users.discard(name)
        if not entry.users:
            entry.undo()
            del state.changes[key]
    if not state.configs and not state.fusions:
        forget(model)


def attach(host: nn.Module, name: str, adapter: nn.Module, state: State) -> None:
    """Put ``adapter`` in ``host``'s slot; a second module of the same adapter (a union of
    methods) joins the first in a :class:`Chain`."""
    slot = getattr(host, SLOT, None)
    if slot is None:
        slot = Slot(state)
        host.add_module(SLOT, slot)
    adapter.train(host.training)  # a model in eval mode gets its new modules in eval mode (dropout)
    if name in slot:
        adapter = Chain(slot[name], adapter)
    slot[name] = adapter
    slot.sync(host)


class Chain(nn.ModuleList):
    """Several modules of one adapter at one host (a union of methods), applied in order."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        parts = [*first, second] if isinstance(first, Chain) else [first, second]
        super().__init__(parts)
        self.edits_inputs = any(part.edits_inputs for part in parts)
        self.chunked_prompts = all(getattr(part, "chunked_prompts", True) for part in parts)
        self.blocks = frozenset.intersection(*(part.blocks for part in parts)) - {"arrow"}  # Arrow: lone LoRAs
        if self.edits_inputs:  # inputs are edited per row only by the parts' own batched code
            self.blocks -= {"rows", "rows_nested"}

    def explain(self, kind: str) -> str:
        for part in self:
            if kind not in part.blocks:
                return part.explain(kind)
        return "a union whose parts edit the host's inputs (gates, prompts) runs per row only as separate adapters"

    def row_key(self) -> Any:
        return id(self)

    adapt_rows = staticmethod(loop_rows)
    kv_rows = staticmethod(loop_kv_rows)

    @property
    def mergeable(self) -> bool:
        return all(part.mergeable for part in self)

    def adapt_inputs(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for part in self:
            if part.edits_inputs:
                args, kwargs = part.adapt_inputs(host, args, kwargs)
        return args, kwargs

    def adapt(self, host: nn.Module, x: Any, out: Any) -> Any:
        for part in self:
            out = part.adapt(host, x, out)
        return out

    def merge(self, host: nn.Module) -> None:
        for part in self:
            part.merge(host)

    def unmerge(self, host: nn.Module) -> None:
        for part in reversed(self):
            part.unmerge(host)

    def kv_prefix(self, key: Any) -> list:
        return [kv for part in self for kv in part.kv_prefix(key)]

    def bake(self) -> None:
        for part in self:
            getattr(part, "bake", lambda: None)()


def detach(host: nn.Module, name: str) -> None:
    slot: Slot = getattr(host, SLOT)
    del slot[name]
    slot.sync(host)
    if not len(slot):
        delattr(host, SLOT)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` as ``model.named_modules()`` gives them, without descending into adapterkit's
    slots: a walk whose cost does not grow with the adapters attached (a server keeps dozens)."""
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None and name != SLOT:
                yield from walk(f"{prefix}.{name}" if prefix else name, child)

    return walk("", model)


def base_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` without the adapters' (each parameter once)."""
    seen: set[int] = set()
    for prefix, module in base_modules(model):
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield (f"{prefix}.{name}" if prefix else name), p


def adapter_named_parameters(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapter ``name``'s entries of ``model.named_parameters()`` (each parameter once, under the name
    ``named_parameters`` gives it), found by its hosts rather than a walk of every adapter's modules."""
    seen: set[int] = set()
    for path, host in base_modules(model):
        slot = host._modules.get(SLOT)
        if isinstance(slot, Slot) and name in slot:
            where = f"{path}.{SLOT}.{name}" if path else f"{SLOT}.{name}"
            for key, p in slot[name].named_parameters(prefix=where, remove_duplicate=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield key, p


def adapter_modules(model: nn.Module, name: str) -> Iterator[tuple[nn.Module, nn.Module]]:
    """Yield ``(host, adapter module)`` for every place adapter ``name`` is attached."""
    for _, host in list(base_modules(model)):
        slot = host._modules.get(SLOT)
        if isinstance(slot, Slot) and name in slot:
            yield host, slot[name]


def sync_all(model: nn.Module) -> None:
    for _, host in base_modules(model):
        slot = host._modules.get(SLOT)
        if isinstance(slot, Slot):
            slot.sync(host)


FIXED = "fixed"  # an adapter module's submodule of parameters saved with it but never trained (VeRA's projections)


def is_trainable_param(param_name: str, name: str) -> bool:
    """True for parameters of adapter ``name`` that train: all but those under a ``fixed`` submodule."""
    return is_adapter_param(param_name, name) and f".{FIXED}." not in param_name


def is_adapter_param(param_name: str, name: str | None = None) -> bool:
    """True for parameters of adapter ``name`` (any adapter when ``name`` is None)."""
    if name is None:
        return f".{SLOT}." in f".{param_name}"
    return f".{SLOT}.{name}." in f".{param_name}"
