"""The client's content-addressed cache of pulled adapters.

Files are stored once under ``$ADAPTERKIT_CACHE/hub/blobs/<sha256>`` (read-only) and hard-linked into
``hub/<host>/<owner>/<name>/<revision>/`` (copied only where the disk cannot link); tags and cards are
cached too, so an adapter pulled once loads offline. A download streams to a temporary file, hashed on
the way and cut at its declared size; :func:`sweep` removes what a killed download left. Nothing is
written or removed outside the cache, whatever a hub answers.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

from adapterkit.errors import AdapterError
from adapterkit.files import atomic_file, cache_dir, is_atomic_temp
from adapterkit.hub.client.answers import Answer
from adapterkit.hub.client.transport import open_url, origin, read_bounded
from adapterkit.hub.protocol import REVISION, REVISION_PREFIX, Entry


def cache_root() -> Path:
    """The cache's folder (``$ADAPTERKIT_CACHE/hub``)."""
    return cache_dir() / "hub"


def place(hub: str, name: str) -> Path:
    """The cache folder of ``name`` on ``hub``: host and port as one plain folder name."""
    scheme, host, port = origin(hub)
    folder = f"{host}_{port}" if port else host
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,252}", folder):  # an IPv6 literal, or a hostile URL
        folder = "h-" + hashlib.sha256(hub.encode()).hexdigest()[:16]
    return cache_root() / folder / name


def is_revision(rev: str) -> bool:
    """A hex string names a revision (tags cannot be hex strings)."""
    return REVISION_PREFIX.fullmatch(rev) is not None


def cached_card(folder: Path) -> Answer:
    """The card a pulled revision was verified against."""
    return Answer.model_validate_json((folder / ".card.json").read_bytes())


def cached_revision(folder: Path, rev: str) -> str | None:
    """The revision id that ``rev`` named when it was last pulled (a tag), or the one it prefixes."""
    ref = folder / "refs" / rev
    if ref.is_file() and REVISION.fullmatch(found := ref.read_text().strip()):
        return found
    if not is_revision(rev) or not folder.is_dir():
        return None
    matches = [p.name for p in folder.iterdir() if p.name.startswith(rev) and (p / ".card.json").is_file()]
    return matches[0] if len(matches) == 1 else None


def cached_size(folder: Path) -> int:
    """The bytes of a pulled revision's files (its cached card aside): what its manifest declared."""
    files = (p for p in folder.rglob("*") if p.is_file() and p != folder / ".card.json")
    return sum(p.stat().st_size for p in files)


def fetched(
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
    with open_url("GET", url, token=token, same_origin=same_origin) as response, atomic_file(blob) as f:

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            f.write(chunk)

        read_bounded(response, entry.size, url, sink)
        if f.tell() != entry.size or digest.hexdigest() != entry.sha256:
            raise AdapterError(f"{name}/{path}: the downloaded bytes do not match their size and sha256; pull again")
        # Read-only (for whom the umask let read): a write through one revision's link would change them all.
        os.chmod(f.fileno(), os.fstat(f.fileno()).st_mode & 0o444)
    return blob


def fill(tmp: Path, files: dict[str, Path], meta: Answer) -> None:
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
