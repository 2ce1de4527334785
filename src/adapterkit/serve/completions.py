"""The generation routes: ``POST /v1/completions`` and ``/v1/chat/completions``, whole or streamed as
server-sent events; a request's deadline, its disconnect, and its engine streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from adapterkit.errors import AdapterError, shown
from adapterkit.serve.engine import Chunk, ContextExceeded, QueueFull, Sampling
from adapterkit.serve.plumbing import CAUSAL, ApiError, Authorized, State, adapter_source, needs, read_body
from adapterkit.serve.routed import BASE
from adapterkit.serve.schemas import Chat, Completion, Sampled
from adapterkit.serve.vision import Vision

T = TypeVar("T")


async def completions(request: Request, s: State = Authorized) -> Any:
    started = time.monotonic()
    body = await read_body(request, Completion, s.limits.max_body_bytes)
    needs(s, CAUSAL, "/v1/completions")
    texts = body.prompts()
    prompts = [await _tokens(s, text, chat=False) for text in texts]
    model = await _chosen(s, body.model, texts, "prompt")
    return await _generate(request, s, body, prompts, body.max_tokens or 16, "text_completion", started, model)


async def chat_completions(request: Request, s: State = Authorized) -> Any:
    started = time.monotonic()
    body = await read_body(request, Chat, s.limits.max_body_bytes)
    needs(s, CAUSAL, "/v1/chat/completions")
    if getattr(s.tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"{s.name} has no chat template: use /v1/completions", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    count = sum(m.images() for m in body.messages)
    vision = Vision([{"role": m.role, "content": m.parts()} for m in body.messages], count) if count else None
    prompt = await _tokens(s, messages, chat=True)  # with images: their text alone, checked before they are read
    asked = body.max_completion_tokens or body.max_tokens  # None: the rest of the context, up to the limit
    model = await _chosen(s, body.model, [messages], "messages")
    return await _generate(request, s, body, [prompt], asked, "chat.completion", started, model, vision)


async def _chosen(s: State, model: str, prompts: list, param: str) -> str:
    """The model a request runs on: the one it names, or for the auto model (``--router``) the adapter
    chosen from its text (the base model's name for text of no adapter's task), counted in /metrics."""
    if s.route is None or model != s.route.name:
        return model
    if len(prompts) != 1:
        raise ApiError(400, f"the {model!r} model routes one prompt per request; send the prompts apart",
                       param=param)  # fmt: skip
    chosen = await s.route.choose(s.engine, prompts[0])
    s.metrics.routed.labels(chosen or BASE).inc()
    return chosen or s.name


async def _tokens(s: State, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    """The prompt's token ids (through the chat template for a conversation), within the limit: a prompt
    too long by its characters alone is refused before it is tokenized."""
    param, limit = "messages" if chat else "prompt", s.limits.max_prompt_tokens
    chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
    if s.tokenizers.surely_over(chars, limit):
        raise ApiError(400, f"the prompt has {chars} characters, more than {limit} tokens (this server's limit) "
                       "can hold", param=param, code="context_length_exceeded")  # fmt: skip

    def encode() -> list[int]:
        with s.tokenizers.borrow() as tokenizer:
            if chat:
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                return list(tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(tokenizer(prompt)["input_ids"])

    try:
        ids = await run_in_threadpool(encode)
    except Exception as e:  # noqa: BLE001 (a template that refuses the conversation, e.g. roles out of order)
        message = f"the prompt cannot be encoded: {shown(str(e))[:300]}"
        raise ApiError(400, message, param=param) from None
    if len(ids) > limit:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {limit}",
                       param=param, code="context_length_exceeded")  # fmt: skip
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    return ids


async def _generate(
    request: Request,
    s: State,
    body: Sampled,
    prompts: list[list[int]],
    max_tokens: int | None,
    kind: str,
    started: float,
    model: str,
    vision: Vision | None = None,
):
    """Check, submit (loading ``model``'s adapter within the request's time limit), and answer whole or
    streamed. ``max_tokens`` None: as many as the context has room for after the prompt (at most the
    server's limit)."""
    if max_tokens is None:
        max_tokens = max(1, min(s.limits.max_tokens, s.engine.max_context - max(map(len, prompts))))
    if max_tokens > s.limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {s.limits.max_tokens}",
                       param="max_tokens")  # fmt: skip
    try:
        sampling = Sampling(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stops()
        )
    except AdapterError as e:
        raise ApiError(400, shown(str(e))) from None
    _fits(s, prompts, max_tokens, "prompt" if kind == "text_completion" else "messages")
    source, deadline = adapter_source(s, model), started + s.limits.request_timeout
    try:
        submitted = _submit(s, source, prompts, sampling, vision)
        streams = await asyncio.wait_for(submitted, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise _failure(Chunk("", "timeout")) from None
    s.metrics.prompt_tokens.inc(sum(map(len, prompts)))
    reply = Reply(kind, model, started, s)
    events = _events(streams, deadline)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.sse(events, len(prompts), usage), media_type="text/event-stream")
    return await _unless_gone(request, reply.whole(events, len(prompts)))


