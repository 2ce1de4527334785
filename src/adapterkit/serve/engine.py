"""The serving engine: one frozen causal LM, many adapters, continuous batching, batch-invariant outputs.

Its parts, one file each: :mod:`.scheduler` (who runs), :mod:`.runner` (the model's forwards),
:mod:`.sampler` (the next token), :mod:`.detokenizer` (text and stop strings), :mod:`.stream` (the events
a client reads). This module is the loop that ties them: each iteration is *schedule* (calls between
steps, retire the cancelled, admit waiting requests), *execute* (prefills, then one decoding step), and
*update* (sample, detokenize, emit, finish).

A background thread loops: it runs the functions handed to :meth:`Engine.call` (adding or removing
adapters between steps), admits waiting requests while fewer than ``max_batch`` run, prefills prompts
(each on its own: a forward of exactly its tokens, in chunks of ``prefill_chunk`` positions at fixed
offsets, at most ``prefill_chunk`` tokens an iteration while others decode, so that a long prompt enters
over several steps and the running streams keep their pace), then runs one decoding step for all
decoding sequences together (one token per sequence, each row through its own adapter, read from the
runner's :class:`~adapterkit.core.banks.Bank`), and retires finished or cancelled sequences at once.

**Batch invariance.** A request's greedy tokens do not depend on who else is in the batch:

* nothing is padded: a prefill holds one request's tokens, cut into chunks at the same positions under
  any load; a decoding step one token per sequence;
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

import collections
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from adapterkit.core.generation import end_tokens
from adapterkit.errors import AdapterError
from adapterkit.serve import defaults
from adapterkit.serve.attention import check_model
from adapterkit.serve.detokenizer import TextDeltas
from adapterkit.serve.runner import Runner
from adapterkit.serve.sampler import Sampling, choose, finite_rows
from adapterkit.serve.scheduler import Request, Scheduler
from adapterkit.serve.stream import Chunk, QueueFull, Stream

__all__ = ["Chunk", "Engine", "QueueFull", "Sampling", "Stream", "TextDeltas"]
T = TypeVar("T")
log = logging.getLogger(__name__)
ERROR_TEXT = 300  # characters of an exception's message passed on to the client


class NonFinite(AdapterError):
    """A row's logits hold NaN or inf (an adapter with such weights, or one that overflows)."""


