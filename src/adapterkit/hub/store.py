"""The hub's storage: content-addressed files on disk and a SQLite index.

Files live once under ``blobs/<sha256>``, each written to a temporary file, fsynced and renamed
before anything refers to it; a revision (its manifest of path -> sha256, its card) enters the
index in one SQLite transaction afterwards. So a killed server loses nothing it acknowledged, and
concurrent uploads of one name never leave a revision that points at a missing or partial file.
A revision's id is :func:`adapterkit.hub.protocol.revision_id` of its card and manifest: the same
files and card always give the same revision, another card gives another one.

Every file of an upload is checked before any is written, so a refused upload leaves nothing. Blobs
no revision refers to are collected (:meth:`Store.collect`) after a delete: the ``files`` table says
which blobs revisions use, and a push registers its blobs in ``pending`` (in a write transaction)
before writing them, so a collection, which holds the write lock while it unlinks, never removes a
blob a push is about to use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from adapterkit.files import write_atomically
from adapterkit.hub.protocol import Card, Entry, check_tree, revision_id
from adapterkit.hub.safety import HubError, check_content, check_name, check_path, check_ref, check_tag

SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    repo TEXT NOT NULL, id TEXT NOT NULL, created REAL NOT NULL, card TEXT NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (repo, id));
CREATE TABLE IF NOT EXISTS tags (repo TEXT NOT NULL, tag TEXT NOT NULL, revision TEXT NOT NULL,
    PRIMARY KEY (repo, tag));
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending (push TEXT NOT NULL, digest TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (push, digest));
CREATE INDEX IF NOT EXISTS pending_digest ON pending (digest);
"""
# Version 1 adds the blob references; an index written before it gets them from its manifests.
FILES = """
CREATE TABLE files (repo TEXT NOT NULL, revision TEXT NOT NULL, path TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repo, revision, path));
CREATE INDEX files_digest ON files (digest);
INSERT INTO files SELECT r.repo, r.id, m.key, json_extract(m.value, '$.sha256')
    FROM revisions r, json_each(r.manifest) m;
PRAGMA user_version = 1;
"""
# Sort keys of search results; an index row may hold anything (an older hub's, or one written by hand).
SORTS = {
    "name": lambda card: card["name"],
    "newest": lambda card: -_number(card.get("created")),
    "params": lambda card: -_number(card.get("params")),
}
ABANDONED = 3600.0  # seconds after which a push's pending blobs, or a stray temporary file, are garbage


@dataclasses.dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 256 * 2**20
    max_upload_bytes: int = 1024 * 2**20
    max_files: int = 64


