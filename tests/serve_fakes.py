"""A fake of :class:`adapterkit.serve.engine.Engine` for the HTTP layer's tests: deterministic text,
controllable delays and failures, a record of cancellations; a real model behind ``call`` (so adapters
really load, and their bytes are real), and a real uvicorn server in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from adapterkit.serve.engine import Chunk, ContextExceeded, QueueFull, Sampling


def words(ids: list[int], adapter: str | None, sampling: Sampling) -> list[str]:
    """The fake completion: one word per token, naming the adapter and depending on the prompt and seed."""
    salt = sum(ids) + (sampling.seed or 0)
    return [f"{adapter or 'base'}.{(salt + i) % 97}" for i in range(sampling.max_tokens)]


class FakeStream:
    def __init__(self, engine: FakeEngine, ids: list[int], adapter: str | None, sampling: Sampling) -> None:
        self.engine, self.ids, self.adapter, self.sampling = engine, ids, adapter, sampling
        self.cancelled, self.done = threading.Event(), False

    def pieces(self) -> list[Chunk]:
        """The chunks: one word each (space-separated), cut before the first stop string."""
        tokens = words(self.ids, self.adapter, self.sampling)
        texts = [(" " if i else "") + w for i, w in enumerate(tokens)]
        whole = "".join(texts)
        cuts = [whole.index(s) for s in self.sampling.stop if s in whole]
        end = min(cuts) if cuts else len(whole)
        out, seen = [], 0
        for text in texts:
            if seen >= end:
                break
            out.append(text[: end - seen])
            seen += len(text)
        return [Chunk(t) for t in out], "stop" if cuts else "length"

    def _final(self, reason: str, count: int, error: str | None = None, code: str | None = None) -> Chunk:
        self.done = True
        return Chunk("", reason, len(self.ids), count, error, code)

    async def _events(self):
        chunks, reason = self.pieces()
        for count, chunk in enumerate(chunks):
            await asyncio.sleep(self.engine.delay)
            if self.cancelled.is_set():
                yield self._final("cancelled", count)
                return
            if self.adapter in self.engine.failing and count == 1:
                yield self._final("error", count, "adapter 'a' failed: RuntimeError", "adapter_failed")
                return
            yield chunk
        yield self._final(reason, len(chunks))

    def __aiter__(self):
        return self._events()

    def __iter__(self):
        raise NotImplementedError("the HTTP layer iterates with async for")

    def cancel(self) -> None:
        done = self.done
        self.cancelled.set()  # first, so that whoever sees the cancel counted sees the stream stopped
        if not done:
            self.engine.cancels.append(self)


class FakeEngine:
    """The engine's interface: ``submit`` streams fake words; ``call`` runs on a real model in one thread."""

    def __init__(self, model=None, capacity: int = 64, delay: float = 0.001, max_context: int = 128) -> None:
        self.model, self.capacity, self.delay, self.max_context = model, capacity, delay, max_context
        self.streams: list[FakeStream] = []
        self.cancels: list[FakeStream] = []
        self.failing: set[str] = set()
        self.pool = ThreadPoolExecutor(1)
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        self.stopped = drain

    def live(self) -> list[FakeStream]:
        return [s for s in self.streams if not s.done and not s.cancelled.is_set()]

    def submit(self, ids: list[int], adapter: str | None, sampling: Sampling, images=None) -> FakeStream:
        if len(self.live()) >= self.capacity:
            raise QueueFull("the queue is full")
        stream = FakeStream(self, ids, adapter, sampling)
        self.streams.append(stream)
        return stream

    def check_prompt(self, ids: list[int], max_tokens: int = 1) -> list[int]:
        """The engine's context rule: prompt plus max_tokens within ``max_context``."""
        if len(ids) + max_tokens > self.max_context:
            raise ContextExceeded(f"the prompt has {len(ids)} tokens and asks for {max_tokens} more; too long")
        return ids

    def call(self, fn):
        return self.pool.submit(fn, self.model)

    def in_use(self) -> set[str]:
        return {s.adapter for s in self.live() if s.adapter}

    def stats(self) -> dict[str, float]:
        return {"running": len(self.live()), "queued": 0, "last_batch_size": min(len(self.live()), 16)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server of ``app`` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
