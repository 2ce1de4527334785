"""The hub's HTTP server (FastAPI on uvicorn): adapterkit's JSON API, the Hugging Face Hub's download
protocol (so ``huggingface_hub`` and ``peft`` can pull), and a plain HTML page.

``adapterkit hub serve --root DIR --host 127.0.0.1 --port 8765 [--private]``.
Reads are public unless ``private``; uploads and deletes need a token of the adapter's owner
(``adapterkit hub token create OWNER``). Every refusal is an HTTP error with ``{"error": reason}``
(and the ``X-Error-Code`` header the HF client understands).
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from .safety import HubError
from .store import Limits, Store


def create_app(root: str, private: bool = False, limits: Limits | None = None) -> FastAPI:
    """The hub over the folder ``root``: routes in order (adapterkit's API, HF protocol, HTML)."""
    app = FastAPI(title="adapterkit hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.private = Store(root, limits or Limits()), private
    app.add_exception_handler(HubError, _refusal)
    for router in (api, hf, pages):  # pages last: "/{owner}/{name}" would shadow "/api/adapters"
        app.include_router(router)
    return app


async def _refusal(request: Request, e: HubError) -> Response:
    headers = {**e.headers, "X-Error-Message": e.reason[:500].encode("ascii", "replace").decode()}
    if e.code:
        headers["X-Error-Code"] = e.code
    return JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)


async def readable(request: Request) -> Store:
    """Dependency of every read: the store, after the token check of a private hub.

    async: a sync dependency would cost every request a hop through the thread pool; the token
    lookup is one indexed SQLite read."""
    store = request.app.state.store
    if request.app.state.private and store.owner_of(_token(request)) is None:
        raise HubError(401, "this hub is private: pass a token (Authorization: Bearer ...)")
    return store


async def writable(request: Request, owner: str) -> Store:
    """Dependency of uploads and deletes: the token must belong to ``owner``."""
    store = request.app.state.store
    who = store.owner_of(_token(request))
    if who is None:
        raise HubError(401, "uploads and deletes need a token: adapterkit hub token create OWNER")
    if who != owner:
        raise HubError(403, f"this token belongs to {who!r}, not to {owner!r}")
    return store


Reader = Annotated[Store, Depends(readable)]
Writer = Annotated[Store, Depends(writable)]
api, hf, pages = APIRouter(), APIRouter(), APIRouter()


# -- adapterkit's JSON API -------------------------------------------------------------------------
@api.get("/api/adapters")
def search(store: Reader, q: str = "", base_model: str = "", method: str = "", task: str = "") -> Any:
    return [_summary(c) for c in store.search(q, base_model=base_model, method=method, task=task)]


@api.get("/api/adapters/{owner}/{name}")
def card(store: Reader, owner: str, name: str, rev: str = "latest") -> Any:
    repo = f"{owner}/{name}"
    card, _ = store.revision(repo, rev)
    return {**card, "name": repo, "history": [c["revision"] for c in store.history(repo)]}


@api.post("/api/adapters/{owner}/{name}")
async def upload(request: Request, store: Writer, owner: str, name: str) -> Any:
    body = await _bounded_body(request, store.limits)
    files = {path: _b64(path, data) for path, data in body["files"].items()}
    card = body.get("card", {})
    if not isinstance(card, dict):
        raise HubError(400, "card must be a JSON object")
    return store.commit(f"{owner}/{name}", files, card, list(body.get("tags", [])))


@api.delete("/api/adapters/{owner}/{name}")
def delete(store: Writer, owner: str, name: str) -> Any:
    return {"deleted": f"{owner}/{name}", "revisions": store.delete(f"{owner}/{name}")}


# -- the Hugging Face Hub's download protocol -------------------------------------------------------
@hf.get("/api/models/{owner}/{name}")
@hf.get("/api/models/{owner}/{name}/revision/{rev}")
def model_info(request: Request, store: Reader, owner: str, name: str, rev: str = "latest") -> Any:
    repo = f"{owner}/{name}"
    card, manifest = store.revision(repo, _rev(rev))
    return {
        "id": repo,
        "modelId": repo,
        "author": owner,
        "sha": card["revision"],
        "private": request.app.state.private,
        "tags": card.get("tags", []),
        "siblings": [{"rfilename": p} for p in sorted(manifest)],
        "lastModified": _iso(card["created"]),
        "createdAt": _iso(card["created"]),
    }


@hf.get("/api/models/{owner}/{name}/tree/{rev}")
@hf.get("/api/models/{owner}/{name}/tree/{rev}/{path:path}")
def tree(store: Reader, owner: str, name: str, rev: str, path: str = "") -> Any:
    _, manifest = store.revision(f"{owner}/{name}", _rev(rev))
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    return [
        {"type": "file", "path": p, "size": m["size"], "oid": m["sha256"][:40],
         "lfs": {"oid": m["sha256"], "size": m["size"], "pointerSize": 134}}
        for p, m in sorted(manifest.items()) if p.startswith(prefix)
    ]  # fmt: skip


@hf.api_route("/{owner}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
def resolve(store: Reader, owner: str, name: str, rev: str, path: str) -> Any:
    card, manifest = store.revision(f"{owner}/{name}", _rev(rev))
    headers = {"X-Repo-Commit": card["revision"]}
    if path not in manifest:
        raise HubError(404, f"{owner}/{name} has no file {path!r}", code="EntryNotFound", headers=headers)
    digest = manifest[path]["sha256"]
    headers |= {"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"', "Cache-Control": "public, max-age=31536000"}
    return FileResponse(store.blob(digest), headers=headers, media_type="application/octet-stream")


# The write side, for `HfApi(endpoint=URL).upload_folder` / `create_commit`: every file is "regular"
# (base64 inside the commit), so no LFS or Xet storage is involved.
@hf.post("/api/repos/create")
async def create_repo(request: Request) -> Any:
    body = json.loads(await request.body() or b"{}")
    owner = body.get("organization") or body.get("name", "").partition("/")[0]
    name = body.get("name", "").rpartition("/")[2]
    await writable(request, owner)
    return {"url": f"{str(request.base_url).rstrip('/')}/{owner}/{name}", "name": f"{owner}/{name}"}


@hf.post("/api/models/{owner}/{name}/preupload/{rev}")
async def preupload(request: Request, store: Writer, owner: str, name: str, rev: str) -> Any:
    files = (await request.json()).get("files", [])
    return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}


@hf.post("/api/models/{owner}/{name}/commit/{rev}")
async def hf_commit(request: Request, store: Writer, owner: str, name: str, rev: str) -> Any:
    """An HF commit adds and deletes files on top of the revision it names (none for a new adapter)."""
    repo = f"{owner}/{name}"
    lines = [json.loads(line) for line in (await _bounded_raw(request, store.limits)).splitlines() if line.strip()]
    try:
        _, manifest = store.revision(repo, _rev(rev))
    except HubError as e:
        if e.code != "RepoNotFound":
            raise
        manifest = {}
    files = {path: store.blob(m["sha256"]).read_bytes() for path, m in manifest.items()}
    for line in lines:
        key, value = line.get("key"), line.get("value", {})
        if key == "file":
            files[value["path"]] = _b64(value["path"], value["content"])
        elif key == "deletedFile":
            files.pop(value["path"], None)
        elif key != "header":
            raise HubError(400, f"commit operation {key!r} is not supported by this hub (only regular files)")
    card = store.commit(repo, files, card_from_files(files), [])
    base = str(request.base_url).rstrip("/")
    return {
        "commitUrl": f"{base}/{repo}/commit/{card['revision']}",
        "commitOid": card["revision"],
        "pullRequestUrl": None,
    }


def card_from_files(files: dict[str, bytes]) -> dict[str, Any]:
    """A card read from an uploaded ``adapter_config.json`` (adapterkit's or peft's), when there is one."""
    try:
        config = json.loads(files["adapter_config.json"])
    except (KeyError, ValueError):
        return {}
    if config.get("format") == "adapterkit":
        base = config.get("base_model", {})
        return {
            "method": config["config"].get("method"),
            "format": "adapterkit",
            "base_model": base.get("name_or_path"),
            "model_type": base.get("model_type"),
            "fingerprint": base.get("fingerprint"),
        }
    method = str(config.get("peft_type", "")).lower() or None
    return {"method": method, "format": "peft", "base_model": config.get("base_model_name_or_path")}


# -- the HTML page ------------------------------------------------------------------------------------
@pages.get("/", response_class=HTMLResponse)
def index(store: Reader, q: str = "", method: str = "", task: str = "") -> Any:
    cards = store.search(q, method=method, task=task)
    return _page("adapterkit hub", _search_form(q, method, task) + _table(cards))


@pages.get("/{owner}/{name}", response_class=HTMLResponse)
def card_page(store: Reader, owner: str, name: str) -> Any:
    card, _ = store.revision(f"{owner}/{name}")
    return _page(f"{owner}/{name}", _card_html(f"{owner}/{name}", card))


def _token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


def _rev(rev: str) -> str:
    return "latest" if rev == "main" else rev  # huggingface_hub asks for "main" by default


async def _bounded_raw(request: Request, limits: Limits) -> bytes:
    """The request body, refused past the upload limit (base64 grows data by 4/3) without reading it all."""
    cap = limits.max_upload_bytes * 4 // 3 + 2**20
    declared = int(request.headers.get("content-length") or 0)
    if declared > cap:
        raise HubError(413, f"the upload ({declared} bytes) is over the limit of {limits.max_upload_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HubError(413, f"the upload is over the limit of {limits.max_upload_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _bounded_body(request: Request, limits: Limits) -> dict[str, Any]:
    """adapterkit's upload: ``{"files": {path: base64}, "card": {...}, "tags": [...]}``."""
    try:
        body = json.loads(await _bounded_raw(request, limits))
    except ValueError as e:
        raise HubError(400, f"the upload is not JSON ({e})") from e
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        raise HubError(400, 'the upload must be {"files": {path: base64}, "card": {...}, "tags": [...]}')
    return body


def _b64(path: str, data: Any) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError) as e:
        raise HubError(400, f"{path!r}: not base64 ({e})") from e


def _iso(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


SUMMARY = ("name", "revision", "method", "task", "base_model", "model_type", "params", "metrics", "license", "created")


def _summary(card: dict[str, Any]) -> dict[str, Any]:
    return {k: card.get(k) for k in SUMMARY}


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.3em .8em;text-align:left}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style></head>"
        f'<body><h1><a href="/">adapterkit hub</a></h1>{body}</body></html>'
    )


def _search_form(q: str, method: str, task: str) -> str:
    field = '<input name="{0}" id="{0}" value="{1}" placeholder="{0}">'
    inputs = "".join(field.format(k, html.escape(v)) for k, v in (("q", q), ("method", method), ("task", task)))
    return f'<form method="get" action="/" id="search">{inputs}<button type="submit">Search</button></form>'


def _table(cards: list[dict[str, Any]]) -> str:
    if not cards:
        return '<p id="empty">No adapter matches.</p>'
    head = "<tr><th>adapter</th><th>method</th><th>task</th><th>base model</th><th>params</th></tr>"
    rows = "".join(
        f'<tr class="adapter"><td><a href="/{html.escape(c["name"])}">{html.escape(c["name"])}</a></td>'
        f"<td>{html.escape(str(c.get('method')))}</td><td>{html.escape(str(c.get('task')))}</td>"
        f"<td>{html.escape(str(c.get('base_model')))}</td><td>{c.get('params') or 0:,}</td></tr>"
        for c in cards
    )
    return f'<table id="adapters">{head}{rows}</table>'


def _card_html(repo: str, card: dict[str, Any]) -> str:
    shown = ("revision", "tags", "method", "task", "base_model", "model_type", "params", "license", "metrics")
    rows = [(k, card.get(k)) for k in shown] + [("created", _iso(card["created"]))]
    rows += [(f"file {p}", f"{size:,} bytes") for p, size in card.get("files", {}).items()]
    cells = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="{html.escape(k.split()[0])}">{html.escape(_text(v))}</td></tr>'
        for k, v in rows
    )
    return f'<h2 id="name">{html.escape(repo)}</h2><table id="card">{cells}</table>'


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def serve(root: str, host: str = "127.0.0.1", port: int = 8765, private: bool = False, limits: Limits | None = None):
    import uvicorn

    uvicorn.run(create_app(root, private, limits), host=host, port=port, log_level="warning")
