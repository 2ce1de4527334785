"""The Hugging Face Hub's protocol, so ``huggingface_hub`` and ``peft`` can pull from and push to this hub.

Reads: model info, the file tree, file downloads (with the ETag and commit headers ``hf_hub_download``
checks). Writes, for ``HfApi(endpoint=URL).upload_folder`` / ``create_commit``: every file is "regular"
(base64 inside the commit), so no LFS or Xet storage is involved.
"""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from adapterkit.hub.access import Reader, Writer, authenticated, writable
from adapterkit.hub.bodies import (
    PREUPLOAD_BODY,
    SMALL_BODY,
    AddFile,
    Commit,
    DeleteFile,
    Header,
    NewRepo,
    Operation,
    Preupload,
    decoded,
    upload_cap,
)
from adapterkit.hub.cards import card_from_files
from adapterkit.hub.protocol import reason
from adapterkit.hub.safety import HubError, check_name, check_path, check_ref
from adapterkit.hub.store import Store
from adapterkit.web import bounded_body, request_body

router = APIRouter()
MEDIA_TYPES = {"training.png": "image/png", "README.md": "text/markdown; charset=utf-8"}  # the rest: bytes


@router.get("/api/models/{owner}/{name}")
@router.get("/api/models/{owner}/{name}/revision/{rev}")
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


@router.get("/api/models/{owner}/{name}/tree/{rev}")
@router.get("/api/models/{owner}/{name}/tree/{rev}/{path:path}")
def tree(store: Reader, owner: str, name: str, rev: str, path: str = "") -> Any:
    _, manifest = store.revision(f"{owner}/{name}", _rev(rev))
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    return [
        {"type": "file", "path": p, "size": m["size"], "oid": m["sha256"][:40],
         "lfs": {"oid": m["sha256"], "size": m["size"], "pointerSize": 134}}
        for p, m in sorted(manifest.items()) if p.startswith(prefix)
    ]  # fmt: skip


@router.get("/{owner}/{name}/resolve/{rev}/{path:path}")
@router.head("/{owner}/{name}/resolve/{rev}/{path:path}")
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


@router.post("/api/repos/create", openapi_extra=request_body(NewRepo))
async def create_repo(request: Request) -> Any:
    """The token first (401 before a byte of the body is read), then a small body, then the owner."""
    _, who = await authenticated(request)
    body = NewRepo.model_validate_json(await bounded_body(request, SMALL_BODY, HubError))
    owner, _, name = body.name.rpartition("/")
    owner = body.organization or owner or who  # no namespace: the token owner's, as on the HF Hub
    await writable(request, owner)
    check_name(f"{owner}/{name}")
    return {"url": f"{str(request.base_url).rstrip('/')}/{owner}/{name}", "name": f"{owner}/{name}"}


@router.post("/api/models/{owner}/{name}/preupload/{rev}", openapi_extra=request_body(Preupload))
async def preupload(request: Request, store: Writer, owner: str, name: str, rev: str) -> Any:
    check_name(f"{owner}/{name}")
    check_ref(_rev(rev))
    body = Preupload.model_validate_json(await bounded_body(request, PREUPLOAD_BODY, HubError))
    for planned in body.files:
        check_path(planned.path)
    return {"files": [{"path": f.path, "uploadMode": "regular", "shouldIgnore": False} for f in body.files]}


@router.post("/api/models/{owner}/{name}/commit/{rev}", openapi_extra=request_body(Commit, "application/x-ndjson"))
async def commit(request: Request, store: Writer, owner: str, name: str, rev: str) -> Any:
    """An HF commit adds and deletes files on top of the revision it names (none for a new adapter)."""
    repo = f"{owner}/{name}"
    raw = await bounded_body(request, upload_cap(store.limits), HubError)
    card = await run_in_threadpool(_commit, store, repo, _rev(rev), raw)
    base = str(request.base_url).rstrip("/")
    return {
        "commitUrl": f"{base}/{repo}/commit/{card['revision']}",
        "commitOid": card["revision"],
        "pullRequestUrl": None,
    }


def _commit(store: Store, repo: str, rev: str, raw: bytes) -> dict[str, Any]:
    operations = _operations(raw)
    files = _files_of(store, repo, rev)
    for operation in operations:
        if isinstance(operation, AddFile):
            files[operation.value.path] = decoded(operation.value.path, operation.value.content)
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


def _rev(rev: str) -> str:
    return "latest" if rev == "main" else rev  # huggingface_hub asks for "main" by default


def _iso(seconds: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    except (TypeError, ValueError, OverflowError, OSError):  # an index row not written by this hub
        return "—"
