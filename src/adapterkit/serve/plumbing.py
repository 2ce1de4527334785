"""What every route of ``adapterkit serve`` shares: its limits, OpenAI's error shape and the handlers that
answer every refusal in it, the API key (checked before the body), the body reader (bounded by
:func:`adapterkit.web.bounded_body`), the app's state and its Prometheus metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterkit.errors import AdapterError, shown
from adapterkit.hub.client import is_ref
from adapterkit.hub.protocol import parse_json, reason
from adapterkit.serve import defaults
from adapterkit.serve.registry import AdapterUnavailable, Registry
from adapterkit.serve.tokenizers import Tokenizers
from adapterkit.web import bearer_token, bounded_body

CAUSAL, ENCODER = "causal", "encoder"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_tokens: int = defaults.MAX_TOKENS
    max_prompt_tokens: int = defaults.MAX_PROMPT_TOKENS
    request_timeout: float = defaults.REQUEST_TIMEOUT
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
    public_metrics: bool = False  # /metrics and /openapi.json without a key (the operator's choice)
    route: Any = None  # serve.routed.AutoRoute: the model that picks each request's adapter (--router)

    def __post_init__(self) -> None:
        self.metrics = Metrics()
        self.tokenizers = Tokenizers(self.tokenizer)
        self.created = int(time.time())


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
        self.routed = Counter(
            "adapterkit_routing_decisions", "requests to the auto model, by the adapter chosen", ["adapter"], registry=r
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


HANDLERS = {
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
        token = bearer_token(request)
        given = hash_key(token) if token is not None else ""
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


async def observer(request: Request) -> State:
    """Dependency of /metrics and /openapi.json: a key holder's, unless the operator opened them."""
    s: State = request.app.state.s
    return s if s.public_metrics else await authorized(request)


Observer = Depends(observer)


async def read_body(request: Request, model: type[BaseModel], cap: int):
    """The body, bounded (by Content-Length before reading, else as it streams), parsed and validated."""
    raw = await bounded_body(request, cap, ApiError, shown)
    try:
        return model.model_validate(parse_json(raw, "the body"))
    except ValueError as e:
        if isinstance(e, ValidationError):
            raise _from_validation(e) from None
        raise ApiError(400, shown(str(e)), code="invalid_json") from None


def adapter_source(s: State, model: str) -> str | None:
    """The source of the adapter ``model`` names (None: the base model); 404 for a name not served."""
    if model == s.name or model in s.aliases:
        return None
    if is_ref(model) and model not in s.registry.sources:
        if not s.allow_hub_refs:
            raise ApiError(404, "hub references are not served here (the server runs without --allow-hub-refs)",
                           param="model", code="model_not_found")  # fmt: skip
        s.registry.refs.add(s.registry.check(model))
        return model
    try:
        return s.registry.source_of(model)
    except AdapterUnavailable as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None


def needs(s: State, kind: str, route: str) -> None:
    """Refuse ``route`` unless the served model is of ``kind`` (a causal LM or an encoder)."""
    if s.kind != kind:
        other = "a causal LM" if kind == CAUSAL else "an encoder"
        raise ApiError(400, f"{route} needs {other}; {s.name} is {'a causal LM' if s.kind == CAUSAL else 'an encoder'}")
