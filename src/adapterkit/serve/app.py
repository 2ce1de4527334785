"""The HTTP layer of ``adapterkit serve``: OpenAI's routes (FastAPI) in front of an engine.

``POST /v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events with
``stream: true``) for causal LMs; ``POST /v1/embeddings`` and adapterkit's ``/v1/classify`` for
encoders; ``GET /v1/models``, ``/health``, ``/metrics`` (Prometheus); ``POST``/``DELETE
/admin/adapters``. The request's ``model`` picks the adapter: the base model's name (none), an adapter's
name, or ``hub:owner/name@tag`` where the operator allows it.

Every refusal is a 4xx in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``:
the API key is checked before the body is read, the body is bounded before it is read, validated
against :mod:`.schemas` (a field that does not fit is a 400 naming it), prompts and ``max_tokens``
are bounded, a full queue is a 429 with ``Retry-After``. A request's own failure (its adapter does
not load, the engine ends it with an error, it runs out of time) is that request's answer only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterkit.core.backbone import head_parameters
from adapterkit.errors import AdapterError, shown
from adapterkit.hub.bodies import request_body
from adapterkit.hub.protocol import parse_json, reason
from adapterkit.hub.server import SecurityHeaders, openapi_with_bodies
from adapterkit.serve.engine import Chunk, QueueFull, Sampling
from adapterkit.serve.registry import AdapterUnavailable, Direct, Loaded, Registry
from adapterkit.serve.schemas import BODIES, Chat, Classify, Completion, Embeddings, NewAdapter, Sampled

CAUSAL, ENCODER = "causal", "encoder"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_tokens: int = 1024  # max_tokens (max_completion_tokens) above this: 400
    max_prompt_tokens: int = 2048  # a prompt (after the chat template) longer than this: 400
    request_timeout: float = 600.0  # seconds from arrival to the last token; then the generation is cancelled
    max_body_bytes: int = 4 * 2**20  # a body over this: 413, before it is read
    retry_after: int = 1  # seconds a 429 asks the client to wait

    def __post_init__(self) -> None:
        if min(self.max_tokens, self.max_prompt_tokens, self.max_body_bytes, self.retry_after) < 1:
            raise AdapterError(f"every limit must be >= 1: {self}")
        if not self.request_timeout > 0:
            raise AdapterError(f"request_timeout must be > 0 seconds (got {self.request_timeout})")


class ApiError(Exception):
    """A refusal in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def hash_key(key: str) -> str:
    """An API key as it is kept: its sha256 (as the hub keeps its tokens)."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | Path) -> frozenset[str]:
    """The hashed keys of a file of API keys, one a line (blank lines and ``#`` comments skipped)."""
    lines = Path(path).read_text().splitlines()
    keys = frozenset(hash_key(line.strip()) for line in lines if line.strip() and not line.startswith("#"))
    if not keys:
        raise AdapterError(f"{path} holds no API key (one a line)")
    return keys


# -- the app ------------------------------------------------------------------------------------------
def create_app(
    engine,
    tokenizer,
    registry: Registry,
    *,
    name: str,
    kind: str = CAUSAL,
    limits: Limits | None = None,
    keys: frozenset[str] = frozenset(),
    allow_hub_refs: bool = False,
    aliases: Sequence[str] = (),
) -> FastAPI:
    """The server of ``engine`` (an :class:`adapterkit.serve.engine.Engine` for a causal LM, a
    :class:`~adapterkit.serve.registry.Direct` for an encoder) under the base model's ``name``.

    ``keys``: sha256 hashes of the API keys (none: no key needed); ``aliases``: other names of the
    base model (e.g. the path it was loaded from)."""
    app = FastAPI(title="adapterkit serve", docs_url=None, redoc_url=None, lifespan=_lifespan)
    app.state.s = State(engine, tokenizer, registry, name, kind, limits or Limits(), keys, allow_hub_refs, aliases)
    registry.on_event = app.state.s.metrics.adapter_event
    for error, handler in _HANDLERS.items():
        app.add_exception_handler(error, handler)
    for route in ROUTES:
        app.add_api_route(*route[:2], methods=[route[2]], **route[3])
    app.add_middleware(SecurityHeaders)
    app.add_middleware(Counted)
    app.openapi = functools.partial(openapi_with_bodies, app, BODIES)
    return app


@dataclasses.dataclass
class State:
    engine: Any
    tokenizer: Any
    registry: Registry
    name: str
    kind: str
    limits: Limits
    keys: frozenset[str]
    allow_hub_refs: bool
    aliases: Sequence[str]

    def __post_init__(self) -> None:
        self.metrics = Metrics()
        self.tokenizing = threading.Lock()  # a fast tokenizer's settings are not safe to share across threads
        self.created = int(time.time())


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the engine; on shutdown let it finish what is running (``stop(drain=True)``)."""
    s: State = app.state.s
    if hasattr(s.engine, "start"):
        s.engine.start()
    yield
    await run_in_threadpool(s.engine.stop, True)


# -- metrics ------------------------------------------------------------------------------------------
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("adapterkit_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("adapterkit_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("adapterkit_completion_tokens", "completion tokens generated", registry=r)
        self.adapters = Counter(
            "adapterkit_adapter_events", "adapter loads, load failures, evictions", ["event"], registry=r
        )
        self.resident = Gauge("adapterkit_adapters_loaded", "adapters loaded in the model", registry=r)
        self.batch = Gauge("adapterkit_batch_size", "sequences in the last decoding step", registry=r)
        self.queued = Gauge("adapterkit_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("adapterkit_running", "sequences decoding", registry=r)
        self.ttft = Histogram("adapterkit_time_to_first_token_seconds", "arrival to first token", registry=r)
        self.latency = Histogram("adapterkit_request_latency_seconds", "arrival to last token", registry=r)

    def adapter_event(self, event: str) -> None:
        self.adapters.labels(event).inc()


KNOWN_ROUTES = frozenset(
    ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/models", "/health"]
    + ["/metrics", "/admin/adapters", "/openapi.json"]
)


class Counted:
    """Counts every HTTP answer by route and status (pure ASGI: streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = "/admin/adapters" if path.startswith("/admin/adapters/") else path
        route = route if route in KNOWN_ROUTES else "other"  # a client's paths must not grow the label set

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                scope["app"].state.s.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)


# -- errors -------------------------------------------------------------------------------------------
async def _api_error(request: Request, e: ApiError) -> Response:
    return e.response()


async def _invalid(request: Request, e: RequestValidationError | ValidationError) -> Response:
    return _from_validation(e).response()


def _from_validation(e: RequestValidationError | ValidationError) -> ApiError:
    """400 (OpenAI's status for bad parameters, not FastAPI's 422), naming the first field that does not fit."""
    errors = e.errors()
    fields = [str(p) for p in errors[0]["loc"] if p != "body"] if errors else []
    return ApiError(400, shown(reason(e)), param=fields[0] if fields else None, code="invalid_parameter")


async def _http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (unknown route, wrong method) in OpenAI's shape."""
    return ApiError(e.status_code, str(e.detail), headers=e.headers).response()


async def _adapter_error(request: Request, e: AdapterError) -> Response:
    status = e.status if isinstance(e, AdapterUnavailable) else 400
    return ApiError(status, shown(str(e))[:1000], code="model_not_found" if status == 404 else None).response()


async def _crash(request: Request, e: Exception) -> Response:
    """The last resort: a bug still answers JSON (and uvicorn logs the traceback)."""
    return ApiError(500, f"internal error ({type(e).__name__})", "server_error").response()


_HANDLERS = {
    ApiError: _api_error,
    AdapterError: _adapter_error,
    RequestValidationError: _invalid,
    ValidationError: _invalid,
    HTTPException: _http_error,
    Exception: _crash,
}


# -- reading a request --------------------------------------------------------------------------------
async def authorized(request: Request) -> State:
    """Dependency of every /v1 and /admin route: the API key, checked before any byte of the body is read."""
    s: State = request.app.state.s
    if s.keys:
        header = request.headers.get("authorization", "")
        given = hash_key(header[7:].strip()) if header[:7].lower() == "bearer " else ""
        if not any(hmac.compare_digest(given, key) for key in s.keys):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key")
    return s


Authorized = Depends(authorized)


async def administrator(request: Request) -> State:
    """Dependency of the /admin routes: they load files from this machine, so only a key holder may."""
    s = await authorized(request)
    if not s.keys:
        raise ApiError(403, "the admin routes need API keys: start the server with --api-key-file", code="forbidden")
    return s


Administrator = Depends(administrator)


async def _body(request: Request, model: type[BaseModel], cap: int):
    """The body, bounded (by Content-Length before reading, else as it streams), parsed and validated."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise ApiError(400, f"bad Content-Length {shown(declared[:40])!r}")
    if int(declared) > cap:
        raise ApiError(413, f"the body ({declared} bytes) is over the limit of {cap} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, f"the body is over the limit of {cap} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    try:
        return model.model_validate(parse_json(b"".join(chunks), "the body"))
    except ValueError as e:
        if isinstance(e, ValidationError):
            raise _from_validation(e) from None
        raise ApiError(400, shown(str(e)), code="invalid_json") from None


def _adapter(s: State, model: str) -> str | None:
    """The source of the adapter ``model`` names (None: the base model); 404 for a name not served."""
    if model == s.name or model in s.aliases:
        return None
    if model.startswith("hub:") and model not in s.registry.sources:
        if not s.allow_hub_refs:
            raise ApiError(404, "hub references are not served here (the server runs without --allow-hub-refs)",
                           param="model", code="model_not_found")  # fmt: skip
        s.registry.refs.add(s.registry.check(model))
        return model
    try:
        return s.registry.source_of(model)
    except AdapterUnavailable as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None


# -- generation -----------------------------------------------------------------------------------
async def completions(request: Request, s: State = Authorized) -> Any:
    body = await _body(request, Completion, s.limits.max_body_bytes)
    _needs(s, CAUSAL, "/v1/completions")
    prompts = [await _tokens(s, text, chat=False) for text in body.prompts()]
    return await _generate(request, s, body, prompts, body.max_tokens or 16, "text_completion")


async def chat_completions(request: Request, s: State = Authorized) -> Any:
    body = await _body(request, Chat, s.limits.max_body_bytes)
    _needs(s, CAUSAL, "/v1/chat/completions")
    if getattr(s.tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"{s.name} has no chat template: use /v1/completions", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await _tokens(s, messages, chat=True)
    asked = body.max_completion_tokens or body.max_tokens or s.limits.max_tokens
    return await _generate(request, s, body, [prompt], asked, "chat.completion")


def _needs(s: State, kind: str, route: str) -> None:
    if s.kind != kind:
        other = "a causal LM" if kind == CAUSAL else "an encoder"
        raise ApiError(400, f"{route} needs {other}; {s.name} is {'a causal LM' if s.kind == CAUSAL else 'an encoder'}")


async def _tokens(s: State, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    """The prompt's token ids (through the chat template for a conversation), within the limit."""

    def encode() -> list[int]:
        with s.tokenizing:
            if chat:
                text = s.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                return list(s.tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(s.tokenizer(prompt)["input_ids"])

    try:
        ids = await run_in_threadpool(encode)
    except Exception as e:  # noqa: BLE001 (a template that refuses the conversation, e.g. roles out of order)
        message = f"the prompt cannot be encoded: {shown(str(e))[:300]}"
        raise ApiError(400, message, param="messages" if chat else "prompt") from None
    if len(ids) > s.limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {s.limits.max_prompt_tokens}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")  # fmt: skip
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return ids


async def _generate(request: Request, s: State, body: Sampled, prompts: list[list[int]], max_tokens: int, kind: str):
    if max_tokens > s.limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {s.limits.max_tokens}",
                       param="max_tokens")  # fmt: skip
    try:
        sampling = Sampling(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stops()
        )
    except AdapterError as e:
        raise ApiError(400, shown(str(e))) from None
    started, source = time.monotonic(), _adapter(s, body.model)
    streams = await _submit(s, source, prompts, sampling)
    s.metrics.prompt_tokens.inc(sum(map(len, prompts)))
    reply = Reply(kind, body.model, started, s)
    events = _events(streams, started + s.limits.request_timeout)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.sse(events, len(prompts), usage), media_type="text/event-stream")
    return await _unless_gone(request, reply.whole(events, len(prompts)))


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


