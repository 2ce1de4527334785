"""``hub:owner/name[@tag|revision]`` references: how one is told from a path, and parsed (both parts checked,
since they name folders of the cache)."""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.errors import AdapterError, shown
from adapterkit.hub.safety import HubError, check_name, check_ref

PREFIX = "hub:"


def is_ref(source: str | object) -> bool:
    """Whether ``source`` is a ``hub:`` reference (anything else is a local path)."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str]:
    """``[hub:]owner/name[@rev]`` -> ``("owner/name", rev or "latest")``; both checked (they name cache paths)."""
    name, at, rev = ref.removeprefix(PREFIX).partition("@")
    checked(check_name, name)
    rev = rev if at else "latest"
    checked(check_ref, rev)
    return name, rev


def checked(check: Callable[[str], None], value: str) -> None:
    try:
        check(value)
    except HubError as e:
        raise AdapterError(shown(e.reason)) from None