def _fits(s: State, prompts: list[list[int]], max_tokens: int, param: str) -> None:
    """Refuse up front, as OpenAI does, prompts that with ``max_tokens`` more overflow the model's context
    (the engine's own check: one limit), before any adapter is loaded."""
    for ids in prompts:
        try:
            s.engine.check_prompt(ids, max_tokens)
        except ContextExceeded as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        except AdapterError as e:
            raise ApiError(400, shown(str(e)), param=param) from None


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; cancelled (which frees its engine slots) if the client disconnects first.

    A streamed reply learns of a disconnect when its next write fails; a whole one writes nothing until
    the end, so it listens for the ASGI server's ``http.disconnect`` (sent once the body has been read)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(400, "the client disconnected", code="client_disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _submit(
    s: State, source: str | None, prompts: list[list[int]], sampling: Sampling, vision: Vision | None = None
) -> list:
    """One engine stream per prompt; the adapter is held (never evicted) until the engine has them. With
    images, the prompt is made again with their positions once the adapter that reads them is loaded."""
    if source is None:
        if vision is not None:
            await vision.prepared(s, None, _chat_tokens)  # refused: the base model reads no images
        return _submit_all(s, None, prompts, sampling)
    async with s.registry.use(source) as entry:
        seen = None
        if vision is not None:
            ids, seen = await vision.prepared(s, entry.inner, _chat_tokens)
            prompts = [ids]
            _fits(s, prompts, sampling.max_tokens, "messages")
        return _submit_all(s, entry.inner, prompts, sampling, seen)


async def _chat_tokens(s: State, messages: list[dict[str, str]]) -> list[int]:
    return await _tokens(s, messages, chat=True)


def _submit_all(s: State, inner: str | None, prompts: list[list[int]], sampling: Sampling, images=None) -> list:
    streams = []
    try:
        for ids in prompts:
            streams.append(s.engine.submit(ids, inner, sampling, images))
    except QueueFull:
        for stream in streams:
            stream.cancel()
        raise ApiError(429, "the server is busy: its queue is full; retry later", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(s.limits.retry_after)}) from None  # fmt: skip
    return streams


async def _events(streams: list, deadline: float) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of every stream as they come, tagged with the stream's index, until all have ended.

    Past ``deadline`` (time.monotonic) the streams still running are cancelled and end with
    finish_reason "timeout"; when the consumer goes away (a client disconnected) they are cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as e:  # noqa: BLE001 (one stream's failure is its own request's)
            await queue.put((index, Chunk("", "error", error=f"the engine failed: {type(e).__name__}")))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    running = set(range(len(streams)))
    try:
        while running:
            try:
                index, chunk = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                late, running = sorted(running), set()
                for index in late:
                    streams[index].cancel()
                for index in late:
                    yield index, Chunk("", "timeout")
                return
            if chunk.finish_reason is not None:
                running.discard(index)
            yield index, chunk
    finally:
        for index in running:  # a client gone, or out of time: free the slots
            streams[index].cancel()
        for task in tasks:
            task.cancel()


