"""The hub client: push, pull (into a content-addressed cache), search, and ``hub:`` references.

``hub:owner/name[@tag|revision]`` resolves against ``$ADAPTERKIT_HUB`` (default
``http://127.0.0.1:8765``). Pulled files are stored once under
``$ADAPTERKIT_CACHE/hub/blobs/<sha256>`` (verified on arrival) and linked into
``hub/<host>/<owner>/<name>/<revision>/``; the tag -> revision map and the card are cached too, so
an adapter pulled once loads offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from ..files import write_atomically
from ..training.report import adapter_folder, is_run
from .safety import TAG, HubError, check_name, check_path

DEFAULT_HUB = "http://127.0.0.1:8765"
REVISION = re.compile(r"^[0-9a-f]{64}$")
REVISION_PREFIX = re.compile(r"^[0-9a-f]{7,64}$")
SHARED = (".safetensors", ".json")


def hub_url(url: str | None = None) -> str:
    return (url or os.environ.get("ADAPTERKIT_HUB") or DEFAULT_HUB).rstrip("/")


def _token(token: str | None) -> str | None:
    return token or os.environ.get("ADAPTERKIT_HUB_TOKEN")


def request(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 60) -> bytes:
    """One HTTP call; a refusal becomes an AdapterError carrying the hub's reason."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if _token(token):
        req.add_header("Authorization", f"Bearer {_token(token)}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = e.reason
        raise HubRequestError(e.code, f"hub {url}: {e.code} {reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise HubUnreachable(f"cannot reach the hub at {url}: {getattr(e, 'reason', e)}") from None


class HubRequestError(AdapterError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubUnreachable(AdapterError):
    pass


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
    """Upload an adapter folder (or an ``adapterkit train`` output) as a new revision of ``name``."""
    folder = adapter_folder(folder)  # a train output's metrics ride along in the card
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    skipped = [p for p in files if not p.endswith(SHARED)]
    files = {p: f for p, f in files.items() if p.endswith(SHARED)}
    for file in files.values():
        if file.is_symlink():
            raise AdapterError(f"{file} is a symbolic link; the hub takes plain files only")
    payload = {
        "files": {p: base64.b64encode(f.read_bytes()).decode() for p, f in files.items()},
        "card": make_card(folder, license=license, task=task),
        "tags": list(tags or []),
    }
    card = json.loads(request("POST", f"{hub_url(hub)}/api/adapters/{name}", payload, token))
    return {**card, "skipped": skipped}


def make_card(folder: Path, license: str = "unknown", task: str | None = None) -> dict[str, Any]:
    """Base model (name, type, fingerprint), method, params, and the train run's task and metrics if any."""
    from ..io import inspect_adapter

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


# -- pull -----------------------------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[str, str]:
    """``[hub:]owner/name[@rev]`` -> ``("owner/name", rev or "latest")``; both checked (they name cache paths)."""
    name, _, rev = ref.removeprefix("hub:").partition("@")
    _checked(check_name, name)
    rev = rev or "latest"
    if not (TAG.match(rev) or REVISION_PREFIX.match(rev)):
        raise AdapterError(f"bad revision {rev!r} in {ref!r}: a tag or a hex revision id")
    return name, rev


def _checked(check, value: str) -> None:
    try:
        check(value)
    except HubError as e:
        raise AdapterError(e.reason) from None


def cache_root() -> Path:
    from ..data import cache_dir

    return cache_dir() / "hub"


def _place(hub: str, name: str) -> Path:
    host = urllib.parse.urlsplit(hub).netloc.replace(":", "_")
    return cache_root() / host / name


def card(ref: str, hub: str | None = None, token: str | None = None) -> dict[str, Any]:
    """The card of ``ref`` from the hub; from the cache when the hub is unreachable and it was pulled before."""
    hub, (name, rev) = hub_url(hub), parse_ref(ref)
    place = _place(hub, name)
    try:
        got = json.loads(request("GET", f"{hub}/api/adapters/{name}?rev={urllib.parse.quote(rev)}", token=token))
    except HubUnreachable:
        cached = _cached_revision(place, rev)
        if cached is None:
            raise
        return json.loads((place / cached / ".card.json").read_text())
    return got


def _cached_revision(place: Path, rev: str) -> str | None:
    ref = place / "refs" / rev
    if ref.is_file():
        return ref.read_text().strip()
    matches = [p.name for p in place.glob(f"{rev}*") if (p / ".card.json").is_file()] if len(rev) >= 7 else []
    return matches[0] if len(matches) == 1 else None


def pull(ref: str, hub: str | None = None, token: str | None = None, model=None) -> Path:
    """Download ``ref`` into the cache and return its folder; ``model``: check the base first."""
    hub, (name, rev) = hub_url(hub), parse_ref(ref)
    meta = card(ref, hub, token)
    if model is not None:
        check_base(meta, model, ref)
    place = _place(hub, name)
    target = place / meta["revision"]
    if not (target / ".card.json").is_file():
        _download(hub, name, meta, target, token)
    (place / "refs").mkdir(parents=True, exist_ok=True)
    write_atomically(place / "refs" / rev, meta["revision"].encode())
    return target


def _download(hub: str, name: str, meta: dict[str, Any], target: Path, token: str | None) -> None:
    blobs = cache_root() / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=target.parent))
    try:
        manifest = json.loads(request("GET", f"{hub}/api/models/{name}/tree/{meta['revision']}", token=token))
        for entry in manifest:
            digest, path = entry["lfs"]["oid"], entry["path"]
            _checked(check_path, path)  # a hub is not trusted with paths on this disk
            if not REVISION.match(digest):
                raise AdapterError(f"{name}/{path}: the hub sent a malformed sha256 {digest!r}")
            blob = blobs / digest
            if not blob.is_file():
                data = request(
                    "GET", f"{hub}/{name}/resolve/{meta['revision']}/{urllib.parse.quote(path)}", token=token
                )
                if hashlib.sha256(data).hexdigest() != digest:
                    raise AdapterError(f"{name}/{path}: the downloaded bytes do not match their sha256; pull again")
                write_atomically(blob, data)
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(blob, tmp / path)
        (tmp / ".card.json").write_text(json.dumps(meta))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_base(meta: dict[str, Any], model, ref: str) -> None:
    """Refuse, before any weight is downloaded, an adapter whose card names another base model."""
    from ..io import _check_base

    if meta.get("fingerprint"):  # peft and AdapterHub files carry none: shapes are checked on load
        saved = {"model_type": meta.get("model_type"), "fingerprint": meta["fingerprint"]}
        _check_base(model, {**saved, "name_or_path": meta.get("base_model")}, Path(f"hub:{ref.removeprefix('hub:')}"))


def search(query: str = "", hub: str | None = None, token: str | None = None, **fields: str) -> list[dict]:
    params = urllib.parse.urlencode({"q": query, **{k: v for k, v in fields.items() if v}})
    return json.loads(request("GET", f"{hub_url(hub)}/api/adapters?{params}", token=token))


def delete(name: str, hub: str | None = None, token: str | None = None) -> dict[str, Any]:
    return json.loads(request("DELETE", f"{hub_url(hub)}/api/adapters/{name}", token=token))
