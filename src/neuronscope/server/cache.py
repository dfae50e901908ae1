"""A bounded, thread-safe cache of results that do not depend on a session (neuron pages, concept searches, the notes
and top tokens of neurons): the `size` most recently stored, the oldest dropped first."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class BoundedCache:
    """Values by key, at most `size` of them (the least recently stored goes first); safe across threads."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The value stored under `key`, or None."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        """Store `value` (dropping the oldest entry when full)."""
        with self._lock:
            if key not in self._items and len(self._items) >= self.size:
                self._items.popitem(last=False)
            self._items[key] = value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
