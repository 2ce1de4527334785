"""The hub's storage: content-addressed files on disk and a SQLite index.

Files live once under ``blobs/<sha256>``, each written to a temporary file, fsynced and renamed
before anything refers to it; a revision (its manifest of path -> sha256, its card) enters the
index in one SQLite transaction afterwards. So a killed server loses nothing it acknowledged, and
concurrent uploads of one name never leave a revision that points at a missing or partial file.
A revision's id is the sha256 of its manifest: the same files always give the same revision.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .safety import HubError, check_content, check_name, check_path, check_tag

SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    repo TEXT NOT NULL, id TEXT NOT NULL, created REAL NOT NULL, card TEXT NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (repo, id));
CREATE TABLE IF NOT EXISTS tags (repo TEXT NOT NULL, tag TEXT NOT NULL, revision TEXT NOT NULL,
    PRIMARY KEY (repo, tag));
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL);
"""


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
    def put_blob(self, data: bytes, path: str) -> str:
        """Store one file's bytes (checked for its kind by ``path``); returns its sha256."""
        if len(data) > self.limits.max_file_bytes:
            raise HubError(413, f"{path}: {len(data)} bytes is over the per-file limit of {self.limits.max_file_bytes}")
        check_content(path, data)
        digest = hashlib.sha256(data).hexdigest()
        target = self.blobs / digest
        if not target.exists():
            write_atomically(target, data)
        return digest

    def blob(self, digest: str) -> Path:
        return self.blobs / digest

    # -- revisions ------------------------------------------------------------------------------
    def commit(self, repo: str, files: dict[str, bytes], card: dict[str, Any], tags: list[str]) -> dict[str, Any]:
        """Store ``files`` as a revision of ``repo`` (``owner/name``) with ``card``; move ``tags`` and ``latest``."""
        check_name(repo)
        if not files:
            raise HubError(400, "an upload needs at least one file")
        if len(files) > self.limits.max_files:
            raise HubError(413, f"{len(files)} files is over the limit of {self.limits.max_files} per upload")
        total = sum(len(d) for d in files.values())
        if total > self.limits.max_upload_bytes:
            raise HubError(413, f"{total} bytes is over the per-upload limit of {self.limits.max_upload_bytes}")
        for tag in tags:
            check_tag(tag)
        manifest = {}
        for path, data in sorted(files.items()):
            check_path(path)
            manifest[path] = {"sha256": self.put_blob(data, path), "size": len(data)}
        revision = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        card = {**card, "files": {p: m["size"] for p, m in manifest.items()}, "revision": revision}
        with self._db(write=True) as db:
            row = db.execute("SELECT created FROM revisions WHERE repo=? AND id=?", (repo, revision)).fetchone()
            created = row[0] if row else time.time()
            card["created"] = created
            if not row:
                db.execute(
                    "INSERT INTO revisions VALUES (?, ?, ?, ?, ?)",
                    (repo, revision, created, json.dumps(card), json.dumps(manifest)),
                )
            for tag in ["latest", *tags]:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (repo, tag, revision))
        return card

    def resolve(self, repo: str, ref: str = "latest") -> str:
        """A tag, a revision id or an unambiguous prefix of one (at least 7 hex digits) -> revision id."""
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
        """``(card, manifest)`` of a revision."""
        revision = self.resolve(repo, ref)
        with self._db() as db:
            card, manifest = db.execute(
                "SELECT card, manifest FROM revisions WHERE repo=? AND id=?", (repo, revision)
            ).fetchone()
            tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE repo=? AND revision=?", (repo, revision))]
        return {**json.loads(card), "tags": sorted(tags)}, json.loads(manifest)

    def history(self, repo: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT card FROM revisions WHERE repo=? ORDER BY created", (repo,)).fetchall()
        return [json.loads(card) for (card,) in rows]

    def search(self, text: str = "", **fields: str) -> list[dict[str, Any]]:
        """The latest card of each adapter whose card matches ``text`` (anywhere) and every given field."""
        with self._db() as db:
            rows = db.execute(
                "SELECT r.repo, r.card FROM tags t JOIN revisions r ON r.repo=t.repo AND r.id=t.revision "
                "WHERE t.tag='latest' ORDER BY r.repo"
            ).fetchall()
        found = []
        for repo, raw in rows:
            card = {**json.loads(raw), "name": repo}
            if text.lower() not in json.dumps(card).lower():
                continue
            if all(value and str(card.get(key, "")).lower() == value.lower() for key, value in fields.items() if value):
                found.append(card)
        return found

    def delete(self, repo: str) -> int:
        """Remove ``repo``'s revisions and tags from the index (files shared by others stay)."""
        with self._db(write=True) as db:
            count = db.execute("DELETE FROM revisions WHERE repo=?", (repo,)).rowcount
            db.execute("DELETE FROM tags WHERE repo=?", (repo,))
        if not count:
            raise HubError(404, f"no adapter {repo!r} on this hub", code="RepoNotFound")
        return count

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


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
