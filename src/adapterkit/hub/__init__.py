"""adapterkit's adapter hub: a server (:mod:`.server`), its storage (:mod:`.store`) and a client.

>>> from adapterkit import hub
>>> hub.push("runs/lora", "me/sentiment-lora", hub="http://127.0.0.1:8765", tags=["v1"], token=TOKEN)
>>> ak.load_adapter(model, "hub:me/sentiment-lora@v1")   # $ADAPTERKIT_HUB names the server
"""

from .client import card, delete, pull, push, search
from .safety import HubError

__all__ = ["HubError", "card", "delete", "pull", "push", "search"]