class Engine:
    """Serves one causal LM with many adapters: continuous batching, an adapter per row, per-sequence KV
    caches, batch-invariant greedy outputs. ``start()`` the thread, ``submit()`` requests, read their
    :class:`Stream`; ``call(fn)`` changes the model (adapters) between steps.

    The engine owns ``model`` while it runs: nothing else should call it then.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = defaults.MAX_BATCH,
        max_queue: int = defaults.MAX_QUEUE,
        max_context: int = defaults.MAX_CONTEXT,
        prefill_chunk: int = defaults.PREFILL_CHUNK,
    ):
        if max_batch < 1 or max_queue < 0 or max_context < 2 or prefill_chunk < 1:
            raise AdapterError(
                "need max_batch >= 1, max_queue >= 0, max_context >= 2, prefill_chunk >= 1 "
                f"(got {max_batch}, {max_queue}, {max_context}, {prefill_chunk})"
            )
        self.prefill_chunk = prefill_chunk
        check_model(model, max_context)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.ends = set(end_tokens(model, tokenizer))
        self.runner = Runner(self.model, max_batch)
        self.scheduler = Scheduler(max_batch, max_queue)
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

    def submit(
        self, prompt_ids: list[int], adapter: str | None, sampling: Sampling, images: tuple | None = None
    ) -> Stream:
        """Queue a request (thread-safe); its events come on the returned stream. ``adapter`` None: the base
        model. Raises :class:`QueueFull` when ``max_queue`` requests wait, AdapterError for a bad prompt
        (``code`` ``context_length_exceeded`` where prompt plus ``max_tokens`` do not fit the context).
        ``images``: ``(features (rows, width), image token)``, one feature row per image position of the prompt,
        in order (:mod:`adapterkit.core.images`)."""
        prompt = self.check_prompt(prompt_ids, sampling.max_tokens)
        if adapter is not None and not isinstance(adapter, str):
            raise AdapterError(f"adapter must be a name or None, got {adapter!r}")
        stream = Stream(self._wake)
        request = Request(prompt, adapter, sampling, stream, TextDeltas(self.tokenizer, sampling.stop))
        if images is not None:
            request.images, request.image_token = images
            if prompt.count(request.image_token) != len(request.images):
                raise AdapterError(f"the prompt holds {prompt.count(request.image_token)} image positions for "
                                   f"{len(request.images)} image feature rows")  # fmt: skip
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            request.generator = torch.Generator().manual_seed(seed)
        with self._cond:
            if self._stopping:
                raise AdapterError("the engine is stopping and takes no new requests")
            self.scheduler.add(request)
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
            requests = self.scheduler.requests()
        return {r.adapter for r in requests if r.adapter is not None}

    def stats(self) -> dict[str, float]:
        """Counters and gauges: running, queued, steps, tokens_generated, prompt_tokens, last_batch_size,
        requests (finished) by finish reason, kv_bytes, seconds in decode and prefill."""
        with self._cond:
            running = [r for _, r in self.scheduler.running()]
            out = {"running": len(running), "queued": len(self.scheduler.waiting), **self._stats}
        out["kv_bytes"] = self.runner.cache.used_bytes()
        out["kv_allocated_bytes"] = self.runner.cache.nbytes()
        for key in ("steps", "tokens_generated", "prompt_tokens", "last_batch_size", "prefills"):
            out.setdefault(key, 0)
        return {k: float(v) for k, v in out.items()}

    def check_prompt(self, prompt_ids: list[int], max_tokens: int = 1) -> list[int]:
        """``prompt_ids`` as ints, refused unless they are token ids and, with ``max_tokens`` more, fit
        ``max_context`` (the one context limit: the HTTP layer asks this too)."""
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError) as e:
            raise AdapterError(f"prompt_ids must be a list of token ids: {e}") from e
        vocab = self.model.get_input_embeddings().num_embeddings
        if not prompt:
            raise AdapterError("the prompt is empty")
        if len(prompt) + max_tokens > self.max_context:
            raise ContextExceeded(
                f"the prompt has {len(prompt)} tokens and asks for {max_tokens} more; the context holds "
                f"{self.max_context} (max_context): shorten the prompt or lower max_tokens"
            )
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise AdapterError(f"prompt token ids must lie in [0, {vocab}); got {min(prompt)}..{max(prompt)}")
        return prompt

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _cancel_all(self) -> None:
        for request in self.scheduler.requests():
            request.stream.cancel()

    # ---- the engine thread ----
    def _loop(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except Exception:  # a bug here must not end serving: fail what runs, keep going
                log.exception("engine step failed")
                for slot, request in self.scheduler.running():
                    self._finish(slot, request, "error", "internal error in the serving engine")

    def _iteration(self) -> bool:
        """Schedule, execute, update; False when the engine should end."""
        self._run_calls()
        for slot, request in self.scheduler.cancelled():
            self._finish(slot, request, "cancelled")
        self._admit()
        if self.scheduler.busy():
            self._prefill_some()
            if any(self.scheduler.decoding()):
                self._decode()
            return True
        with self._cond:
            idle = not self.scheduler.waiting and not self._calls
            if self._stopping and idle:
                return False
            if idle:
                self._cond.wait(0.5)
        return True

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            _run_call(fn, self.model, future)
            self.runner.changed()

    def _admit(self) -> None:
        while True:
            with self._cond:
                admitted = next(self.scheduler.admit(), None)
            if admitted is None:
                return
            slot, request = admitted
            if slot < 0:
                self._end(request, "cancelled")
            else:
                self.runner.start(slot, request)

    def _prefill_some(self) -> None:
        """Prompt chunks, oldest request first, packed into forwards of ``prefill_chunk`` tokens: one forward
        while others decode (so that they keep their pace), else until every prompt is in."""
        just_one = any(self.scheduler.decoding())
        while waiting := self.scheduler.prefilling():
            chunks = self._pack(waiting)
            if chunks:
                self._prefill_packed(chunks)
            else:
                slot, request = waiting[0]
                self._prefill(slot, request, self._chunk_end(request))
            if just_one:
                return

    def _pack(self, waiting: list[tuple[int, Request]]) -> list[tuple[int, Request, int]]:
        """The next chunks of the waiting prompts, oldest first, that fit one packed forward; none where the
        oldest must run alone (the model's prefix attention, or an adapter that needs its prompt whole)."""
        if not self.runner.packs_prompts():
            return []
        chunks, spent = [], 0
        for slot, request in waiting:
            if not self.runner.chunks_prompts(request.adapter):
                if not chunks:
                    return []
                continue
            end = self._chunk_end(request)
            if spent + end - request.prefilled > self.prefill_chunk:
                break
            chunks.append((slot, request, end))
            spent += end - request.prefilled
        return chunks

    def _prefill_packed(self, chunks: list[tuple[int, Request, int]]) -> None:
        """One packed forward; if it fails, each chunk alone in a forward of the same rows (the same bits
        for the healthy ones), so that a failing adapter fails only its own request."""
        started = time.monotonic()
        try:
            results = list(zip(chunks, self.runner.prefill_packed(chunks, self.prefill_chunk), strict=True))
        except Exception:  # noqa: BLE001 (one adapter's failure: find it, the others go on)
            results = []
            for chunk in chunks:
                try:
                    results += zip([chunk], self.runner.prefill_packed([chunk], self.prefill_chunk), strict=True)
                except Exception as e:  # noqa: BLE001
                    self._finish(chunk[0], chunk[1], "error", *failure(chunk[1].adapter, e))
        self._stats["prefill_seconds"] += time.monotonic() - started
        for (slot, request, end), logits in results:
            self._prefilled(slot, request, end, logits)

    def _prefilled(self, slot: int, request: Request, end: int, logits: torch.Tensor) -> None:
        """``request``'s prompt is in the cache up to ``end``: at its end, the first token."""
        self._stats["prompt_tokens"] += end - request.prefilled
        request.prefilled = end
        if not request.prefilling:
            self._stats["prefills"] += 1
            self._update(slot, request, logits, finite_rows(logits[None])[0])

    def _chunk_end(self, request: Request) -> int:
        """Where the prompt's next chunk ends: at the next multiple of ``prefill_chunk`` (the same cut under
        any load), or the prompt's end (also where an adapter must see the prompt whole)."""
        if not self.runner.chunks_prompts(request.adapter):
            return len(request.prompt)
        return min(len(request.prompt), (request.prefilled // self.prefill_chunk + 1) * self.prefill_chunk)

    def _prefill(self, slot: int, request: Request, end: int) -> None:
        """A chunk of one prompt in a forward of its own (exactly its tokens)."""
        started = time.monotonic()
        try:
            logits = self.runner.prefill(slot, request, end)
        except Exception as e:  # noqa: BLE001 (the request's own adapter, or prompt, failed: only it ends)
            self._finish(slot, request, "error", *failure(request.adapter, e))
            return
        self._stats["prefill_seconds"] += time.monotonic() - started
        self._prefilled(slot, request, end, logits)

    def _decode(self) -> None:
        started = time.monotonic()
        slots = self.scheduler.decoding()
        logits, failed = self.runner.decode(slots)
        self._stats["steps"] += 1
        self._stats["last_batch_size"] = sum(r is not None for r in slots)
        self._stats["decode_seconds"] += time.monotonic() - started
        ran = [i for i, row in enumerate(logits) if row is not None and slots[i] is not None]  # not dummy rows
        finite = dict(zip(ran, finite_rows(torch.stack([logits[i] for i in ran])), strict=True)) if ran else {}
        for slot, request in enumerate(slots):
            if request is None:
                continue
            if slot in failed:
                self._finish(slot, request, "error", *failure(request.adapter, failed[slot]))
            elif logits[slot] is not None:
                self._update(slot, request, logits[slot], finite[slot])

    def _update(self, slot: int, request: Request, logits: torch.Tensor, finite: bool) -> None:
        """Choose the next token from ``logits``, emit the text it completes, finish if done."""
        if not finite:
            self._finish(slot, request, "error", *failure(request.adapter, NonFinite("the logits are not finite")))
            return
        try:
            token, logprob = choose(logits, request.sampling, request.generator)
            request.stream.tokens.append(token)
            request.stream.logprobs.append(logprob)
            self._stats["tokens_generated"] += 1
            reason, text = self._progress(request, token)
        except Exception as e:  # noqa: BLE001 (e.g. the tokenizer cannot decode what the model chose)
            self._finish(slot, request, "error", *failure(None, e))
            return
        if reason is None:
            if text:
                request.stream.put(self._chunk(request, text))
            return
        self._finish(slot, request, reason, text=text)

    def _progress(self, request: Request, token: int) -> tuple[str | None, str]:
        """(finish reason or None, text to emit)."""
        if token in self.ends:
            text, _ = request.text.finish()
            return "stop", text
        text, stopped = request.text.add(token)
        if stopped:
            return "stop", text
        if len(request.stream.tokens) >= request.sampling.max_tokens:
            rest, stopped = request.text.finish()
            return ("stop" if stopped else "length"), text + rest
        return None, text

    def _chunk(
        self, request: Request, text: str, reason: str | None = None, error: str | None = None, code: str | None = None
    ) -> Chunk:
        return Chunk(text, reason, len(request.prompt), len(request.stream.tokens), error, code)

    def _finish(
        self,
        slot: int,
        request: Request,
        reason: str,
        error: str | None = None,
        code: str | None = None,
        text: str = "",
    ) -> None:
        """End a running request: free its slot and cache, send its last chunk."""
        self.scheduler.free(slot)
        self.runner.release(slot)
        self._end(request, reason, error, code, text)

    def _end(
        self, request: Request, reason: str, error: str | None = None, code: str | None = None, text: str = ""
    ) -> None:
        self._stats[f"requests_{reason}"] += 1
        request.stream.put(self._chunk(request, text, reason, error, code))


class ContextExceeded(AdapterError):
    """A prompt that, with the tokens asked for, does not fit the model's context (OpenAI's
    ``context_length_exceeded``)."""


def _run_call(fn: Callable, model: nn.Module, future: concurrent.futures.Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(model))
    except BaseException as e:  # the caller gets it; the engine goes on
        future.set_exception(e)


def failure(adapter: str | None, error: Exception) -> tuple[str, str | None]:
    """What the client is told about a failure in its request, and its code: ``"adapter_failed"`` where
    the request's adapter failed (a fault of the adapter it chose), None where the base model did."""
    where = f"adapter {adapter!r} failed" if adapter else "the request failed"
    text = str(error) if isinstance(error, AdapterError) else f"{type(error).__name__}: {error}"
    return f"{where}: {text[:ERROR_TEXT]}", "adapter_failed" if adapter else None
