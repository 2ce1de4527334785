"""A bounded cache (least recently used out): the one kind of cache adapterkit keeps on the serving path."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any


class LRU:
    """A cache that keeps its ``maxsize`` most recently used entries, so no traffic can grow it.

    Every cache adapterkit keeps on the serving path is one (:func:`adapterkit.core.state.caches`)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self.lock = threading.Lock()  # threads serving one model share its caches

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value cached for ``key``, made by ``make()`` (and cached) on a miss."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = make()
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.maxsize:
                self.entries.popitem(last=False)
        return value

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached (a hit counts as a use)."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return True
            return False

    def add(self, key: Hashable) -> None:
        """Remember ``key`` (the cache as a bounded set)."""
        self.get(key, lambda: True)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, int]:
        return {"maxsize": self.maxsize}  # a copy (deepcopy, pickle) starts empty: a cache refills

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["maxsize"])
