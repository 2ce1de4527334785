"""The web plumbing the hub's server (:mod:`adapterkit.hub.server`) and ``adapterkit serve``
(:mod:`adapterkit.serve.app`) share: the bounded body reader, the bearer token, the security headers and
an OpenAPI schema that also names the bodies the routes read themselves.

Each app keeps its own error shape (the hub's ``{"error": reason}``, OpenAI's ``{"error": {...}}``):
:func:`bounded_body` raises whatever exception the app's handlers turn into that shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (any case of ``Bearer``, spaces stripped);
    None without one."""
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


async def bounded_body(
    request: Request, cap: int, refuse: Callable[[int, str], Exception], show: Callable[[str], str] = str
) -> bytes:
    """The request body, refused past ``cap`` bytes: by its Content-Length before reading, else when
    the stream passes the cap (nothing past it is read).

    A refusal raises ``refuse(status, reason)`` (400 or 413), the app's own exception; ``show`` prepares a
    malformed Content-Length for the reason (e.g. :func:`adapterkit.errors.shown`)."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise refuse(400, f"bad Content-Length {show(declared[:40])!r}")
    if int(declared) > cap:
        raise refuse(413, f"the body ({declared} bytes) is over the limit of {cap} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise refuse(413, f"the body is over the limit of {cap} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer; not a server error
        raise refuse(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


class SecurityHeaders:
    """Adds :data:`SECURITY` to every response (pure ASGI: file responses and streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def request_body(model: type[BaseModel], media: str = "application/json") -> dict[str, Any]:
    """The OpenAPI request body (a route's ``openapi_extra``) of a route that reads its body itself, after
    the token check and within a cap; :func:`openapi_with_bodies` publishes ``model``'s schema."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {media: {"schema": schema}}}}


def openapi_with_bodies(app: FastAPI, bodies: Iterable[type[BaseModel]]) -> dict[str, Any]:
    """FastAPI's schema plus ``bodies``: the pydantic models of bodies the routes read themselves (bounded).

    Set as ``app.openapi = functools.partial(openapi_with_bodies, app, BODIES)``; built once, then kept."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in bodies], ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema
