"""The hub's HTTP server (FastAPI on uvicorn): adapterkit's JSON API, the Hugging Face Hub's protocol (so
``huggingface_hub`` and ``peft`` can pull and push), and HTML pages; one router each (:mod:`.routes`).

``adapterkit hub serve --root DIR --host 127.0.0.1 --port 8765 [--private]``.
Reads are public unless ``private``; uploads and deletes need a token of the adapter's owner, checked
before any body is read (:mod:`adapterkit.hub.access`). Every body is bounded and validated against a
pydantic model (also published at ``/openapi.json``). Every refusal is a 4xx with ``{"error": reason}``
(and the ``X-Error-Code`` header the HF client understands); every response carries headers that keep a
browser from sniffing, framing or scripting it. The plumbing shared with ``adapterkit serve`` (bounded
bodies, tokens, security headers, the schema) is :mod:`adapterkit.web`.
"""

from __future__ import annotations

import functools

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from adapterkit.hub.bodies import BODIES
from adapterkit.hub.protocol import reason
from adapterkit.hub.routes import api, hf, pages
from adapterkit.hub.safety import HubError
from adapterkit.hub.store import Limits, Store
from adapterkit.web import SecurityHeaders, openapi_with_bodies


def create_app(root: str, private: bool = False, limits: Limits | None = None) -> FastAPI:
    """The hub over the folder ``root``: routes in order (adapterkit's API, HF protocol, HTML)."""
    app = FastAPI(title="adapterkit hub", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.store, app.state.private = Store(root, limits or Limits()), private
    handlers = {
        HubError: _refusal,
        RequestValidationError: _invalid,
        ValidationError: _invalid,
        HTTPException: _http_error,
        Exception: _crash,
    }
    for error, handler in handlers.items():
        app.add_exception_handler(error, handler)
    for routes in (api, hf, pages):  # pages last: "/{owner}/{name}" would shadow "/api/adapters"
        app.include_router(routes.router)
    app.add_middleware(SecurityHeaders)
    app.openapi = functools.partial(openapi_with_bodies, app, BODIES)
    return app


async def _refusal(request: Request, e: HubError) -> Response:
    printable = "".join(c if " " <= c <= "~" else "?" for c in e.reason[:500])  # a header value is one ASCII line
    headers = {**e.headers, "X-Error-Message": printable}
    if e.code:
        headers["X-Error-Code"] = e.code
    return JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)


async def _invalid(request: Request, e: RequestValidationError | ValidationError) -> Response:
    """A body or parameter that does not fit its model: 422 with what did not fit."""
    return await _refusal(request, HubError(422, reason(e)))  # reason() reads only .errors(), which both have


async def _http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (unknown route, wrong method) in the hub's shape."""
    return await _refusal(request, HubError(e.status_code, str(e.detail), headers=e.headers))


async def _crash(request: Request, e: Exception) -> Response:
    """The last resort: a bug still answers JSON (and uvicorn logs the traceback)."""
    return JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)


def serve(root: str, host: str = "127.0.0.1", port: int = 8765, private: bool = False, limits: Limits | None = None):
    """Run the hub until interrupted."""
    import uvicorn

    # Idle keep-alive connections are closed after 5 s, and past 512 requests at once new ones get a 503:
    # a public hub still belongs behind a reverse proxy that times out slow clients (uvicorn does not).
    app = create_app(root, private, limits)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5, limit_concurrency=512)
