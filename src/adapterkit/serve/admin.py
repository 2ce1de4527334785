"""Listing, health, metrics and the admin routes (adding and removing adapters at run time: key holders only)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from adapterkit.serve.plumbing import Administrator, ApiError, Authorized, Observer, State, read_body
from adapterkit.serve.schemas import NewAdapter


# -- listing, health, metrics, admin ------------------------------------------------------------------
async def models(s: State = Authorized) -> Any:
    """The base model and the adapters that can be served (no server paths: ``root`` is the name)."""
    entry = {"object": "model", "created": s.created, "owned_by": "adapterkit"}
    data = [{"id": s.name, **entry, "root": s.name, "parent": None}]
    data += [{"id": n, **entry, "root": n, "parent": s.name} for n in s.registry.listed()]
    if s.route is not None:  # picks one of the adapters per request (--router)
        data.append({"id": s.route.name, **entry, "root": s.route.name, "parent": s.name})
    return {"object": "list", "data": data}


async def health(request: Request) -> Any:
    s: State = request.app.state.s
    stats = s.engine.stats() if hasattr(s.engine, "stats") else {}
    return {"status": "ok", "model": s.name, "kind": s.kind, "adapters_loaded": len(s.registry.loaded), **stats}


async def metrics(s: State = Observer) -> Response:
    stats = s.engine.stats() if hasattr(s.engine, "stats") else {}
    s.metrics.batch.set(stats.get("last_batch_size", 0))
    s.metrics.queued.set(stats.get("queued", 0))
    s.metrics.running.set(stats.get("running", 0))
    s.metrics.resident.set(len(s.registry.loaded))
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def schema(request: Request, s: State = Observer) -> Response:
    """The OpenAPI schema (its request bodies included)."""
    return JSONResponse(request.app.openapi())


async def add_adapter(request: Request, s: State = Administrator) -> Any:
    body = await read_body(request, NewAdapter, 64 * 2**10)
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
