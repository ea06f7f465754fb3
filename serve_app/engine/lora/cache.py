"""The adapters a replica keeps resident on its device."""

from collections import OrderedDict

from serve_app.engine.lora.files import Adapter


class AdapterCache:
    """Resident adapters, least recently used evicted first, bounded by count and bytes.
    A pinned adapter (used by a running or queued request) is never evicted; the cache
    may exceed its bounds while everything in it is pinned, and evicts once unpinned.

    Args:
        max_count: adapters kept at most.
        max_bytes: device bytes their weights may take at most.
    """

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self._pins: dict[int, int] = {}

    @property
    def names(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def get(self, name: str) -> Adapter | None:
        """The resident adapter `name` (now the most recently used), or None."""
        adapter = self._entries.get(name)
        if adapter is not None:
            self._entries.move_to_end(name)
        return adapter

    def put(self, adapter: Adapter) -> list[str]:
        """Keep `adapter` (replacing one of its name); returns the names evicted."""
        self._entries[adapter.name] = adapter
        self._entries.move_to_end(adapter.name)
        return self._evict(keep=adapter.name)

    def pin(self, adapter: Adapter) -> None:
        self._pins[id(adapter)] = self._pins.get(id(adapter), 0) + 1

    def unpin(self, adapter: Adapter) -> list[str]:
        """Release one pin; returns the names this lets the cache evict."""
        left = self._pins.pop(id(adapter)) - 1
        if left:
            self._pins[id(adapter)] = left
        return self._evict()

    def _evict(self, keep: str | None = None) -> list[str]:
        evicted = []
        for name in list(self._entries):
            over = len(self._entries) > self.max_count or self.nbytes > self.max_bytes
            if not over:
                break
            if name != keep and id(self._entries[name]) not in self._pins:
                del self._entries[name]
                evicted.append(name)
        return evicted
