"""What the hub accepts: safetensors and JSON files under plain relative paths, and beside them a model
card (``README.md``, UTF-8) and a training curve (``training.png``, a PNG), each size-capped; nothing else.

A pickle renamed ``.safetensors``, an archive, a path that escapes (``../``, absolute, NUL,
backslash) or a name outside ``owner/name`` is refused with a reason, before anything is stored.
Every pattern must match the whole string (``re.fullmatch``): ``$`` would let a final newline through.
Safetensors files are checked by the ``safetensors`` library itself, the reader every client uses.
"""

from __future__ import annotations

import re
import struct

import safetensors

from adapterkit.hub.protocol import REVISION_PREFIX, parse_json

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SUFFIXES = (".safetensors", ".json")
# Top-level files a train output carries for the hub's page (the HF Hub's model card is README.md too).
CARD_FILES = {"README.md": 256 * 2**10, "training.png": 2 * 2**20}  # name -> the most bytes taken
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_HEADER = 100_000_000  # the safetensors library's own limit on a header
# Only to explain a refusal: what a file the checks refused looks like.
MAGIC = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive", b"\x80": "a pickle", b"BZh": "a bzip2 archive"}


class HubError(Exception):
    """A refusal: an HTTP status, a reason for the user and, for the HF protocol, an error code."""

    def __init__(self, status: int, reason: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.code, self.headers = status, reason, code, headers or {}


def check_name(repo: str) -> None:
    """``owner/name``: letters, digits, ``.``, ``_``, ``-``; no ``..``."""
    if not NAME.fullmatch(repo) or ".." in repo:
        raise HubError(400, f"bad adapter name {repo!r}: use owner/name (letters, digits, '.', '_', '-')")


def check_tag(tag: str) -> None:
    """A tag names a revision; it may not look like a revision id (hex), which it would shadow."""
    if not TAG.fullmatch(tag) or all(c in "0123456789abcdef" for c in tag):
        raise HubError(400, f"bad tag {tag!r}: letters, digits, '.', '_', '-', not a hex string (revision ids are)")


def check_ref(ref: str) -> None:
    """What a reader may ask for: a tag, or a revision id or a prefix of one (7 to 64 hex digits)."""
    if not (TAG.fullmatch(ref) or REVISION_PREFIX.fullmatch(ref)):
        raise HubError(400, f"bad revision {ref!r}: a tag or a revision id (7 to 64 hex digits)")


def check_path(path: str) -> None:
    """A relative path of plain segments ending in .safetensors or .json, or a top-level README.md or training.png."""
    if "\x00" in path or "\\" in path or path.startswith("/") or not path:
        raise HubError(400, f"refused path {path!r}: absolute, NUL or backslash")
    segments = path.split("/")
    if any(s in ("", ".", "..") or not SEGMENT.fullmatch(s) for s in segments) or len(segments) > 4:
        raise HubError(400, f"refused path {path!r}: segments must be plain names (no '..', at most 4 deep)")
    if not path.endswith(SUFFIXES) and path not in CARD_FILES:
        accepted = "only .safetensors and .json files, and a top-level README.md and training.png, are accepted"
        raise HubError(415, f"refused {path!r}: {accepted}")


def check_content(path: str, data: bytes) -> None:
    """The bytes are what the name says: a safetensors file ``safetensors`` reads, UTF-8 JSON, a UTF-8
    model card or a PNG image, within its cap."""
    try:
        if path in CARD_FILES:
            check_card_file(path, data)
        elif path.endswith(".json"):
            parse_json(data, "the file")
        else:
            check_safetensors(data)
    except ValueError as e:
        raise HubError(415, f"refused {path!r}: {e}{_looks_like(data)}") from None


def check_safetensors(data: bytes) -> None:
    """Raise ValueError unless ``safetensors`` reads ``data`` (offsets, dtypes, shapes, header)."""
    if len(data) < 8:
        raise ValueError("not a safetensors file (under 8 bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):  # before the library allocates anything for it
        raise ValueError(f"not a safetensors file (header length {size} out of range)")
    try:
        safetensors.deserialize(data)
    except Exception as e:  # noqa: BLE001 (SafetensorError, and whatever else the reader refuses with)
        raise ValueError(f"not a valid safetensors file ({str(e)[:300]})") from None


def check_card_file(path: str, data: bytes) -> None:
    """Raise ValueError unless ``data`` fits its cap and is UTF-8 text (``README.md``) or a PNG (``training.png``).

    The PNG is checked by its signature and first chunk only: browsers decode it in a sandboxed process,
    and the hub serves it as ``image/png`` with ``nosniff``, so it is never read as anything else."""
    if len(data) > CARD_FILES[path]:
        raise ValueError(f"{len(data)} bytes is over the {CARD_FILES[path] // 2**10} KiB limit of {path}")
    if path == "training.png":
        if not (data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"):
            raise ValueError("not a PNG image (its first bytes are not a PNG signature and header)")
        return
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _looks_like(data: bytes) -> str:
    kinds = [kind for magic, kind in MAGIC.items() if data.startswith(magic)]
    return f"; it looks like {kinds[0]}" if kinds else ""
