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

The app is assembled here from its parts: :mod:`.plumbing` (limits, errors, keys, bodies, metrics),
:mod:`.completions`, :mod:`.encoders`, :mod:`.admin`, and what it shares with the hub's server,
:mod:`adapterkit.web` (bounded bodies, tokens, security headers, the schema); :mod:`.launch` runs it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from adapterkit.serve import admin, completions, encoders
from adapterkit.serve.plumbing import CAUSAL, HANDLERS, Counted, Limits, State
from adapterkit.serve.registry import Registry
from adapterkit.serve.schemas import BODIES, Chat, Classify, Completion, Embeddings, NewAdapter
from adapterkit.web import SecurityHeaders, openapi_with_bodies, request_body


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
    public_metrics: bool = False,
    route=None,
) -> FastAPI:
    """The server of ``engine`` (an :class:`adapterkit.serve.engine.Engine` for a causal LM, a
    :class:`~adapterkit.serve.registry.Direct` for an encoder) under the base model's ``name``.

    ``keys``: sha256 hashes of the API keys (none: no key needed); ``aliases``: other names of the
    base model (e.g. the path it was loaded from); ``public_metrics``: /metrics and /openapi.json answer
    without a key (by default they need one, as every other route does, where keys are set)."""
    app = FastAPI(title="adapterkit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    limits = limits or Limits()
    app.state.s = State(
        engine, tokenizer, registry, name, kind, limits, keys, allow_hub_refs, aliases, public_metrics, route
    )
    registry.on_event = app.state.s.metrics.adapter_event
    for error, handler in HANDLERS.items():
        app.add_exception_handler(error, handler)
    for route in ROUTES:
        app.add_api_route(*route[:2], methods=[route[2]], **route[3])
    app.add_middleware(SecurityHeaders)
    app.add_middleware(Counted)
    app.openapi = functools.partial(openapi_with_bodies, app, BODIES)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the engine; on shutdown let it finish what is running (``stop(drain=True)``)."""
    s: State = app.state.s
    if hasattr(s.engine, "start"):
        s.engine.start()
    yield
    await run_in_threadpool(s.engine.stop, True)
    s.registry.close()


ROUTES = [
    ("/v1/completions", completions.completions, "POST", {"openapi_extra": request_body(Completion)}),
    ("/v1/chat/completions", completions.chat_completions, "POST", {"openapi_extra": request_body(Chat)}),
    ("/v1/embeddings", encoders.embeddings, "POST", {"openapi_extra": request_body(Embeddings)}),
    ("/v1/classify", encoders.classify, "POST", {"openapi_extra": request_body(Classify)}),
    ("/v1/models", admin.models, "GET", {}),
    ("/health", admin.health, "GET", {}),
    ("/metrics", admin.metrics, "GET", {}),
    ("/openapi.json", admin.schema, "GET", {"include_in_schema": False}),
    ("/admin/adapters", admin.add_adapter, "POST", {"openapi_extra": request_body(NewAdapter)}),
    ("/admin/adapters/{name}", admin.remove_adapter, "DELETE", {}),
]
