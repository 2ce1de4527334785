"""The hub client's operations: push, card, pull (verified, into the cache), search, delete, and loading
a ``hub:`` reference into a model.

A hub is not trusted: every answer is checked against a schema (:mod:`.answers`), a revision's id is
recomputed from its card and manifest (so a pinned revision means the same bytes whatever the hub
sends), and every file is verified on its way into the cache (:mod:`.cache`). ``max_bytes`` refuses a
revision by its declared size before any file is downloaded.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError, shown
from adapterkit.files import write_atomically, write_folder
from adapterkit.hub.client.answers import SEARCH, TREE, Answer, Deleted
from adapterkit.hub.client.cache import (
    cached_card,
    cached_revision,
    cached_size,
    fetched,
    fill,
    is_revision,
    place,
)
from adapterkit.hub.client.refs import checked, is_ref, parse_ref
from adapterkit.hub.client.transport import HubUnreachable, call, hub_url
from adapterkit.hub.protocol import Entry, Stored, check_tree, revision_id
from adapterkit.hub.safety import CARD_FILES, check_path
from adapterkit.runs import adapter_folder, is_run

SHARED = (".safetensors", ".json")


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


def card(ref: str, hub: str | None = None, token: str | None = None, *, same_origin: bool = False) -> dict[str, Any]:
    """The card of ``ref`` from the hub; from the cache when the hub is unreachable and it was pulled before.
    ``same_origin``: refuse a redirect away from the hub's origin (see :func:`pull`)."""
    hub, (name, rev) = hub_url(hub), parse_ref(ref)
    folder = place(hub, name)
    try:
        url = f"{hub}/api/adapters/{name}?rev={urllib.parse.quote(rev)}"
        meta = call("GET", url, token, Answer, same_origin=same_origin)
    except HubUnreachable:
        cached = cached_revision(folder, rev)
        if cached is None:
            raise
        meta = cached_card(folder / cached)
    if is_revision(rev) and not meta.revision.startswith(rev):
        raise AdapterError(f"asked the hub for revision {rev}, it answered with {meta.revision}: refused")
    return meta.model_dump(mode="json")


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
    folder = place(hub, name)
    target = folder / meta.revision  # a verified 64-hex id: no path can come out of it
    if (target / ".card.json").is_file():
        _check_size(name, meta.revision, cached_size(target), max_bytes)
    else:
        manifest = _manifest(hub, name, meta, token, same_origin=same_origin)
        _check_size(name, meta.revision, sum(entry.size for entry in manifest.values()), max_bytes)
        blobs = [
            fetched(hub, name, meta.revision, path, entry, token, same_origin=same_origin)
            for path, entry in manifest.items()
        ]
        write_folder(target, lambda tmp: fill(tmp, dict(zip(manifest, blobs, strict=True)), meta))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "refs" / rev, meta.revision.encode())
    return target


def _check_size(name: str, revision: str, size: int, max_bytes: int | None) -> None:
    """Refuse a revision of ``size`` bytes (its manifest's sum) above ``max_bytes``."""
    if max_bytes is not None and size > max_bytes:
        raise AdapterError(
            f"{name}@{revision[:12]}: its files take {size} bytes, over the limit of {max_bytes} bytes: "
            "refused before downloading (raise max_bytes to pull it)"
        )


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
        checked(check_path, entry.path)  # a hub is not trusted with paths on this disk
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

    return io.load_adapter(model, resolve(path, model=model), name, load_head=load_head, activate=activate)


def search(query: str = "", hub: str | None = None, token: str | None = None, **fields: str) -> list[dict]:
    """Adapters on the hub whose card matches ``query`` and every given field (method, task, base_model)."""
    params = urllib.parse.urlencode({"q": query, **{k: v for k, v in fields.items() if v}})
    found = call("GET", f"{hub_url(hub)}/api/adapters?{params}", token, SEARCH)
    return [s.model_dump(mode="json") for s in found]


def delete(name: str, hub: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Delete every revision of ``name`` (the token must be its owner's)."""
    return call("DELETE", f"{hub_url(hub)}/api/adapters/{name}", token, Deleted).model_dump()


def resolve(
    source: str | os.PathLike,
    hub: str | None = None,
    *,
    model=None,
    max_bytes: int | None = None,
    same_origin: bool = False,
) -> Path:
    """The one place a ``hub:owner/name[@rev]`` reference becomes a folder (pulled, verified, see :func:`pull`);
    any other ``source`` is a local adapter folder or an ``adapterkit train`` output."""
    if is_ref(source):
        return pull(str(source), hub, model=model, max_bytes=max_bytes, same_origin=same_origin)
    return adapter_folder(source)