async def _submit(s: State, source: str | None, prompts: list[list[int]], sampling: Sampling) -> list:
    """One engine stream per prompt; the adapter is held (never evicted) until the engine has them."""
    if source is None:
        return _submit_all(s, None, prompts, sampling)
    async with s.registry.use(source) as entry:
        return _submit_all(s, entry.inner, prompts, sampling)


def _submit_all(s: State, inner: str | None, prompts: list[list[int]], sampling: Sampling) -> list:
    streams = []
    try:
        for ids in prompts:
            streams.append(s.engine.submit(ids, inner, sampling))
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
                    yield _sse({"error": _failure(chunk).response_body()})
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
    def response_body(self) -> dict[str, Any]:
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


# -- encoders -------------------------------------------------------------------------------------
async def embeddings(request: Request, s: State = Authorized) -> Any:
    body = await _body(request, Embeddings, s.limits.max_body_bytes)
    _needs(s, ENCODER, "/v1/embeddings")
    vectors, tokens = await _encode(s, body.model, body.texts(), _pooled)
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def classify(request: Request, s: State = Authorized) -> Any:
    body = await _body(request, Classify, s.limits.max_body_bytes)
    _needs(s, ENCODER, "/v1/classify")
    if not head_parameters(s.engine.model):
        raise ApiError(400, f"{s.name} has no classification head: use /v1/embeddings")
    rows, tokens = await _encode(s, body.model, body.texts(), _probabilities)
    labels = s.engine.model.config.id2label
    data = [_labelled(i, row, labels) for i, row in enumerate(rows)]
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _labelled(index: int, row: list[float], labels: dict[int, str]) -> dict[str, Any]:
    best = max(range(len(row)), key=row.__getitem__)
    scores = {str(labels.get(i, i)): round(p, 6) for i, p in enumerate(row)}
    return {"index": index, "label": str(labels.get(best, best)), "score": round(row[best], 6), "scores": scores}


