"""The request bodies the hub reads, as pydantic models: validated on arrival, published in the OpenAPI schema.

The routes read their bodies themselves, after the token check and within a size cap (FastAPI would
read a declared body first, whole), so the schema names these models through :func:`adapterkit.web.request_body`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from adapterkit.hub.protocol import Card
from adapterkit.hub.safety import HubError
from adapterkit.hub.store import Limits

SMALL_BODY = 64 * 2**10  # create-repo: a name and a few flags
PREUPLOAD_BODY = 2**20  # preupload: up to 256 paths with a 512-byte sample each


class Upload(BaseModel):
    """adapterkit's upload: the files (path -> base64), the card, the tags to move to this revision."""

    model_config = ConfigDict(extra="forbid", strict=True)
    files: Annotated[dict[str, str], Field(min_length=1, max_length=1024)]  # the store applies its own limit
    card: Card = Card()
    tags: Annotated[list[str], Field(max_length=32)] = []


class Lax(BaseModel):
    """A body from the HF client, which sends more than this hub reads."""

    model_config = ConfigDict(extra="ignore", strict=True)


class NewRepo(Lax):
    name: Annotated[str, Field(max_length=200)]
    organization: Annotated[str, Field(max_length=64)] | None = None


class Planned(Lax):
    path: Annotated[str, Field(max_length=1000)]
    size: int = 0


class Preupload(Lax):
    files: Annotated[list[Planned], Field(max_length=256)]


class Header(Lax):
    key: Literal["header"]


class Addition(Lax):
    path: Annotated[str, Field(max_length=1000)]
    content: str
    encoding: Literal["base64"] = "base64"


class AddFile(Lax):
    key: Literal["file"]
    value: Addition


class Deletion(Lax):
    path: Annotated[str, Field(max_length=1000)]


class DeleteFile(Lax):
    key: Literal["deletedFile"]
    value: Deletion


class Operation(RootModel[Annotated[Header | AddFile | DeleteFile, Field(discriminator="key")]]):
    """One line of an HF commit (NDJSON): regular files only, no LFS."""


class Commit(RootModel[list[Operation]]):
    """An HF commit's lines, as the schema shows them (the body is one JSON object a line)."""


BODIES = (Upload, NewRepo, Preupload, Commit)


def upload_cap(limits: Limits) -> int:
    """The largest upload body: the files' bound, grown 4/3 by base64, plus the JSON around them."""
    return limits.max_upload_bytes * 4 // 3 + 2**20


def decoded(path: str, data: str) -> bytes:
    """A file's base64 content from a body; 400 naming the file where it is not base64."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HubError(400, f"{path!r}: not base64 ({e})") from None
