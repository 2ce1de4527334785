"""A request's events as the engine produces them, read by another thread or an asyncio task."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from adapterkit.errors import AdapterError


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One event of a running request: new completion text; the last one has a ``finish_reason``
    (``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``, then with ``error`` set, and ``code``
    ``"adapter_failed"`` where the request's own adapter raised: the request's fault, not the server's)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    code: str | None = None


class QueueFull(AdapterError):
    """The engine's waiting queue is at its bound; try again later (HTTP 429)."""


class Stream:
    """The events of one request. Iterate (blocking) or ``async for`` (asyncio); the last Chunk has a
    ``finish_reason``. ``tokens`` and ``logprobs`` grow with the completion (the log-probability of each
    chosen token under the model's distribution, before temperature)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = threading.Event()
        self._wake = wake
        self.tokens: list[int] = []
        self.logprobs: list[float] = []

    def put(self, chunk: Chunk) -> None:
        """Hand ``chunk`` to the reader (engine side)."""
        with self._cond:
            self._chunks.append(chunk)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # the reader's loop has closed
                loop.call_soon_threadsafe(event.set)

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            with self._cond:
                while not self._chunks:
                    self._cond.wait()
                chunk = self._chunks.popleft()
            yield chunk
            if chunk.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._events()

    async def _events(self) -> AsyncIterator[Chunk]:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._cond:
            self._waiters.append(waiter)
        try:
            while True:
                with self._cond:
                    chunk = self._chunks.popleft() if self._chunks else None
                if chunk is None:
                    await event.wait()
                    event.clear()  # before the next look at the queue, so no put is missed
                    continue
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._waiters.remove(waiter)

    def result(self) -> tuple[str, Chunk]:
        """Block until the request ends: its whole text and its last chunk."""
        chunks = list(self)
        return "".join(c.text for c in chunks), chunks[-1]

    def cancel(self) -> None:
        """The client went away: the sequence leaves the batch at the next step; its slot and cache are freed."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
