"""Who may do what on the hub: the dependencies every route declares, checked before a body is read.

Reads are public unless the hub is private; uploads and deletes need a token of the adapter's owner
(``adapterkit hub token create OWNER``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapterkit.hub.safety import HubError
from adapterkit.hub.store import Store
from adapterkit.web import bearer_token


async def authenticated(request: Request) -> tuple[Store, str]:
    """The store and the token's owner; 401 without a valid token."""
    store = request.app.state.store
    who = store.owner_of(bearer_token(request))
    if who is None:
        raise HubError(401, "uploads and deletes need a token: adapterkit hub token create OWNER")
    return store, who


async def readable(request: Request) -> Store:
    """Dependency of every read: the store, after the token check of a private hub.

    async: a sync dependency would cost every request a hop through the thread pool; the token
    lookup is one indexed SQLite read."""
    store = request.app.state.store
    if request.app.state.private and store.owner_of(bearer_token(request)) is None:
        raise HubError(401, "this hub is private: pass a token (Authorization: Bearer ...)")
    return store


async def writable(request: Request, owner: str) -> Store:
    """Dependency of uploads and deletes: the token must belong to ``owner``."""
    store, who = await authenticated(request)
    if who != owner:
        raise HubError(403, f"this token belongs to {who!r}, not to {owner!r}")
    return store


Reader = Annotated[Store, Depends(readable)]
Writer = Annotated[Store, Depends(writable)]
