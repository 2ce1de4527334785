"""adapterkit's JSON API: search, a card with its history, upload (one JSON body), delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from adapterkit.hub.access import Reader, Writer
from adapterkit.hub.bodies import Upload, decoded, upload_cap
from adapterkit.hub.safety import HubError
from adapterkit.hub.store import Store
from adapterkit.web import bounded_body, request_body

router = APIRouter()
SUMMARY = ("name", "revision", "method", "task", "base_model", "model_type", "params", "metrics", "license", "created")


@router.get("/api/adapters")
def search(store: Reader, q: str = "", base_model: str = "", method: str = "", task: str = "") -> Any:
    found = store.search(q, base_model=base_model, method=method, task=task)
    return [{k: card.get(k) for k in SUMMARY} for card in found]


@router.get("/api/adapters/{owner}/{name}")
def card(store: Reader, owner: str, name: str, rev: str = "latest") -> Any:
    """The card as :class:`adapterkit.hub.protocol.Stored` reads it, with the name and revision history."""
    repo = f"{owner}/{name}"
    card, _ = store.revision(repo, rev)
    return {**card, "name": repo, "history": store.history(repo)}


@router.post("/api/adapters/{owner}/{name}", openapi_extra=request_body(Upload))
async def upload(request: Request, store: Writer, owner: str, name: str) -> Any:
    raw = await bounded_body(request, upload_cap(store.limits), HubError)
    return await run_in_threadpool(_upload, store, f"{owner}/{name}", raw)


def _upload(store: Store, repo: str, raw: bytes) -> dict[str, Any]:
    body = Upload.model_validate_json(raw)
    files = {path: decoded(path, data) for path, data in body.files.items()}
    return store.commit(repo, files, body.card, body.tags)


@router.delete("/api/adapters/{owner}/{name}")
def delete(store: Writer, owner: str, name: str) -> Any:
    return {"deleted": f"{owner}/{name}", "revisions": store.delete(f"{owner}/{name}")}
