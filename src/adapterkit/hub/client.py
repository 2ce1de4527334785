"""The hub client: push, pull (into a content-addressed cache), search, and ``hub:`` references.

``hub:owner/name[@tag|revision]`` resolves against ``$ADAPTERKIT_HUB`` (default
``http://127.0.0.1:8765``). A hub is not trusted: every answer is checked against
:mod:`.protocol`'s schemas, a revision's id is recomputed from its card and manifest (so a pinned
revision means the same bytes whatever the hub sends), every file is streamed to disk, hashed on the
way and cut at its declared size, and nothing is written or removed outside the cache, whatever a
hub answers. Files are stored once under ``$ADAPTERKIT_CACHE/hub/blobs/<sha256>`` (read-only) and
hard-linked into ``hub/<host>/<owner>/<name>/<revision>/`` (copied only where the disk cannot link);
tags and cards are cached too, so an adapter pulled once loads offline. The token goes to the hub's
origin only, never to where a redirect points elsewhere; with ``same_origin=True`` such a redirect is
refused. ``max_bytes`` refuses a revision by its declared size before any file is downloaded, and
:func:`sweep` removes the temporary files a killed download left.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from adapterkit.errors import AdapterError, shown
from adapterkit.files import atomic_file, cache_dir, is_atomic_temp, write_atomically, write_folder
from adapterkit.hub.protocol import (
    REVISION,
    REVISION_PREFIX,
    Digest,
    Entry,
    Key,
    Stored,
    Text,
    check_tree,
    parse_json,
    reason,
    revision_id,
)
from adapterkit.hub.safety import CARD_FILES, HubError, check_name, check_path, check_ref
from adapterkit.runs import adapter_folder, is_run

DEFAULT_HUB = "http://127.0.0.1:8765"
SHARED = (".safetensors", ".json")
MAX_ANSWER = 16 * 2**20  # a JSON answer (parsed, it can take ~25x this in memory); a card is well under 1 MB
CHUNK = 2**20
DEFAULT_PORTS = {"http": 80, "https": 443}


def hub_url(url: str | None = None) -> str:
    return (url or os.environ.get("ADAPTERKIT_HUB") or DEFAULT_HUB).rstrip("/")


def _token(token: str | None) -> str | None:
    return token or os.environ.get("ADAPTERKIT_HUB_TOKEN")


class HubRequestError(AdapterError):
    """The hub refused a request (an HTTP error status), with its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubUnreachable(AdapterError):
    """No answer from the hub (refused connection, timeout, broken transfer)."""


# -- transport ------------------------------------------------------------------------------------
def origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def same_origin_as(a: str, b: str) -> bool:
    """Whether two URLs share scheme, host and port (``http://h`` and ``http://h:80`` do)."""
    (scheme_a, host_a, port_a), (scheme_b, host_b, port_b) = origin(a), origin(b)
    port_a, port_b = port_a or DEFAULT_PORTS.get(scheme_a), port_b or DEFAULT_PORTS.get(scheme_b)
    return (scheme_a, host_a, port_a) == (scheme_b, host_b, port_b)


