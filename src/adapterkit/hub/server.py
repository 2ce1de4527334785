"""The hub's HTTP server (FastAPI on uvicorn): adapterkit's JSON API, the Hugging Face Hub's download
protocol (so ``huggingface_hub`` and ``peft`` can pull), and HTML pages (:mod:`adapterkit.hub.page`).

``adapterkit hub serve --root DIR --host 127.0.0.1 --port 8765 [--private]``.
Reads are public unless ``private``; uploads and deletes need a token of the adapter's owner
(``adapterkit hub token create OWNER``), checked before any body is read. Every body is bounded and
validated against a pydantic model (also published at ``/openapi.json``). Every refusal is a 4xx with
``{"error": reason}`` (and the ``X-Error-Code`` header the HF client understands); every response
carries headers that keep a browser from sniffing, framing or scripting it. The plumbing shared with
``adapterkit serve`` (bounded bodies, tokens, security headers, the schema) is :mod:`adapterkit.web`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from adapterkit.hub import page as page_html
from adapterkit.hub.bodies import (
    BODIES,
    AddFile,
    Commit,
    DeleteFile,
    Header,
    NewRepo,
    Operation,
    Preupload,
    Upload,
)
from adapterkit.hub.protocol import Card, parse_json, reason
from adapterkit.hub.safety import HubError, check_name, check_path, check_ref
from adapterkit.hub.store import Limits, Store
from adapterkit.web import SecurityHeaders, bearer_token, bounded_body, openapi_with_bodies, request_body

SMALL_BODY = 64 * 2**10  # create-repo: a name and a few flags
PREUPLOAD_BODY = 2**20  # preupload: up to 256 paths with a 512-byte sample each
PER_PAGE = 20  # adapters on a page of the index
MEDIA_TYPES = {"training.png": "image/png", "README.md": "text/markdown; charset=utf-8"}  # the rest: bytes


# -- the app -----------------------------------------------------------------------------------------
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
    for router in (api, hf, pages):  # pages last: "/{owner}/{name}" would shadow "/api/adapters"
        app.include_router(router)
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


async def _authenticated(request: Request) -> tuple[Store, str]:
    """The store and the token's owner; 401 without a valid token."""
    store = request.app.state.store
    who = store.owner_of(bearer_token(request))
    if who is None:
        raise HubError(401, "uploads and deletes need a token: adapterkit hub token create OWNER")
    return store, who


async def readable(request: Request) -> Store:
    """Dependency of every read: the store, after the token check of a private hub.

    async: a sync dependency would cost every request a hop through the thread pool; the token
    lookup is one indexed SQLite read."""
    store = request.app.state.store
    if request.app.state.private and store.owner_of(bearer_token(request)) is None:
        raise HubError(401, "this hub is private: pass a token (Authorization: Bearer ...)")
    return store


async def writable(request: Request, owner: str) -> Store:
    """Dependency of uploads and deletes: the token must belong to ``owner``."""
    store, who = await _authenticated(request)
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
    """The card as :class:`adapterkit.hub.protocol.Stored` reads it, with the name and revision history."""
    repo = f"{owner}/{name}"
    card, _ = store.revision(repo, rev)
    return {**card, "name": repo, "history": store.history(repo)}


@api.post("/api/adapters/{owner}/{name}", openapi_extra=request_body(Upload))
async def upload(request: Request, store: Writer, owner: str, name: str) -> Any:
    raw = await bounded_body(request, _upload_cap(store.limits), HubError)
    return await run_in_threadpool(_upload, store, f"{owner}/{name}", raw)


def _upload(store: Store, repo: str, raw: bytes) -> dict[str, Any]:
    body = Upload.model_validate_json(raw)
    files = {path: _b64(path, data) for path, data in body.files.items()}
    return store.commit(repo, files, body.card, body.tags)


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
        "tags": card["tags"],
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