class Reply:
    """The answer to a completion or chat request: whole, or as server-sent events."""

    def __init__(self, kind: str, model: str, started: float, s: State) -> None:
        self.kind, self.model, self.started, self.s = kind, model, started, s
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + secrets.token_hex(12)
        self.created, self.first = int(time.time()), None
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def _count(self, chunk: Chunk) -> None:
        if self.first is None and chunk.text:
            self.first = time.monotonic()
            self.s.metrics.ttft.observe(self.first - self.started)
        if chunk.finish_reason is not None:
            self.usage["prompt_tokens"] += chunk.prompt_tokens
            self.usage["completion_tokens"] += chunk.completion_tokens
            self.usage["total_tokens"] += chunk.prompt_tokens + chunk.completion_tokens
            self.s.metrics.completion_tokens.inc(chunk.completion_tokens)

    def _done(self) -> None:
        self.s.metrics.latency.observe(time.monotonic() - self.started)

    async def whole(self, events: AsyncIterator[tuple[int, Chunk]], n: int) -> dict[str, Any]:
        texts, reasons = [""] * n, [None] * n
        async with contextlib.aclosing(events):  # a failure ends the others' generations too
            async for index, chunk in events:
                self._count(chunk)
                texts[index] += chunk.text
                if chunk.finish_reason is not None:
                    reasons[index] = chunk.finish_reason
                    _raise_failure(chunk)
        self._done()
        choices = [self._choice(i, texts[i], reasons[i]) for i in range(n)]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage}  # fmt: skip

    def _choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat.completion":
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None}  # fmt: skip
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    async def sse(self, events: AsyncIterator[tuple[int, Chunk]], n: int, usage: bool) -> AsyncIterator[str]:
        """OpenAI's chunks (``data: {...}``), an error event if a generation fails, then ``data: [DONE]``."""
        chat = self.kind == "chat.completion"
        if chat:  # OpenAI's first chunk of each choice names the role
            for index in range(n):
                role = {"role": "assistant", "content": ""}
                yield self._event([{"index": index, "delta": role, "finish_reason": None, "logprobs": None}])
        async with contextlib.aclosing(events):
            async for index, chunk in events:
                self._count(chunk)
                if chunk.finish_reason in ("error", "timeout"):
                    yield _sse({"error": _failure(chunk).responseread_body()})
                    break
                if chunk.text or chunk.finish_reason is not None:
                    delta = {"delta": {"content": chunk.text} if chunk.text else {}} if chat else {"text": chunk.text}
                    choice = {"index": index, **delta, "finish_reason": chunk.finish_reason, "logprobs": None}
                    yield self._event([choice])
        self._done()
        if usage:
            yield self._event([], usage=self.usage)
        yield "data: [DONE]\n\n"

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return _sse({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                     "choices": choices, **extra})  # fmt: skip


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Failure(ApiError):
    def responseread_body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


def _failure(chunk: Chunk) -> Failure:
    """A request the engine ended with an error, or that ran out of time."""
    if chunk.finish_reason == "timeout":
        return Failure(504, "the request ran past the server's time limit and was cancelled", "timeout", code="timeout")
    if chunk.code == "adapter_failed":  # the adapter the request chose is broken: a 4xx, as a failed load is
        return Failure(400, chunk.error or "the adapter failed", "invalid_request_error", code="adapter_failed")
    return Failure(500, chunk.error or "the generation failed", "server_error", code="engine_error")


def _raise_failure(chunk: Chunk) -> None:
    if chunk.finish_reason in ("error", "timeout"):
        raise _failure(chunk)
