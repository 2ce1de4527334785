"""adapterkit's adapter hub: a server (:mod:`.server`), its storage (:mod:`.store`), what both sides
check (:mod:`.protocol`, :mod:`.safety`), and a client (:mod:`.client`).

>>> from adapterkit import hub
>>> hub.push("runs/lora", "me/sentiment-lora", hub="http://127.0.0.1:8765", tags=["v1"], token=TOKEN)
>>> ak.load_adapter(model, "hub:me/sentiment-lora@v1")   # $ADAPTERKIT_HUB names the server

The server side imports neither torch nor the rest of adapterkit: a hub deploys without the model
stack. The client's names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from adapterkit.hub.safety import HubError

_CLIENT = ("card", "delete", "pull", "push", "search", "sweep")
__all__ = ["HubError", *_CLIENT]


def __getattr__(name: str) -> Any:
    if name in _CLIENT:
        return getattr(importlib.import_module("adapterkit.hub.client"), name)
    raise AttributeError(f"module 'adapterkit.hub' has no attribute {name!r}")