class Store:
    """The hub's data under ``root``: ``blobs/``, ``index.sqlite``."""

    def __init__(self, root: str | os.PathLike, limits: Limits = Limits()) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self._local = threading.local()
        self._connection().executescript(SCHEMA)
        with self._db(write=True) as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < 1:
                for statement in FILES.split(";\n"):
                    db.execute(statement)

    def _connection(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it is acknowledged
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Each ``with`` block is one transaction; writers take the lock up front (they queue, never
        fail half-way), readers see one consistent snapshot and never wait for a writer (WAL)."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- files ----------------------------------------------------------------------------------
    def blob(self, digest: str) -> Path:
        return self.blobs / digest

    def _checked(self, files: dict[str, bytes], tags: list[str]) -> dict[str, Entry]:
        """Every refusal an upload can meet, before anything is written; returns its manifest."""
        if not files:
            raise HubError(400, "an upload needs at least one file")
        if len(files) > self.limits.max_files:
            raise HubError(413, f"{len(files)} files is over the limit of {self.limits.max_files} per upload")
        total = sum(len(d) for d in files.values())
        if total > self.limits.max_upload_bytes:
            raise HubError(413, f"{total} bytes is over the per-upload limit of {self.limits.max_upload_bytes}")
        for tag in tags:
            check_tag(tag)
        try:
            check_tree(list(files))
        except ValueError as e:
            raise HubError(400, f"refused upload: {e}") from None
        for path, data in sorted(files.items()):
            check_path(path)
            if len(data) > self.limits.max_file_bytes:
                limit = self.limits.max_file_bytes
                raise HubError(413, f"{path}: {len(data)} bytes is over the per-file limit of {limit}")
            check_content(path, data)
        return {p: Entry(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for p, d in sorted(files.items())}

    # -- revisions ------------------------------------------------------------------------------
    def commit(self, repo: str, files: dict[str, bytes], card: Card, tags: list[str]) -> dict[str, Any]:
        """Store ``files`` as a revision of ``repo`` (``owner/name``) with ``card``; move ``tags`` and ``latest``.

        Returns the revision's card as :meth:`revision` serves it."""
        check_name(repo)
        manifest = self._checked(files, tags)
        push = secrets.token_hex(16)
        digests = {e.sha256 for e in manifest.values()}
        with self._db(write=True) as db:  # registered before written: a collection leaves them alone
            db.executemany("INSERT INTO pending VALUES (?, ?, ?)", [(push, d, time.time()) for d in digests])
        try:
            for path, entry in manifest.items():
                if not self.blob(entry.sha256).exists():
                    write_atomically(self.blob(entry.sha256), files[path])
            revision, created, tags = self._insert(repo, push, card, manifest, tags)
        except BaseException:
            self._forget(push)
            self.collect(digests)
            raise
        return served(card.model_dump(mode="json"), revision, created, {p: e.size for p, e in manifest.items()}, tags)

    def _insert(
        self, repo: str, push: str, card: Card, manifest: dict[str, Entry], tags: list[str]
    ) -> tuple[str, float, list[str]]:
        """The revision enters the index, its blobs change from pending to referenced, tags move.

        Returns its id, creation time and tags (read in the same transaction: a delete may follow)."""
        revision = revision_id(card, manifest)
        with self._db(write=True) as db:
            registered = db.execute("SELECT COUNT(*) FROM pending WHERE push=?", (push,)).fetchone()[0]
            if registered != len({e.sha256 for e in manifest.values()}):  # over an hour: may have been collected
                raise HubError(503, "the upload took too long and its files were reclaimed: push again")
            created = _added(db, repo, revision, card, manifest)
            db.execute("DELETE FROM pending WHERE push=?", (push,))
            moved = [(repo, tag, revision) for tag in ["latest", *tags]]
            db.executemany("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", moved)
            tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE repo=? AND revision=?", (repo, revision))]
        return revision, created, tags

    def _forget(self, push: str) -> None:
        with self._db(write=True) as db:
            db.execute("DELETE FROM pending WHERE push=?", (push,))

    def resolve(self, repo: str, ref: str = "latest") -> str:
        """A tag, a revision id or an unambiguous prefix of one (at least 7 hex digits) -> revision id."""
        check_name(repo)
        check_ref(ref)
        with self._db() as db:
            row = db.execute("SELECT revision FROM tags WHERE repo=? AND tag=?", (repo, ref)).fetchone()
            if row:
                return row[0]
            if len(ref) >= 7 and all(c in "0123456789abcdef" for c in ref):
                ids = db.execute("SELECT id FROM revisions WHERE repo=? AND id LIKE ?", (repo, ref + "%")).fetchall()
                if len(ids) == 1:
                    return ids[0][0]
            exists = db.execute("SELECT 1 FROM revisions WHERE repo=? LIMIT 1", (repo,)).fetchone()
        if not exists:
            raise HubError(404, f"no adapter {repo!r} on this hub", code="RepoNotFound")
        raise HubError(404, f"{repo} has no tag or revision {ref!r}", code="RevisionNotFound")

    def revision(self, repo: str, ref: str = "latest") -> tuple[dict[str, Any], dict[str, dict]]:
        """``(card, manifest)`` of a revision: the uploader's card with the hub's ``revision``, ``created``,
        ``files`` and ``tags``, taken from the index's own columns (the card text is not trusted for them)."""
        revision = self.resolve(repo, ref)
        with self._db() as db:
            row = db.execute(
                "SELECT created, card, manifest FROM revisions WHERE repo=? AND id=?", (repo, revision)
            ).fetchone()
            tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE repo=? AND revision=?", (repo, revision))]
        if row is None:  # deleted between the two transactions
            raise HubError(404, f"no adapter {repo!r} on this hub", code="RepoNotFound")
        created, card, manifest = row
        manifest = json.loads(manifest)
        return served(_card(card), revision, created, {p: m["size"] for p, m in manifest.items()}, tags), manifest

    def history(self, repo: str) -> list[str]:
        """The revision ids of ``repo``, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT id FROM revisions WHERE repo=? ORDER BY created, rowid", (repo,)).fetchall()
        return [revision for (revision,) in rows]

    def revisions(self, repo: str) -> list[dict[str, Any]]:
        """``repo``'s revisions, newest first: id, ``created``, ``tags``, ``files`` (path -> size) and what
        changed since the revision before it (``added``, ``removed``, ``changed`` paths)."""
        check_name(repo)
        with self._db() as db:
            rows = db.execute(
                "SELECT id, created, manifest FROM revisions WHERE repo=? ORDER BY created, rowid", (repo,)
            ).fetchall()
            tags = db.execute("SELECT revision, tag FROM tags WHERE repo=? ORDER BY tag", (repo,)).fetchall()
        out, before = [], {}
        for revision, created, raw in rows:
            manifest = _manifest(raw)
            named = [tag for rev, tag in tags if rev == revision]
            out.append({"revision": revision, "created": created, "tags": named, **_changes(before, manifest)})
            out[-1]["files"], before = {p: m.get("size") for p, m in manifest.items()}, manifest
        return out[::-1]

    def search(
        self, text: str = "", *, sort: str = "name", offset: int = 0, limit: int | None = None, **fields: str
    ) -> list[dict[str, Any]]:
        """The latest card of each adapter whose card matches ``text`` (anywhere) and every given field,
        ordered by ``sort`` (``name``, ``newest`` or ``params``, most first), from ``offset``, at most ``limit``."""
        if sort not in SORTS:
            raise HubError(400, f"bad sort {sort!r}: choose one of {', '.join(SORTS)}")
        with self._db() as db:
            rows = db.execute(
                "SELECT r.repo, r.id, r.created, r.card FROM tags t JOIN revisions r ON r.repo=t.repo AND "
                "r.id=t.revision WHERE t.tag='latest' ORDER BY r.repo"
            ).fetchall()
        found = []
        for repo, revision, created, raw in rows:
            card = {**_card(raw), "name": repo, "revision": revision, "created": created}
            if text.lower() not in json.dumps(card, ensure_ascii=False).lower():
                continue
            if all(str(card.get(key, "")).lower() == value.lower() for key, value in fields.items() if value):
                found.append(card)
        found.sort(key=SORTS[sort])  # stable: ties stay in name order
        return found[max(offset, 0) :][:limit]

    def delete(self, repo: str) -> int:
        """Remove ``repo``'s revisions and tags, then the files no other revision uses."""
        check_name(repo)
        with self._db(write=True) as db:
            digests = [d for (d,) in db.execute("SELECT DISTINCT digest FROM files WHERE repo=?", (repo,))]
            count = db.execute("DELETE FROM revisions WHERE repo=?", (repo,)).rowcount
            db.execute("DELETE FROM tags WHERE repo=?", (repo,))
            db.execute("DELETE FROM files WHERE repo=?", (repo,))
        if not count:
            raise HubError(404, f"no adapter {repo!r} on this hub", code="RepoNotFound")
        self.collect(digests)
        return count

    def collect(self, digests: Iterable[str] | None = None) -> list[str]:
        """Remove the blobs among ``digests`` (default: all, and stray temporary files over an hour old)
        that no revision uses and no push in progress has registered; returns the digests removed.

        Under the write lock: a push registers its blobs in a write transaction, so it either did so
        before (and its blobs stay) or writes them after this returns."""
        removed = []
        with self._db(write=True) as db:
            db.execute("DELETE FROM pending WHERE since < ?", (time.time() - ABANDONED,))
            for digest in self._candidates(digests):
                used = "SELECT 1 FROM files WHERE digest=:d UNION ALL SELECT 1 FROM pending WHERE digest=:d LIMIT 1"
                if db.execute(used, {"d": digest}).fetchone() is None:
                    with contextlib.suppress(FileNotFoundError):
                        self.blob(digest).unlink()
                        removed.append(digest)
        return removed

    def _candidates(self, digests: Iterable[str] | None) -> Iterable[str]:
        if digests is not None:
            return sorted(set(digests))
        for stray in self.blobs.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if stray.stat().st_mtime < time.time() - ABANDONED:
                    stray.unlink()
        return sorted(p.name for p in self.blobs.iterdir() if not p.name.startswith("."))

    # -- tokens ---------------------------------------------------------------------------------
    def create_token(self, owner: str) -> str:
        """A new upload token for ``owner``; only its sha256 is stored."""
        check_name(f"{owner}/x")
        token = "akh_" + secrets.token_urlsafe(32)
        with self._db(write=True) as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?)", (_token_hash(token), owner, time.time()))
        return token

    def owner_of(self, token: str | None) -> str | None:
        if not token:
            return None
        with self._db() as db:
            row = db.execute("SELECT owner FROM tokens WHERE hash=?", (_token_hash(token),)).fetchone()
        return row[0] if row else None


def _added(db: sqlite3.Connection, repo: str, revision: str, card: Card, manifest: dict[str, Entry]) -> float:
    """The revision's creation time, adding it (with the blobs it uses) unless it is there already."""
    row = db.execute("SELECT created FROM revisions WHERE repo=? AND id=?", (repo, revision)).fetchone()
    if row:
        return row[0]
    created, body = time.time(), json.dumps({p: e.model_dump() for p, e in manifest.items()})
    db.execute("INSERT INTO revisions VALUES (?, ?, ?, ?, ?)", (repo, revision, created, card.model_dump_json(), body))
    db.executemany(
        "INSERT INTO files VALUES (?, ?, ?, ?)", [(repo, revision, p, e.sha256) for p, e in manifest.items()]
    )
    return created


def served(card: dict[str, Any], revision: str, created: Any, files: dict[str, int], tags: list[str]) -> dict[str, Any]:
    """A revision's card as the hub serves it (:class:`adapterkit.hub.protocol.Stored`): the uploader's
    fields, then the hub's, which override whatever a stored card says of them."""
    return {**card, "revision": revision, "created": created, "files": files, "tags": sorted(tags)}


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _card(raw: Any) -> dict[str, Any]:
    """A stored card as a dict, whatever the index holds (rows written by older hubs, or by hand)."""
    try:
        card = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return {}
    return card if isinstance(card, dict) else {}


def _number(value: Any) -> float:
    """A card's number for sorting; anything else sorts last."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    return float(value) if ok else float("-inf")


def _manifest(raw: Any) -> dict[str, dict]:
    """A stored manifest (path -> sha256, size) as a dict of dicts, whatever the index holds."""
    manifest = _card(raw)
    return {p: m for p, m in manifest.items() if isinstance(m, dict)}


def _changes(before: dict[str, dict], after: dict[str, dict]) -> dict[str, list[str]]:
    """The paths a revision added, removed and changed (another sha256) relative to the one before it."""
    return {
        "added": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "changed": sorted(p for p in after.keys() & before.keys() if after[p].get("sha256") != before[p].get("sha256")),
    }
