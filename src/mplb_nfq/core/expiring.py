"""A bounded table whose entries expire; time is passed in, never read."""
from __future__ import annotations

from collections import deque
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringTable(Generic[K, V]):
    """A dict with a cap and a time to live; the oldest entries go first when it is full.

    Expiry order lives in a deque beside the dict, each entry once per put. Popping a dict from
    its front would cost a scan over every slot deleted before (CPython iterates over them), 150 µs
    per put in a full table of 100k; here every operation is O(1) amortised. An entry replaced or
    deleted stays in the deque, stale, until it reaches the front or a compaction drops it.
    """

    def __init__(self, capacity: int, ttl: float, track_pushed_out: bool = False):
        self.capacity, self.ttl = capacity, ttl
        # the keys pushed out for room (not those that expired), for an owner that must undo them
        # elsewhere; it takes them with take_pushed_out()
        self.pushed_out: list[K] | None = [] if track_pushed_out else None
        self._entries: dict[K, tuple[V, float, K]] = {}  # key -> (value, expiry, key)
        self._order: deque[tuple[V, float, K]] = deque()  # the same tuples, oldest first
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: K, value: V, now: float) -> None:
        self.expire(now)
        self._put(key, value, now)

    def _put(self, key: K, value: V, now: float) -> None:
        """put() once expired entries are gone."""
        entry = (value, now + self.ttl, key)
        entries, order = self._entries, self._order
        entries[key] = entry
        order.append(entry)
        while len(entries) > self.capacity:
            oldest = order.popleft()
            if entries.get(oldest[2]) is oldest:
                del entries[oldest[2]]
                self.evicted += 1
                if self.pushed_out is not None:
                    self.pushed_out.append(oldest[2])
        if len(order) > 2 * len(entries) + 1024:  # mostly stale: keep the deque in proportion
            self._order = deque(e for e in order if entries.get(e[2]) is e)

    def add(self, key: K, value: V, now: float) -> bool:
        """Put a new key only while there is room (after expiry): when full, False, and nothing
        already there is pushed out. For a table whose old entries matter more than new ones."""
        self.expire(now)
        if key not in self._entries and len(self._entries) >= self.capacity:
            self.refused += 1
            return False
        self._put(key, value, now)
        return True

    def items(self, now: float):
        """(key, value, seconds left) of every live entry."""
        for key, (value, expiry, _) in self._entries.items():
            if expiry > now:
                yield key, value, expiry - now

    def take_pushed_out(self) -> list[K]:
        taken, self.pushed_out = self.pushed_out, []
        return taken

    def remove(self, key: K) -> None:
        self._entries.pop(key, None)  # its stale twin in the order deque goes when it reaches the front

    def expire(self, now: float) -> None:
        entries, order = self._entries, self._order
        while order:
            oldest = order[0]
            if entries.get(oldest[2]) is oldest:
                if oldest[1] > now:
                    break
                del entries[oldest[2]]
            order.popleft()
