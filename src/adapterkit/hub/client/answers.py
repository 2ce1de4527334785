"""What a hub answers, as pydantic models: every answer is checked against one of these before it is used."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from adapterkit.hub.protocol import Digest, Key, Stored, Text


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