class Redirects(urllib.request.HTTPRedirectHandler):
    """Follow at most 5 redirects (urllib: to http, https or ftp only); the token stays with the origin it
    was meant for (urllib would send it on to any host a redirect names). ``same_origin``: a redirect
    that leaves the origin is refused before its URL is called (each hop is checked, so the whole chain
    stays with the origin of the first request)."""

    max_redirections = 5

    def __init__(self, same_origin: bool = False) -> None:
        super().__init__()
        self.same_origin = same_origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if self.same_origin and not same_origin_as(newurl, req.full_url):
            fp.close()  # urllib closes it only when it follows the redirect
            raise AdapterError(
                f"the hub at {shown(req.full_url)[:300]} redirected to {shown(newurl)[:300]}, another origin: "
                "refused (same_origin=True follows redirects within the hub's scheme, host and port only)"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not same_origin_as(newurl, req.full_url):
            new.remove_header("Authorization")
        return new


OPENER = urllib.request.build_opener(Redirects(same_origin=False))
SAME_ORIGIN_OPENER = urllib.request.build_opener(Redirects(same_origin=True))  # both immutable: no state to share


def _open(
    method: str,
    url: str,
    data: bytes | None = None,
    token: str | None = None,
    timeout: float = 60,
    *,
    same_origin: bool = False,
):
    """Send one request; an error status becomes :class:`HubRequestError` with the hub's reason.
    ``same_origin``: refuse (AdapterError) a redirect that leaves ``url``'s origin instead of following it."""
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if _token(token):
        req.add_header("Authorization", f"Bearer {_token(token)}")
    try:
        return (SAME_ORIGIN_OPENER if same_origin else OPENER).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise HubRequestError(e.code, f"hub {url}: {e.code} {_refusal(e)}") from None
    except AdapterError:  # a refused redirect: an AdapterError is a ValueError, not an unreachable hub
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise HubUnreachable(f"cannot reach the hub at {url}: {shown(str(getattr(e, 'reason', e)))[:300]}") from None


def _refusal(error: urllib.error.HTTPError) -> str:
    """The hub's ``{"error": reason}`` (bounded, printable), else the status line's reason."""
    try:
        said = json.loads(error.read(64 * 1024))["error"]
    except (ValueError, KeyError, TypeError, RecursionError, OSError, http.client.HTTPException):
        said = error.reason
    return shown(str(said))[:500]


def read_bounded(response, limit: int, url: str, sink: Callable[[bytes], None] | None = None) -> bytes:
    """Read a body of at most ``limit`` bytes, refusing more before it is read; with ``sink``, stream
    it there chunk by chunk instead of returning it."""
    declared = response.headers.get("Content-Length")
    if declared is not None and (not re.fullmatch(r"[0-9]{1,20}", declared) or int(declared) > limit):
        raise AdapterError(f"{url}: the hub announced {shown(declared)[:30]} bytes where at most {limit} fit")
    chunks, size = [], 0
    try:
        while chunk := response.read(min(CHUNK, limit - size + 1)):
            size += len(chunk)
            if size > limit:
                raise AdapterError(f"{url}: the hub sent more than the {limit} bytes expected; refused")
            sink(chunk) if sink else chunks.append(chunk)
    except (OSError, http.client.HTTPException) as e:
        raise HubUnreachable(f"the transfer from {url} broke off: {e}") from None
    return b"".join(chunks)


def request(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    timeout: float = 60,
    *,
    same_origin: bool = False,
) -> bytes:
    """One HTTP call with a bounded answer; a refusal becomes an AdapterError carrying the hub's reason."""
    data = json.dumps(body).encode() if body is not None else None
    with _open(method, url, data, token, timeout, same_origin=same_origin) as response:
        return read_bounded(response, MAX_ANSWER, url)


def call(method: str, url: str, token: str | None, schema: Any, body: Any = None, *, same_origin: bool = False) -> Any:
    """A JSON answer, checked against ``schema`` (a pydantic model or TypeAdapter)."""
    raw = request(method, url, body, token, same_origin=same_origin)
    try:
        data = parse_json(raw, f"the answer of {url}")
        return schema.validate_python(data) if isinstance(schema, TypeAdapter) else schema.model_validate(data)
    except (ValueError, ValidationError) as e:
        detail = reason(e) if isinstance(e, ValidationError) else str(e)
        raise AdapterError(f"the hub at {url} answered with something that does not fit: {shown(detail)}") from None


# -- push -----------------------------------------------------------------------------------------
def push(
    folder: str | os.PathLike,
    name: str,
    hub: str | None = None,
    tags: list[str] | None = None,
    token: str | None = None,
    license: str = "unknown",
    task: str | None = None,
) -> dict[str, Any]:
    """Upload an adapter folder (or an ``adapterkit train`` output) as a new revision of ``name``.

    A train output's ``README.md`` (its model card) and ``training.png`` go along: the hub's page shows them."""
    run, folder = Path(folder), adapter_folder(folder)  # a train output's metrics ride along in the card
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    if run != folder:  # a train output: its model card and training curve sit beside the adapter
        files |= {name: run / name for name in CARD_FILES if (run / name).is_file() and name not in files}
    skipped = [p for p in files if not shared(p)]
    files = {p: f for p, f in files.items() if shared(p)}
    for file in files.values():
        if file.is_symlink():
            raise AdapterError(f"{file} is a symbolic link; the hub takes plain files only")
    payload = {
        "files": {p: base64.b64encode(f.read_bytes()).decode() for p, f in files.items()},
        "card": make_card(folder, license=license, task=task),
        "tags": list(tags or []),
    }
    card = call("POST", f"{hub_url(hub)}/api/adapters/{name}", token, Stored, payload)
    return {**card.model_dump(mode="json"), "skipped": skipped}


def shared(path: str) -> bool:
    """Whether push sends ``path`` (relative to the folder): what the hub takes (:mod:`.safety`)."""
    return path.endswith(SHARED) or path in CARD_FILES


def make_card(folder: Path, license: str = "unknown", task: str | None = None) -> dict[str, Any]:
    """Base model (name, type, fingerprint), method, params, and the train run's task and metrics if any."""
    from adapterkit.core.io import inspect_adapter

    info = inspect_adapter(folder)
    base = info["base_model"]
    card = {
        "method": info["method"],
        "format": info["format"],
        "base_model": base.get("name_or_path"),
        "model_type": base.get("model_type"),
        "fingerprint": base.get("fingerprint"),
        "params": info["params"],
        "license": license,
        "task": task,
        "metrics": {},
    }
    run = folder.parent / "metrics.json"
    if is_run(folder.parent) and run.is_file():
        metrics = json.loads(run.read_text())
        card["task"] = task or metrics["task"]
        card["metrics"] = {metrics["selection_metric"]: metrics["best"]}
    return card


# -- what a hub answers -------------------------------------------------------------------------
class Answer(Stored):
    """The card route's answer: a stored card, the adapter's name and its revisions."""

    name: Text | None = None
    history: list[Digest] = []


class Summary(BaseModel):
    """One search result."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: Text
    revision: Digest
    method: Key | None = None
    task: Key | None = None
    base_model: Text | None = None
    model_type: Key | None = None
    params: Annotated[int, Field(ge=0)] | None = None
    metrics: dict[Key, float] | None = None
    license: Key | None = None


class Lfs(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    oid: Digest
    size: Annotated[int, Field(ge=0)]


class TreeEntry(BaseModel):
    """One file in the hub's answer to ``/api/models/{name}/tree/{rev}`` (the HF protocol)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    path: Annotated[str, Field(max_length=600)]
    size: Annotated[int, Field(ge=0)]
    lfs: Lfs


class Deleted(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    deleted: Text
    revisions: Annotated[int, Field(ge=0)]


TREE = TypeAdapter(Annotated[list[TreeEntry], Field(max_length=1000)])
SEARCH = TypeAdapter(Annotated[list[Summary], Field(max_length=100_000)])


# -- pull -----------------------------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[str, str]:
    """``[hub:]owner/name[@rev]`` -> ``("owner/name", rev or "latest")``; both checked (they name cache paths)."""
    name, at, rev = ref.removeprefix("hub:").partition("@")
    _checked(check_name, name)
    rev = rev if at else "latest"
    _checked(check_ref, rev)
    return name, rev


def _checked(check: Callable[[str], None], value: str) -> None:
    try:
        check(value)
    except HubError as e:
        raise AdapterError(shown(e.reason)) from None


def cache_root() -> Path:
    return cache_dir() / "hub"


def _place(hub: str, name: str) -> Path:
    """The cache folder of ``name`` on ``hub``: host and port as one plain folder name."""
    scheme, host, port = origin(hub)
    folder = f"{host}_{port}" if port else host
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,252}", folder):  # an IPv6 literal, or a hostile URL
        folder = "h-" + hashlib.sha256(hub.encode()).hexdigest()[:16]
    return cache_root() / folder / name


def card(ref: str, hub: str | None = None, token: str | None = None, *, same_origin: bool = False) -> dict[str, Any]:
    """The card of ``ref`` from the hub; from the cache when the hub is unreachable and it was pulled before.
    ``same_origin``: refuse a redirect away from the hub's origin (see :func:`pull`)."""
    hub, (name, rev) = hub_url(hub), parse_ref(ref)
    place = _place(hub, name)
    try:
        url = f"{hub}/api/adapters/{name}?rev={urllib.parse.quote(rev)}"
        meta = call("GET", url, token, Answer, same_origin=same_origin)
    except HubUnreachable:
        cached = _cached_revision(place, rev)
        if cached is None:
            raise
        meta = _cached_card(place / cached)
    if _is_revision(rev) and not meta.revision.startswith(rev):
        raise AdapterError(f"asked the hub for revision {rev}, it answered with {meta.revision}: refused")
    return meta.model_dump(mode="json")


def _is_revision(rev: str) -> bool:
    """A hex string names a revision (tags cannot be hex strings)."""
    return REVISION_PREFIX.fullmatch(rev) is not None


def _cached_card(folder: Path) -> Answer:
    return Answer.model_validate_json((folder / ".card.json").read_bytes())


def _cached_revision(place: Path, rev: str) -> str | None:
    """The revision id that ``rev`` named when it was last pulled (a tag), or the one it prefixes."""
    ref = place / "refs" / rev
    if ref.is_file() and REVISION.fullmatch(found := ref.read_text().strip()):
        return found
    if not _is_revision(rev) or not place.is_dir():
        return None
    matches = [p.name for p in place.iterdir() if p.name.startswith(rev) and (p / ".card.json").is_file()]
    return matches[0] if len(matches) == 1 else None


def pull(
    ref: str,
    hub: str | None = None,
    token: str | None = None,
    model=None,
    *,
    max_bytes: int | None = None,
    same_origin: bool = False,
) -> Path:
    """Download ``ref`` into the cache, verified, and return its folder; ``model``: check the base first.

    ``max_bytes``: refuse a revision whose files declare more bytes in all, before any is downloaded
    (a cached one too, by its files' sizes). ``same_origin``: follow no redirect that leaves the hub's
    scheme, host and port (by default one is followed, without the token)."""
    hub, (name, rev) = hub_url(hub), parse_ref(ref)
    meta = Answer.model_validate(card(ref, hub, token, same_origin=same_origin))
    if model is not None:
        check_base(meta.model_dump(mode="json"), model, ref)
    place = _place(hub, name)
    target = place / meta.revision  # a verified 64-hex id: no path can come out of it
    if (target / ".card.json").is_file():
        _check_size(name, meta.revision, _cached_size(target), max_bytes)
    else:
        manifest = _manifest(hub, name, meta, token, same_origin=same_origin)
        _check_size(name, meta.revision, sum(entry.size for entry in manifest.values()), max_bytes)
        blobs = [
            _blob(hub, name, meta.revision, path, entry, token, same_origin=same_origin)
            for path, entry in manifest.items()
        ]
        write_folder(target, lambda tmp: _fill(tmp, dict(zip(manifest, blobs, strict=True)), meta))
    (place / "refs").mkdir(parents=True, exist_ok=True)
    write_atomically(place / "refs" / rev, meta.revision.encode())
    return target


def _check_size(name: str, revision: str, size: int, max_bytes: int | None) -> None:
    """Refuse a revision of ``size`` bytes (its manifest's sum) above ``max_bytes``."""
    if max_bytes is not None and size > max_bytes:
        raise AdapterError(
            f"{name}@{revision[:12]}: its files take {size} bytes, over the limit of {max_bytes} bytes: "
            "refused before downloading (raise max_bytes to pull it)"
        )


def _cached_size(folder: Path) -> int:
    """The bytes of a pulled revision's files (its cached card aside): what its manifest declared."""
    files = (p for p in folder.rglob("*") if p.is_file() and p != folder / ".card.json")
    return sum(p.stat().st_size for p in files)


def _manifest(hub: str, name: str, meta: Answer, token: str | None, *, same_origin: bool = False) -> dict[str, Entry]:
    """The revision's files, checked: plain relative paths, and the revision id they and the card hash to."""
    url = f"{hub}/api/models/{name}/tree/{meta.revision}"
    tree = call("GET", url, token, TREE, same_origin=same_origin)
    try:
        check_tree([entry.path for entry in tree])
    except ValueError as e:
        raise AdapterError(f"the hub listed files of {name} that cannot all exist: {shown(str(e))}") from None
    manifest = {}
    for entry in tree:
        _checked(check_path, entry.path)  # a hub is not trusted with paths on this disk
        if entry.path in manifest or entry.lfs.size != entry.size:
            raise AdapterError(f"the hub listed {shown(entry.path)!r} of {name} twice or with two sizes: refused")
        manifest[entry.path] = Entry(sha256=entry.lfs.oid, size=entry.size)
    computed = revision_id(meta.card(), manifest)
    if computed != meta.revision:
        raise AdapterError(
            f"{name}: the hub's revision {meta.revision} does not match its card and files (they hash to "
            f"{computed}); the hub is broken or was tampered with: refused"
        )
    return manifest


def _blob(
    hub: str, name: str, revision: str, path: str, entry: Entry, token: str | None, *, same_origin: bool = False
) -> Path:
    """The cached file with ``entry``'s sha256, downloaded (streamed, hashed, cut at its size) if absent;
    read-only, since every revision holding it is a hard link to the same bytes."""
    blobs = cache_root() / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / entry.sha256
    if blob.is_file() and blob.stat().st_size == entry.size:
        return blob
    url = f"{hub}/{name}/resolve/{revision}/{urllib.parse.quote(path)}"
    digest = hashlib.sha256()
    with _open("GET", url, token=token, same_origin=same_origin) as response, atomic_file(blob) as f:

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            f.write(chunk)

        read_bounded(response, entry.size, url, sink)
        if f.tell() != entry.size or digest.hexdigest() != entry.sha256:
            raise AdapterError(f"{name}/{path}: the downloaded bytes do not match their size and sha256; pull again")
        # Read-only (for whom the umask let read): a write through one revision's link would change them all.
        os.chmod(f.fileno(), os.fstat(f.fileno()).st_mode & 0o444)
    return blob


def _fill(tmp: Path, files: dict[str, Path], meta: Answer) -> None:
    for path, blob in files.items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(blob, tmp / path)
    (tmp / ".card.json").write_text(meta.model_dump_json())


def _link_or_copy(blob: Path, dest: Path) -> None:
    """Put ``blob`` at ``dest`` without storing its bytes twice: a hard link; a copy where the disk
    cannot link (another filesystem, one without links, the link count at its maximum)."""
    try:
        os.link(blob, dest, follow_symlinks=False)
    except OSError:
        shutil.copyfile(blob, dest)


def sweep(older_than: float = 3600.0) -> int:
    """Remove the temporary files that killed downloads left in the cache's blobs; return how many.

    Only regular files named as :func:`adapterkit.files.atomic_file` names its temporary files, and only
    those unchanged for ``older_than`` seconds: a download in progress touches its file with every MiB it
    receives, so another process's is not cut. Links are never followed, other files never touched."""
    if older_than < 0:
        raise AdapterError(f"sweep(older_than={older_than}): pass a number of seconds, 0 or more")
    blobs = cache_root() / "blobs"
    if not blobs.is_dir():
        return 0
    cutoff, removed = time.time() - older_than, 0
    with os.scandir(blobs) as entries:
        for entry in entries:
            ours = is_atomic_temp(entry.name) and entry.is_file(follow_symlinks=False)
            if ours and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                removed += _unlink(Path(entry.path))
    return removed


def _unlink(path: Path) -> int:
    """1 if ``path`` was removed, 0 if it was gone already (another sweep, or its download finished)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def check_base(meta: dict[str, Any], model, ref: str) -> None:
    """Refuse, before any weight is downloaded, an adapter whose card names another base model."""
    from adapterkit.core.backbone import check_base as check

    if meta.get("fingerprint"):  # peft and AdapterHub files carry none: shapes are checked on load
        saved = {"model_type": meta.get("model_type"), "fingerprint": meta["fingerprint"]}
        check(model, {**saved, "name_or_path": meta.get("base_model")}, f"hub:{ref.removeprefix('hub:')}")


def load_adapter(
    model, path: str | os.PathLike, name: str | None = None, *, load_head: bool = True, activate: bool = False
) -> str:
    """``ak.load_adapter``: :func:`adapterkit.core.io.load_adapter`, and ``path`` may be a
    ``"hub:owner/name[@tag|revision]"`` reference: the card's base model is checked against ``model``,
    then the files are pulled (verified) into the local cache and loaded from there."""
    from adapterkit.core import io

    if isinstance(path, str) and path.startswith("hub:"):
        path = pull(path, model=model)
    return io.load_adapter(model, path, name, load_head=load_head, activate=activate)


def search(query: str = "", hub: str | None = None, token: str | None = None, **fields: str) -> list[dict]:
    """Adapters on the hub whose card matches ``query`` and every given field (method, task, base_model)."""
    params = urllib.parse.urlencode({"q": query, **{k: v for k, v in fields.items() if v}})
    found = call("GET", f"{hub_url(hub)}/api/adapters?{params}", token, SEARCH)
    return [s.model_dump(mode="json") for s in found]


def delete(name: str, hub: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Delete every revision of ``name`` (the token must be its owner's)."""
    return call("DELETE", f"{hub_url(hub)}/api/adapters/{name}", token, Deleted).model_dump()
