"""The adapters a server can serve: names -> sources, loaded into the model on first use, kept in an LRU.

A source is a folder on the server (an adapter folder in any format :func:`adapterkit.core.io.load_adapter`
reads, or an ``adapterkit train`` output) or ``hub:owner/name[@tag|revision]`` (pulled through
:mod:`adapterkit.hub.client`, which verifies every byte and the base model). Each load gets its own
name inside the model (``serve_1``, ``serve_2``, ...): replacing an adapter at runtime loads the new
one beside the old, and the old one leaves when its last request has.

The LRU is bounded by count and bytes; only idle adapters are evicted (none of the registry's own
requests holds it and the engine has none queued or running with it, :meth:`Engine.in_use`). When
every loaded adapter is busy the bound is passed rather than a request refused: the engine's queue
bounds how many adapters can be busy at once. Model changes run through ``runner.call`` (in the engine
thread, between decoding steps); hub downloads run on a small pool of their own (capped at the operator's
byte bound before a byte is read, following no redirect off the hub's origin), so a stalled hub holds
neither running requests nor the loads of local folders, which need no pool.

Names are plain (letters, digits, ``._/-``): a name that looks like a hub reference would hide its source.
A source whose files failed to load is not listed (:meth:`Registry.listed`) until it is added again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from adapterkit.core import adapters, io
from adapterkit.core.backbone import head_parameters
from adapterkit.errors import AdapterError, shown
from adapterkit.hub import client
from adapterkit.serve import defaults


class AdapterUnavailable(AdapterError):
    """A name that cannot be served: unknown (404) or failing to load (400); the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Runner(Protocol):
    """What the registry needs of an engine (:class:`adapterkit.serve.engine.Engine` has it)."""

    def call(self, fn: Callable[[Any], Any]) -> Future: ...

    def in_use(self) -> set[str]: ...


@dataclasses.dataclass(frozen=True)
class Bounds:
    """How many adapters, and how many bytes of adapter weights, stay loaded while idle."""

    max_adapters: int = defaults.MAX_ADAPTERS
    max_bytes: int = defaults.MAX_ADAPTER_BYTES

    def __post_init__(self) -> None:
        if self.max_adapters < 1 or self.max_bytes < 1:
            raise AdapterError(f"need max_adapters >= 1 and max_bytes >= 1 (got {self.max_adapters}, {self.max_bytes})")


@dataclasses.dataclass
class Loaded:
    """One adapter in the model: its name there, its weight bytes, its task head (encoders) and users."""

    inner: str
    source: str
    size: int
    head: dict[str, Any]
    users: int = 0
    used: float = dataclasses.field(default_factory=time.monotonic)


class Direct:
    """A :class:`Runner` for models served without an engine (encoders): one thread owns the model, so
    requests and adapter loads take turns; ``in_use`` names the adapter of the call running."""

    def __init__(self, model) -> None:
        self.model, self.pool, self.busy = model, ThreadPoolExecutor(1, thread_name_prefix="encoder"), set()

    def call(self, fn: Callable[[Any], Any]) -> Future:
        return self.pool.submit(fn, self.model)

    def run(self, adapter: str | None, fn: Callable[[Any], Any]) -> Future:
        """``fn(model)`` with ``adapter`` active (None: the base model)."""

        def wrapped(model):
            self.busy.add(adapter)
            try:
                with adapters.use(model, adapter) if adapter else adapters.disable_adapters(model):
                    return fn(model)
            finally:
                self.busy.discard(adapter)

        return self.pool.submit(wrapped, self.model)

    def in_use(self) -> set[str]:
        return {name for name in self.busy if name}

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        self.pool.shutdown(wait=drain, cancel_futures=not drain)


Hook = Callable[[str], None]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")  # no ":" or "@": a name never reads as a hub reference
HUB_FETCHES = 4  # hub downloads at once: more wait, local folders never do


