"""What the hub accepts: safetensors and JSON files under plain relative paths, nothing else.

A pickle renamed ``.safetensors``, an archive, a path that escapes (``../``, absolute, NUL,
backslash) or a name outside ``owner/name`` is refused with a reason, before anything is stored.
"""

from __future__ import annotations

import json
import re
import struct

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
SUFFIXES = (".safetensors", ".json")
MAGIC = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive", b"\x80": "a pickle", b"BZh": "a bzip2 archive"}


class HubError(Exception):
    """A refusal: an HTTP status, a reason for the user and, for the HF protocol, an error code."""

    def __init__(self, status: int, reason: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.code, self.headers = status, reason, code, headers or {}


def check_name(repo: str) -> None:
    if not NAME.match(repo) or ".." in repo:
        raise HubError(400, f"bad adapter name {repo!r}: use owner/name (letters, digits, '.', '_', '-')")


def check_tag(tag: str) -> None:
    if not TAG.match(tag) or all(c in "0123456789abcdef" for c in tag):
        raise HubError(400, f"bad tag {tag!r}: letters, digits, '.', '_', '-', not a hex string (revision ids are)")


def check_path(path: str) -> None:
    """A relative path of plain segments ending in .safetensors or .json."""
    if "\x00" in path or "\\" in path or path.startswith("/") or not path:
        raise HubError(400, f"refused path {path!r}: absolute, NUL or backslash")
    segments = path.split("/")
    if any(s in ("", ".", "..") or not SEGMENT.match(s) for s in segments) or len(segments) > 4:
        raise HubError(400, f"refused path {path!r}: segments must be plain names (no '..', at most 4 deep)")
    if not path.endswith(SUFFIXES):
        raise HubError(415, f"refused {path!r}: only .safetensors and .json files are accepted")


def check_content(path: str, data: bytes) -> None:
    """The bytes are what the name says: a well-formed safetensors file, or UTF-8 JSON."""
    for magic, kind in MAGIC.items():
        if data.startswith(magic):
            raise HubError(415, f"refused {path!r}: it is {kind}; only safetensors and JSON are accepted")
    if path.endswith(".json"):
        try:
            json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HubError(415, f"refused {path!r}: not valid UTF-8 JSON ({e})") from e
        return
    _check_safetensors(path, data)


def _check_safetensors(path: str, data: bytes) -> None:
    """Header length, JSON header, every tensor's offsets inside the file and contiguous to its end."""
    bad = f"refused {path!r}: not a valid safetensors file"
    if len(data) < 8:
        raise HubError(415, f"{bad} (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or size > 100 * 2**20:
        raise HubError(415, f"{bad} (header length {size} out of range)")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HubError(415, f"{bad} (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise HubError(415, f"{bad} (header is not an object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise HubError(415, f"{bad} (tensor {key!r} has no data_offsets)") from e
        if not 0 <= start <= stop <= len(data) - 8 - size:
            raise HubError(415, f"{bad} (tensor {key!r} lies outside the file)")
        end = max(end, stop)
    if end != len(data) - 8 - size:
        raise HubError(415, f"{bad} ({len(data) - 8 - size - end} trailing bytes)")