async def _encode(s: State, model: str, texts: list[str], read) -> tuple[list[list[float]], int]:
    """``read(model, batch)`` on the tokenized texts in the model's own thread, with the adapter and its head."""
    source = _adapter(s, model)

    def tokenize():
        with s.tokenizing:
            limit = s.limits.max_prompt_tokens
            return s.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")

    batch = await run_in_threadpool(tokenize)
    tokens = int(batch["attention_mask"].sum())
    s.metrics.prompt_tokens.inc(tokens)
    if source is None:
        return await _run(s, None, read, batch), tokens
    async with s.registry.use(source) as entry:
        return await _run(s, entry, read, batch), tokens


async def _run(s: State, entry: Loaded | None, read, batch) -> list[list[float]]:
    head = entry.head if entry else s.registry.base_head

    def forward(model) -> list[list[float]]:
        if head:  # the adapter's own task head (each adapter may have trained one)
            for key, param in head_parameters(model).items():
                param.data.copy_(head[key])
        return read(model, batch)

    runner: Direct = s.engine
    future = runner.run(entry.inner if entry else None, forward)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), s.limits.request_timeout)
    except TimeoutError:
        raise ApiError(504, "the request ran past the server's time limit", "timeout", code="timeout") from None


def _pooled(model, batch) -> list[list[float]]:
    """Mean of the last hidden states over the real tokens (no padding)."""
    import torch

    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