@hf.get("/{owner}/{name}/resolve/{rev}/{path:path}")
@hf.head("/{owner}/{name}/resolve/{rev}/{path:path}")
def resolve(store: Reader, owner: str, name: str, rev: str, path: str) -> Any:
    card, manifest = store.revision(f"{owner}/{name}", _rev(rev))
    headers = {"X-Repo-Commit": card["revision"]}
    if path not in manifest:
        raise HubError(404, f"{owner}/{name} has no file {path!r}", code="EntryNotFound", headers=headers)
    digest = manifest[path]["sha256"]
    if not store.blob(digest).is_file():  # the revision was deleted and collected since it was read
        raise HubError(404, f"{owner}/{name} has no revision {rev!r} any more", code="RevisionNotFound")
    headers |= {"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"', "Cache-Control": "public, max-age=31536000"}
    media_type = MEDIA_TYPES.get(path, "application/octet-stream")  # the page shows training.png as an image
    return FileResponse(store.blob(digest), headers=headers, media_type=media_type)


# The write side, for `HfApi(endpoint=URL).upload_folder` / `create_commit`: every file is "regular"
# (base64 inside the commit), so no LFS or Xet storage is involved.
@hf.post("/api/repos/create", openapi_extra=request_body(NewRepo))
async def create_repo(request: Request) -> Any:
    """The token first (401 before a byte of the body is read), then a small body, then the owner."""
    _, who = await _authenticated(request)
    body = NewRepo.model_validate_json(await bounded_body(request, SMALL_BODY, HubError))
    owner, _, name = body.name.rpartition("/")
    owner = body.organization or owner or who  # no namespace: the token owner's, as on the HF Hub
    await writable(request, owner)
    check_name(f"{owner}/{name}")
    return {"url": f"{str(request.base_url).rstrip('/')}/{owner}/{name}", "name": f"{owner}/{name}"}


@hf.post("/api/models/{owner}/{name}/preupload/{rev}", openapi_extra=request_body(Preupload))
async def preupload(request: Request, store: Writer, owner: str, name: str, rev: str) -> Any:
    check_name(f"{owner}/{name}")
    check_ref(_rev(rev))
    body = Preupload.model_validate_json(await bounded_body(request, PREUPLOAD_BODY, HubError))
    for planned in body.files:
        check_path(planned.path)
    return {"files": [{"path": f.path, "uploadMode": "regular", "shouldIgnore": False} for f in body.files]}


@hf.post("/api/models/{owner}/{name}/commit/{rev}", openapi_extra=request_body(Commit, "application/x-ndjson"))
async def hf_commit(request: Request, store: Writer, owner: str, name: str, rev: str) -> Any:
    """An HF commit adds and deletes files on top of the revision it names (none for a new adapter)."""
    repo = f"{owner}/{name}"
    raw = await bounded_body(request, _upload_cap(store.limits), HubError)
    card = await run_in_threadpool(_hf_commit, store, repo, _rev(rev), raw)
    base = str(request.base_url).rstrip("/")
    return {
        "commitUrl": f"{base}/{repo}/commit/{card['revision']}",
        "commitOid": card["revision"],
        "pullRequestUrl": None,
    }


def _hf_commit(store: Store, repo: str, rev: str, raw: bytes) -> dict[str, Any]:
    operations = _operations(raw)
    files = _files_of(store, repo, rev)
    for operation in operations:
        if isinstance(operation, AddFile):
            files[operation.value.path] = _b64(operation.value.path, operation.value.content)
        elif isinstance(operation, DeleteFile):
            files.pop(operation.value.path, None)
    return store.commit(repo, files, card_from_files(files), [])


def _operations(raw: bytes) -> list[Header | AddFile | DeleteFile]:
    """The commit's lines, each validated; the reason names the line that does not fit."""
    operations = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                operations.append(Operation.model_validate_json(line).root)
            except ValidationError as e:
                raise HubError(422, f"commit line {number}: {reason(e)}") from None
    return operations


def _files_of(store: Store, repo: str, rev: str) -> dict[str, bytes]:
    """The files of the revision a commit builds on; none for a new adapter."""
    try:
        _, manifest = store.revision(repo, rev)
    except HubError as e:
        if e.code != "RepoNotFound":
            raise
        return {}
    try:
        return {path: store.blob(m["sha256"]).read_bytes() for path, m in manifest.items()}
    except FileNotFoundError:
        raise HubError(409, f"{repo} was deleted during this commit") from None


def card_from_files(files: dict[str, bytes]) -> Card:
    """A card read from an uploaded ``adapter_config.json`` (adapterkit's or peft's), when there is one.

    A field that does not fit the card's schema is left out: the files were checked, the card is a summary."""
    try:
        config = parse_json(files["adapter_config.json"], "adapter_config.json")
    except (KeyError, ValueError):
        return Card()
    if not isinstance(config, dict):
        return Card()
    if config.get("format") == "adapterkit":
        return _fitting(_adapterkit_fields(config))
    kind = config.get("peft_type")
    method = kind.lower() if isinstance(kind, str) and kind else None
    return _fitting({"method": method, "format": "peft", "base_model": config.get("base_model_name_or_path")})


def _adapterkit_fields(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    base = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
    return {
        "method": inner.get("method"),
        "format": "adapterkit",
        "base_model": base.get("name_or_path"),
        "model_type": base.get("model_type"),
        "fingerprint": base.get("fingerprint"),
    }


def _fitting(fields: dict[str, Any]) -> Card:
    """A card of the fields that fit the schema one by one (every field has a default)."""
    kept = {}
    for key, value in fields.items():
        try:
            Card.model_validate({key: value})
        except ValidationError:
            continue
        kept[key] = value
    return Card.model_validate(kept)


# -- the HTML page (rendered by adapterkit.hub.page) ---------------------------------------------------
@pages.get("/", response_class=HTMLResponse)
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


@pages.get("/{owner}/{name}", response_class=HTMLResponse)
def card_page(request: Request, store: Reader, owner: str, name: str, rev: str = "latest") -> Any:
    repo = f"{owner}/{name}"
    card, manifest = store.revision(repo, rev)
    hub = str(request.base_url).rstrip("/")
    return page_html.adapter_page(repo, card, store.revisions(repo), _readme(store, manifest), hub, rev)


def _readme(store: Store, manifest: dict[str, dict]) -> str | None:
    """The revision's model card text, if it has one (checked UTF-8 on upload)."""
    if "README.md" not in manifest:
        return None
    try:
        return store.blob(manifest["README.md"]["sha256"]).read_bytes().decode("utf-8", "replace")
    except (FileNotFoundError, KeyError, TypeError):  # collected since it was read, or an odd index row
        return None


def _rev(rev: str) -> str:
    return "latest" if rev == "main" else rev  # huggingface_hub asks for "main" by default


def _upload_cap(limits: Limits) -> int:
    return limits.max_upload_bytes * 4 // 3 + 2**20  # base64 grows data by 4/3, plus the JSON around it


def _b64(path: str, data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HubError(400, f"{path!r}: not base64 ({e})") from None


def _iso(seconds: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    except (TypeError, ValueError, OverflowError, OSError):  # an index row not written by this hub
        return "—"


SUMMARY = ("name", "revision", "method", "task", "base_model", "model_type", "params", "metrics", "license", "created")


def _summary(card: dict[str, Any]) -> dict[str, Any]:
    return {k: card.get(k) for k in SUMMARY}


def serve(root: str, host: str = "127.0.0.1", port: int = 8765, private: bool = False, limits: Limits | None = None):
    import uvicorn

    # Idle keep-alive connections are closed after 5 s, and past 512 requests at once new ones get a 503:
    # a public hub still belongs behind a reverse proxy that times out slow clients (uvicorn does not).
    app = create_app(root, private, limits)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5, limit_concurrency=512)
