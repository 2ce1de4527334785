"""The serving engine: one frozen causal LM, many adapters, continuous batching, batch-invariant outputs.

A background thread loops: it runs the functions handed to :meth:`Engine.call` (adding or removing
adapters between steps), admits waiting requests while fewer than ``max_batch`` run (each one's prompt
goes through the model on its own: a prefill of exactly its tokens), then runs one decoding step for all
running sequences together (one token per sequence, each row through its own adapter: ``PerRow``), and
retires finished or cancelled sequences at once. A long request never holds a short one back.

**Batch invariance.** A request's greedy tokens do not depend on who else is in the batch:

* nothing is padded: a prefill holds one request's tokens; a decoding step one token per sequence;
* attention runs per sequence over its own KV cache (:mod:`adapterkit.serve.attention`);
* every decoding step has the same row count, ``max_batch`` (free slots are dummy rows whose outputs are
  discarded), because CPU matmul kernels reduce in an order that depends on the number of rows (measured
  with MKL on SmolLM2's down_proj: a row's result changes at 2, 16, 57 and 193 rows;
  ``benchmarks/serve_prefill_bound.py``), never on the other rows' values or on a row's position;
* per-row adapters add exact zeros (or scale by exactly 1) to rows that are not theirs.

So a request served under any load gets the same logits, bit for bit, as served alone
(``tests/test_serve_engine.py``, ``benchmarks/serve_invariance.py``). The price is that a step costs a
``max_batch``-row forward even when one sequence runs.

A failure inside one request (its adapter unknown or raising) ends that request with ``finish_reason
"error"``: a failed step is retried one adapter at a time, which by invariance gives the healthy rows
exactly what the joint step would have.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from adapterkit.core import adapters
from adapterkit.core import state as st
from adapterkit.core.composition import PerRow, Stack
from adapterkit.core.generation import end_tokens, shown_upto
from adapterkit.errors import AdapterError
from adapterkit.serve.attention import KV, Row, Step, check_model, engine_forward

T = TypeVar("T")
log = logging.getLogger(__name__)
ERROR_TEXT = 300  # characters of an exception's message passed on to the client


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen: greedy (``temperature`` 0) or sampled with nucleus ``top_p``,
    reproducibly for a given ``seed``; the completion ends before the first of the ``stop`` strings."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise AdapterError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise AdapterError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not all(isinstance(s, str) and s for s in stop):
            raise AdapterError(f"stop strings must be non-empty strings, got {list(stop)!r}")


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


class TextDeltas:
    """A completion's text as its tokens come: decoded incrementally (never splitting a multi-byte
    character), cut before the first stop string, and held back while a stop string may be forming."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.start = self.read = 0  # decode window: ids[start:read] were decoded, ids[read:] are new
        self.decoded = ""  # everything decoded so far (emitted + held)
        self.held = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Text to emit now, and whether a stop string ended the completion."""
        self.ids.append(token)
        before = self._decode(self.ids[self.start : self.read])
        after = self._decode(self.ids[self.start :])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # an incomplete character: wait
            return "", False
        self.start, self.read = self.read, len(self.ids)
        return self._push(after[len(before) :])

    def finish(self) -> tuple[str, bool]:
        """The rest of the text at the end (what incremental decoding held back), checked for stops."""
        full = self._decode(self.ids)
        emit, stopped = self._push(full[len(self.decoded) :] if full.startswith(self.decoded) else "")
        if stopped:
            return emit, True
        emit, self.held = emit + self.held, ""
        return emit, False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _push(self, delta: str) -> tuple[str, bool]:
        self.decoded += delta
        self.held += delta
        upto, stopped = shown_upto(self.held, self.stops)
        emit, self.held = self.held[:upto], "" if stopped else self.held[upto:]
        return emit, stopped


@dataclasses.dataclass(eq=False)
class _Request:
    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    stream: Stream
    text: TextDeltas
    generator: torch.Generator | None = None
    kv: KV | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def position(self) -> int:
        """The position of the last token (the one the next step feeds)."""
        return len(self.prompt) + len(self.stream.tokens) - 1


class Engine:
    """Serves one causal LM with many adapters: continuous batching, an adapter per row, per-sequence KV
    caches, batch-invariant greedy outputs. ``start()`` the thread, ``submit()`` requests, read their
    :class:`Stream`; ``call(fn)`` changes the model (adapters) between steps.

    The engine owns ``model`` while it runs: nothing else should call it then.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, max_batch: int = 16, max_queue: int = 256, max_context: int = 2048
    ):
        if max_batch < 1 or max_queue < 0 or max_context < 2:
            raise AdapterError(
                f"need max_batch >= 1, max_queue >= 0, max_context >= 2 (got {max_batch}, {max_queue}, {max_context})"
            )
        check_model(model, max_context)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.ends = set(end_tokens(model, tokenizer))
        self.device = next(model.parameters()).device
        self._slots: list[_Request | None] = [None] * max_batch
        self._waiting: collections.deque[_Request] = collections.deque()
        self._calls: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = collections.Counter()

    # ---- the API (any thread) ----
    def start(self) -> None:
        """Start the background decode thread."""
        if self._thread is not None:
            raise AdapterError("the engine was started already")
        self._thread = threading.Thread(target=self._loop, name="adapterkit-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; ``drain``: let queued and running ones finish (up to ``timeout`` seconds,
        then cancel the rest), else cancel them now. Returns when the thread has ended."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._cancel_all()
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._cancel_all()
                self._cond.notify_all()
            self._thread.join(max(timeout, 5.0))

    def submit(self, prompt_ids: list[int], adapter: str | None, sampling: Sampling) -> Stream:
        """Queue a request (thread-safe); its events come on the returned stream. ``adapter`` None: the base
        model. Raises :class:`QueueFull` when ``max_queue`` requests wait, AdapterError for a bad prompt."""
        prompt = self._check_prompt(prompt_ids)
        if adapter is not None and not isinstance(adapter, str):
            raise AdapterError(f"adapter must be a name or None, got {adapter!r}")
        stream = Stream(self._wake)
        request = _Request(prompt, adapter, sampling, stream, TextDeltas(self.tokenizer, sampling.stop))
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            request.generator = torch.Generator().manual_seed(seed)
        with self._cond:
            if self._stopping:
                raise AdapterError("the engine is stopping and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound); retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return stream

    def call(self, fn: Callable[[nn.Module], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(model)`` in the engine thread between steps (adding or removing adapters while requests
        run); its result or exception goes to the returned future. Runs at once if the thread is not running."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                self._calls.append((fn, future))
                self._cond.notify_all()
                return future
        _run_call(fn, self.model, future)
        return future

    def in_use(self) -> set[str]:
        """Adapters of queued or running requests (never evict those)."""
        with self._cond:
            requests = [*self._waiting, *(r for r in self._slots if r is not None)]
        return {r.adapter for r in requests if r.adapter is not None}

    def stats(self) -> dict[str, float]:
        """Counters and gauges: running, queued, steps, tokens_generated, prompt_tokens, last_batch_size,
        requests (finished) by finish reason, kv_bytes, seconds in decode and prefill."""
        with self._cond:
            running = [r for r in self._slots if r is not None]
            out = {"running": len(running), "queued": len(self._waiting), **self._stats}
        out["kv_bytes"] = sum(r.kv.nbytes() for r in running if r.kv is not None)
        for key in ("steps", "tokens_generated", "prompt_tokens", "last_batch_size", "prefills"):
            out.setdefault(key, 0)
        return {k: float(v) for k, v in out.items()}

    def _check_prompt(self, prompt_ids: list[int]) -> list[int]:
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError) as e:
            raise AdapterError(f"prompt_ids must be a list of token ids: {e}") from e
        vocab = self.model.get_input_embeddings().num_embeddings
        if not prompt or len(prompt) >= self.max_context:
            raise AdapterError(f"a prompt needs 1 to {self.max_context - 1} tokens (max_context), got {len(prompt)}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise AdapterError(f"prompt token ids must lie in [0, {vocab}); got {min(prompt)}..{max(prompt)}")
        return prompt

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _cancel_all(self) -> None:
        for request in [*self._waiting, *(r for r in self._slots if r is not None)]:
            request.stream._cancelled.set()

    # ---- the engine thread ----
    def _loop(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except Exception:  # a bug here must not end serving: fail what runs, keep going
                log.exception("engine step failed")
                for i, request in enumerate(self._slots):
                    if request is not None:
                        self._finish(i, request, "error", "internal error in the serving engine")

    def _iteration(self) -> bool:
        """Calls, admissions, one decoding step; False when the engine should end."""
        self._run_calls()
        self._retire_cancelled()
        self._admit()
        if any(r is not None for r in self._slots):
            self._decode()
            return True
        with self._cond:
            if self._stopping and not self._waiting and not self._calls:
                return False
            if not self._waiting and not self._calls:
                self._cond.wait(0.5)
        return True

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            _run_call(fn, self.model, future)

    def _retire_cancelled(self) -> None:
        for i, request in enumerate(self._slots):
            if request is not None and request.stream.cancelled:
                self._finish(i, request, "cancelled")

    def _admit(self) -> None:
        while None in self._slots:
            with self._cond:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            slot = self._slots.index(None)
            if request.stream.cancelled:
                self._end(request, "cancelled")
                continue
            self._slots[slot] = request
            self._prefill(slot, request)

    def _prefill(self, slot: int, request: _Request) -> None:
        """The prompt alone through the model (its adapter), the first token from its last position."""
        started = time.monotonic()
        request.kv = KV(len(request.prompt) + request.sampling.max_tokens)
        ids = torch.tensor([request.prompt], device=self.device)
        positions = torch.arange(len(request.prompt), device=self.device)[None]
        try:
            logits = self._forward([Row(request.kv, request.adapter)], ids, positions)
        except Exception as e:  # the request's own adapter (or prompt) failed: only it ends
            self._finish(slot, request, "error", *_failure(request.adapter, e))
            return
        self._stats["prefills"] += 1
        self._stats["prompt_tokens"] += len(request.prompt)
        self._stats["prefill_seconds"] += time.monotonic() - started
        self._advance(slot, request, logits[0])

    def _decode(self) -> None:
        """One token for every running sequence, in one forward of ``max_batch`` rows."""
        started = time.monotonic()
        rows = [Row(r.kv, r.adapter) if r is not None else None for r in self._slots]
        ids = torch.tensor([[r.stream.tokens[-1] if r else 0] for r in self._slots], device=self.device)
        positions = torch.tensor([[r.position if r else 0] for r in self._slots], device=self.device)
        try:
            logits = list(self._forward(rows, ids, positions))
        except Exception:
            logits = self._isolate(rows, ids, positions)
        self._stats["steps"] += 1
        self._stats["last_batch_size"] = sum(r is not None for r in rows)
        self._stats["decode_seconds"] += time.monotonic() - started
        for i, request in enumerate(self._slots):
            if request is not None and logits[i] is not None:
                self._advance(i, request, logits[i])

    def _isolate(self, rows: list[Row | None], ids: torch.Tensor, positions: torch.Tensor) -> list:
        """A failed step again, one adapter's rows at a time: rows whose adapter fails end with an error,
        the others get (by batch invariance) exactly the logits of the joint step."""
        logits: list = [None] * len(rows)
        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            if row is not None:
                groups.setdefault(row.adapter, []).append(i)
        for adapter, members in groups.items():
            alone = [row if i in members else None for i, row in enumerate(rows)]
            try:
                out = self._forward(alone, ids, positions)
            except Exception as e:
                for i in members:
                    self._finish(i, self._slots[i], "error", *_failure(adapter, e))
                continue
            for i in members:
                logits[i] = out[i]
        return logits

    def _forward(self, rows: list[Row | None], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The last position's logits (rows, vocab) in float32; commits what each row's cache got."""
        step = Step(rows, inner="")
        setup = self._setup([r.adapter if r else None for r in rows])
        with torch.inference_mode(), setup, engine_forward(self.model, step) as cache:
            out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        for row in rows:
            if row is not None:
                row.kv.length += step.written
        return out.logits[:, -1].float()

    def _setup(self, names: list[str | None]):
        """Row ``i`` through adapter ``names[i]``; the base model where no row has one."""
        if any(names):
            return adapters.use(self.model, PerRow(names))
        state = self.model.__dict__.get(st.STATE)
        return state.override(Stack()) if state is not None else contextlib.nullcontext()

    def _advance(self, slot: int, request: _Request, logits: torch.Tensor) -> None:
        """Choose the next token from ``logits``, emit the text it completes, finish if done."""
        try:
            token, logprob = _choose(logits, request.sampling, request.generator)
            request.stream.tokens.append(token)
            request.stream.logprobs.append(logprob)
            self._stats["tokens_generated"] += 1
            reason, text = self._progress(request, token)
        except Exception as e:  # e.g. the tokenizer cannot decode what the model chose
            self._finish(slot, request, "error", *_failure(None, e))
            return
        if reason is None:
            if text:
                request.stream.put(self._chunk(request, text))
            return
        self._finish(slot, request, reason, text=text)

    def _progress(self, request: _Request, token: int) -> tuple[str | None, str]:
        """(finish reason or None, text to emit)."""
        if token in self.ends:
            text, _ = request.text.finish()
            return "stop", text
        text, stopped = request.text.add(token)
        if stopped:
            return "stop", text
        full = len(request.stream.tokens) >= request.sampling.max_tokens
        if full or request.position + 1 >= self.max_context:
            rest, stopped = request.text.finish()
            return ("stop" if stopped else "length"), text + rest
        return None, text

    def _chunk(
        self, request: _Request, text: str, reason: str | None = None, error: str | None = None, code: str | None = None
    ) -> Chunk:
        return Chunk(text, reason, len(request.prompt), len(request.stream.tokens), error, code)

    def _finish(
        self,
        slot: int,
        request: _Request,
        reason: str,
        error: str | None = None,
        code: str | None = None,
        text: str = "",
    ) -> None:
        """End a running request: free its slot and cache, send its last chunk."""
        self._slots[slot] = None
        request.kv = None
        self._end(request, reason, error, code, text)

    def _end(
        self, request: _Request, reason: str, error: str | None = None, code: str | None = None, text: str = ""
    ) -> None:
        self._stats[f"requests_{reason}"] += 1
        request.stream.put(self._chunk(request, text, reason, error, code))


def _run_call(fn: Callable, model: nn.Module, future: concurrent.futures.Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(model))
    except BaseException as e:  # the caller gets it; the engine goes on
        future.set_exception(e)


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> tuple[int, float]:
    """The next token (greedy, or sampled with temperature and top-p) and its log-probability."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # the nucleus: always the likeliest token
    sorted_probs = sorted_probs * keep
    token = int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return token, float(logprobs[token])


def _failure(adapter: str | None, error: Exception) -> tuple[str, str | None]:
    """What the client is told about a failure in its request, and its code: ``"adapter_failed"`` where
    the request's adapter raised (a fault of the adapter it chose), None where the base model did."""
    where = f"adapter {adapter!r} failed" if adapter else "the request failed"
    text = str(error) if isinstance(error, AdapterError) else f"{type(error).__name__}: {error}"
    return f"{where}: {text[:ERROR_TEXT]}", "adapter_failed" if adapter else None