def _probabilities(model, batch) -> list[list[float]]:
    import torch

    with torch.no_grad():
        return model(**batch).logits.float().softmax(-1).tolist()


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    import struct

    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


# -- listing, health, metrics, admin ------------------------------------------------------------------
async def models(s: State = Authorized) -> Any:
    entry = {"object": "model", "created": s.created, "owned_by": "adapterkit"}
    data = [{"id": s.name, **entry, "root": s.name, "parent": None}]
    data += [{"id": n, **entry, "root": s.registry.sources[n], "parent": s.name} for n in s.registry.names()]
    return {"object": "list", "data": data}


async def health(request: Request) -> Any:
    s: State = request.app.state.s
    stats = s.engine.stats() if hasattr(s.engine, "stats") else {}
    return {"status": "ok", "model": s.name, "kind": s.kind, "adapters_loaded": len(s.registry.loaded), **stats}


async def metrics(request: Request) -> Response:
    s: State = request.app.state.s
    stats = s.engine.stats() if hasattr(s.engine, "stats") else {}
    s.metrics.batch.set(stats.get("last_batch_size", 0))
    s.metrics.queued.set(stats.get("queued", 0))
    s.metrics.running.set(stats.get("running", 0))
    s.metrics.resident.set(len(s.registry.loaded))
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def add_adapter(request: Request, s: State = Administrator) -> Any:
    body = await _body(request, NewAdapter, 64 * 2**10)
    if body.name == s.name or body.name in s.aliases:
        raise ApiError(400, f"{body.name!r} is the base model's name", param="name")
    replaced = body.name in s.registry.sources
    await run_in_threadpool(s.registry.add, body.name, body.source)
    await s.registry.evict()  # a replaced adapter leaves once idle
    return JSONResponse({"name": body.name, "source": body.source, "replaced": replaced}, status_code=201)