def check_name(name: str) -> str:
    """``name`` if it can name an adapter, else :class:`AdapterUnavailable` (400) saying what fits."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise AdapterUnavailable(
            f"{shown(str(name))[:200]!r} cannot name an adapter: use 1-128 letters, digits and ._/- "
            "(starting with a letter or digit; no ':' or '@', which hub references use)"
        )
    return name


class Registry:
    """Serveable names, and the adapters loaded for them (see the module's docstring)."""

    def __init__(
        self,
        runner: Runner,
        sources: dict[str, str] | None = None,
        bounds: Bounds | None = None,
        hub: str | None = None,
        on_event: Hook | None = None,
    ) -> None:
        self.runner, self.bounds, self.hub = runner, bounds or Bounds(), hub
        self.sources: dict[str, str] = {}
        self.refs: set[str] = set()  # hub references requests named directly (with --allow-hub-refs)
        self.loaded: dict[str, Loaded] = {}  # by source: replacing a name's source loads anew
        self.pending: dict[str, asyncio.Future] = {}
        self.failed: set[str] = set()  # sources whose files did not load: not listed until added again
        self.ids = itertools.count(1)
        self.fetches = ThreadPoolExecutor(HUB_FETCHES, thread_name_prefix="adapter-fetch")
        self.lock = threading.Lock()
        self.on_event = on_event or (lambda event: None)
        self.base_head: dict[str, Any] | None = None
        for name, source in (sources or {}).items():
            self.add(name, source)

    # -- names ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.sources)

    def listed(self) -> dict[str, str]:
        """The names that can be served and their sources (those whose files failed to load left out)."""
        return {n: s for n, s in self.sources.items() if s not in self.failed}

    def add(self, name: str, source: str) -> None:
        """Serve ``source`` as ``name`` (replacing what ``name`` was); checked, loaded on first use."""
        check_name(name)
        check_source(source)
        self.failed.discard(source)
        self.sources[name] = source

    def check(self, source: str) -> str:
        check_source(source)
        return source

    def remove(self, name: str) -> None:
        if name not in self.sources:
            raise AdapterUnavailable(f"no adapter named {shown(name)!r}", 404)
        del self.sources[name]

    def source_of(self, name: str) -> str:
        if name not in self.sources:
            raise AdapterUnavailable(f"the model {shown(name)!r} does not exist: GET /v1/models lists them", 404)
        return self.sources[name]

    # -- use --------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, source: str) -> AsyncIterator[Loaded]:
        """The loaded adapter of ``source`` (loading it first if needed), held for the block's duration."""
        entry = await self._loaded(source)
        entry.users += 1
        entry.used = time.monotonic()
        try:
            yield entry
        finally:
            entry.users -= 1

    async def _loaded(self, source: str) -> Loaded:
        if source in self.loaded:
            return self.loaded[source]
        if source not in self.pending:  # one load per source, however many requests wait for it
            self.pending[source] = asyncio.ensure_future(self._load(source))
            # its waiters may all have gone (out of time): the failure is theirs, not one to log
            self.pending[source].add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            return await asyncio.shield(self.pending[source])
        finally:
            if self.pending.get(source) is not None and self.pending[source].done():
                del self.pending[source]

    async def _load(self, source: str) -> Loaded:
        try:
            folder = await self._fetched(source)
            inner = f"serve_{next(self.ids)}"
            try:
                call = self.runner.call(lambda model: self._install(model, folder, inner))
                size, head = await asyncio.wrap_future(call)
            except Exception as e:  # noqa: BLE001 (any failure of one adapter's files is that adapter's)
                self.on_event("load_failure")
                self.failed.add(source)
                message = f"the adapter {shown(source)!r} cannot be loaded: {shown(str(e))[:500]}"
                raise AdapterUnavailable(message) from e
        except BaseException:
            self.refs.discard(source)  # a reference that does not load is forgotten: traffic cannot grow refs
            raise
        self.loaded[source] = Loaded(inner, source, size, head)
        self.on_event("load")
        await self.evict(keep=source)
        return self.loaded[source]

    async def _fetched(self, source: str) -> Path:
        """The adapter's folder: a hub download on the fetch pool, a local folder at once."""
        if client.is_ref(source):
            return await asyncio.wrap_future(self.fetches.submit(self._fetch, source))
        return self._fetch(source)

    def _fetch(self, source: str) -> Path:
        """The adapter's folder on this machine (pulled and verified for a hub reference)."""
        try:
            return client.resolve(source, self.hub, max_bytes=self.bounds.max_bytes, same_origin=True)
        except Exception as e:  # noqa: BLE001
            self.on_event("load_failure")
            raise AdapterUnavailable(f"the adapter {shown(source)!r} cannot be fetched: {shown(str(e))[:500]}") from e

    def _install(self, model, folder: Path, inner: str) -> tuple[int, dict[str, Any]]:
        """Load into ``model`` (engine thread); its bytes, and its task head kept aside (encoders)."""
        heads = head_parameters(model)
        if self.base_head is None:
            self.base_head = {k: p.detach().clone() for k, p in heads.items()}
        try:
            io.load_adapter(model, folder, inner, load_head=bool(heads))
        except BaseException:
            if inner in adapters.list_adapters(model):
                adapters.delete_adapter(model, inner)
            raise
        weights = io.adapter_state_dict(model, inner)
        broken = [key for key, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if broken:
            adapters.delete_adapter(model, inner)
            raise AdapterError(f"{len(broken)} of its tensors hold NaN or inf values (the first: {broken[0]})")
        head = {k: p.detach().clone() for k, p in heads.items()}
        for k, p in heads.items():  # the model keeps the base's head: each request puts its own in
            p.data.copy_(self.base_head[k])
        size = sum(t.numel() * t.element_size() for t in weights.values())
        return size, head

    # -- eviction ---------------------------------------------------------------------------------
    async def evict(self, keep: str | None = None) -> None:
        """Unload idle adapters, least recently used first, while over a bound; and stale ones (replaced).
        ``keep``: the source just loaded, for the request that is about to use it."""
        for entry in self._victims(keep):
            del self.loaded[entry.source]
            self.refs.discard(entry.source)  # a reference a request named is served while loaded only
            await asyncio.wrap_future(self.runner.call(lambda model, n=entry.inner: adapters.delete_adapter(model, n)))
            self.on_event("eviction")

    def _victims(self, keep: str | None) -> list[Loaded]:
        busy = self.runner.in_use()
        idle = [e for e in self.loaded.values() if e.users == 0 and e.inner not in busy and e.source != keep]
        idle.sort(key=lambda e: e.used)
        served = set(self.sources.values()) | self.refs
        victims = [e for e in idle if e.source not in served]  # replaced or removed: no name leads to it
        count, size = len(self.loaded) - len(victims), sum(e.size for e in self.loaded.values() if e not in victims)
        for entry in (e for e in idle if e not in victims):
            if count <= self.bounds.max_adapters and size <= self.bounds.max_bytes:
                break
            victims.append(entry)
            count, size = count - 1, size - entry.size
        return victims

    def close(self) -> None:
        """Stop the hub downloads that wait (those running end with their own timeouts)."""
        self.fetches.shutdown(wait=False, cancel_futures=True)

    def resident(self) -> dict[str, int]:
        """Loaded sources and their weight bytes."""
        return {e.source: e.size for e in self.loaded.values()}


def check_source(source: str) -> None:
    """A hub reference that parses, or a folder that holds an adapter; else :class:`AdapterUnavailable`."""
    try:
        if client.is_ref(source):
            client.parse_ref(source)
        else:
            io.inspect_adapter(client.resolve(source))
    except (AdapterError, OSError, ValueError, KeyError) as e:
        raise AdapterUnavailable(f"{shown(source)!r} is not an adapter: {shown(str(e))[:500]}") from None
