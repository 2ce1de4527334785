"""The hub client: push, pull (into a content-addressed cache), search, and ``hub:`` references.

``hub:owner/name[@tag|revision]`` resolves against ``$ADAPTERKIT_HUB`` (default ``http://127.0.0.1:8765``)
in one place, :func:`resolve`. A hub is not trusted: the transport bounds every answer and keeps the
token with the hub's origin (:mod:`.transport`), answers are checked against schemas (:mod:`.answers`),
revisions are verified and cached once per file (:mod:`.cache`); the operations are :mod:`.api`.
"""

from __future__ import annotations

from adapterkit.hub.client.api import (
    card,
    check_base,
    delete,
    load_adapter,
    make_card,
    pull,
    push,
    resolve,
    search,
    shared,
)
from adapterkit.hub.client.cache import cache_root, sweep
from adapterkit.hub.client.refs import is_ref, parse_ref
from adapterkit.hub.client.transport import HubRequestError, HubUnreachable, hub_url, request, same_origin_as

__all__ = [
    "HubRequestError",
    "HubUnreachable",
    "cache_root",
    "card",
    "check_base",
    "delete",
    "hub_url",
    "is_ref",
    "load_adapter",
    "make_card",
    "parse_ref",
    "pull",
    "push",
    "request",
    "resolve",
    "same_origin_as",
    "search",
    "shared",
    "sweep",
]
