"""The hub's HTML pages (rendered by :mod:`adapterkit.hub.page`): the searchable index and an adapter's page.

Included last: ``/{owner}/{name}`` would shadow the API routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from adapterkit.hub import card_page as card_html
from adapterkit.hub import page as page_html
from adapterkit.hub.access import Reader
from adapterkit.hub.store import Store

router = APIRouter()
PER_PAGE = 20  # adapters on a page of the index


@router.get("/", response_class=HTMLResponse)
def index(
    store: Reader,
    q: str = "",
    method: str = "",
    task: str = "",
    base_model: str = "",
    sort: Literal["newest", "name", "params"] = "newest",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = PER_PAGE,
) -> Any:
    """The adapters matching the form, a page of them (one more is read to know whether a next page exists)."""
    fields = {"method": method, "task": task, "base_model": base_model}
    found = store.search(q, sort=sort, offset=(page - 1) * per_page, limit=per_page + 1, **fields)
    query = {k: v for k, v in {"q": q, **fields}.items() if v} | {"sort": sort}
    if per_page != PER_PAGE:
        query["per_page"] = str(per_page)
    return page_html.index_page(found[:per_page], query, page, len(found) > per_page)


@router.get("/{owner}/{name}", response_class=HTMLResponse)
def card_page(request: Request, store: Reader, owner: str, name: str, rev: str = "latest") -> Any:
    repo = f"{owner}/{name}"
    card, manifest = store.revision(repo, rev)
    hub = str(request.base_url).rstrip("/")
    return card_html.adapter_page(repo, card, store.revisions(repo), _readme(store, manifest), hub, rev)


def _readme(store: Store, manifest: dict[str, dict]) -> str | None:
    """The revision's model card text, if it has one (checked UTF-8 on upload)."""
    if "README.md" not in manifest:
        return None
    try:
        return store.blob(manifest["README.md"]["sha256"]).read_bytes().decode("utf-8", "replace")
    except (FileNotFoundError, KeyError, TypeError):  # collected since it was read, or an odd index row
        return None