async def remove_adapter(name: str, s: State = Administrator) -> Any:
    s.registry.remove(name)
    await s.registry.evict()
    return {"deleted": name}


ROUTES = [
    ("/v1/completions", completions, "POST", {"openapi_extra": request_body(Completion)}),
    ("/v1/chat/completions", chat_completions, "POST", {"openapi_extra": request_body(Chat)}),
    ("/v1/embeddings", embeddings, "POST", {"openapi_extra": request_body(Embeddings)}),
    ("/v1/classify", classify, "POST", {"openapi_extra": request_body(Classify)}),
    ("/v1/models", models, "GET", {}),
    ("/health", health, "GET", {}),
    ("/metrics", metrics, "GET", {}),
    ("/admin/adapters", add_adapter, "POST", {"openapi_extra": request_body(NewAdapter)}),
    ("/admin/adapters/{name}", remove_adapter, "DELETE", {}),
]


# -- running it ---------------------------------------------------------------------------------------
def load(model_dir: str):
    """The model (eval mode), its tokenizer, and its kind: a causal LM or an encoder (from its config)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(model_dir)
    architectures = config.architectures or []
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or _decoder_only(config):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer, CAUSAL
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), tokenizer, ENCODER
    return AutoModel.from_pretrained(model_dir).eval(), tokenizer, ENCODER


def _decoder_only(config) -> bool:
    """A config that names no architecture (e.g. one converted from GGUF): a causal LM when its type
    has a causal-LM class and no masked-LM one (Llama yes; BERT, which has both, no)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    return (
        not config.architectures
        and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


@dataclasses.dataclass(frozen=True)
class Options:
    """``adapterkit serve``'s options (the CLI's flags)."""

    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    hub: str | None = None
    allow_hub_refs: bool = False
    api_key_file: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_context: int = 2048
    max_adapters: int = 32
    max_adapter_bytes: int = 2**30
    limits: Limits = Limits()


def build(model_dir: str, options: Options) -> FastAPI:
    """The app over the model in ``model_dir`` (an engine for a causal LM, a worker thread for an encoder)."""
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.registry import Bounds

    model, tokenizer, kind = load(model_dir)
    if kind == CAUSAL:
        engine = Engine(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
                        max_context=options.max_context)  # fmt: skip
    else:
        engine = Direct(model)
    registry = Registry(engine, options.adapters, Bounds(options.max_adapters, options.max_adapter_bytes), options.hub)
    keys = read_keys(options.api_key_file) if options.api_key_file else frozenset()
    name = Path(model_dir).name
    return create_app(engine, tokenizer, registry, name=name, kind=kind, limits=options.limits, keys=keys,
                      allow_hub_refs=options.allow_hub_refs, aliases=[model_dir])  # fmt: skip


def serve(model_dir: str, options: Options, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    # As the hub: idle keep-alive connections close after 5 s; past 512 connections at once, 503s.
    app = build(model_dir, options)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5, limit_concurrency=512)
