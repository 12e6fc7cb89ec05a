"""Connection -> token for a million connections in 24 bytes each, where a dict keyed by flows
took about 300: open addressing with linear probing over two arrays, keyed by a 64-bit digest of
the flow (two flows with one digest: one in 10^7 at a million). Pure."""
from __future__ import annotations

import hashlib
from array import array
from typing import Iterator

EMPTY = 0


def digest(flow_key: bytes) -> int:
    """A flow's 64-bit digest, the same in every process (a snapshot keeps them), never EMPTY."""
    return int.from_bytes(hashlib.blake2b(flow_key, digest_size=8).digest(), "little") or 1


class FlowTokens:
    def __init__(self, capacity: int = 1024):
        self._size = 0
        self._resize(max(16, 1 << (capacity - 1).bit_length()))

    def _resize(self, slots: int) -> None:
        old = (self._digests, self._tokens, self._seen) if self._size else ((), (), ())
        self._digests, self._tokens = array("Q", bytes(8 * slots)), array("I", bytes(4 * slots))
        self._seen = bytearray(slots)
        self._mask, self._size = slots - 1, 0
        for flow, token, seen in zip(*old):
            if flow != EMPTY:
                self.put(flow, token)
                if seen:  # (a reading under way keeps what it found)
                    self.mark(flow)

    def __len__(self) -> int:
        return self._size

    def _slot(self, flow: int) -> int:
        """The slot holding flow, or the empty one where it would go."""
        digests, mask = self._digests, self._mask
        slot = flow & mask
        while digests[slot] != EMPTY and digests[slot] != flow:
            slot = (slot + 1) & mask
        return slot

    def put(self, flow: int, token: int) -> None:
        slot = self._slot(flow)
        if self._digests[slot] == EMPTY:
            if 2 * (self._size + 1) > len(self._digests):  # at most half full: probes stay short
                self._resize(2 * len(self._digests))
                slot = self._slot(flow)
            self._size += 1
        self._digests[slot], self._tokens[slot] = flow, token

    def get(self, flow: int) -> int | None:
        slot = self._slot(flow)
        return None if self._digests[slot] == EMPTY else self._tokens[slot]

    def pop(self, flow: int) -> int | None:
        """Remove flow; its token, or None. The entries after it move back (no tombstones), so a
        table whose connections come and go never fills with dead slots."""
        digests, tokens, seen, mask = self._digests, self._tokens, self._seen, self._mask
        slot = self._slot(flow)
        if digests[slot] == EMPTY:
            return None
        token = tokens[slot]
        hole, nxt = slot, (slot + 1) & mask
        while digests[nxt] != EMPTY:
            home = digests[nxt] & mask
            if (nxt - home) & mask >= (nxt - hole) & mask:  # its home is not between the hole and it
                digests[hole], tokens[hole], seen[hole] = digests[nxt], tokens[nxt], seen[nxt]
                hole = nxt
            nxt = (nxt + 1) & mask
        digests[hole], tokens[hole], seen[hole] = EMPTY, 0, 0
        self._size -= 1
        return token

    def items(self) -> Iterator[tuple[int, int]]:
        """(digest, token) of every entry."""
        for flow, token in zip(self._digests, self._tokens):
            if flow != EMPTY:
                yield flow, token

    # A full reading marks the flows it finds, then asks for the ones it did not.
    def unmark(self) -> None:
        self._seen = bytearray(len(self._digests))

    def mark(self, flow: int) -> bool:
        slot = self._slot(flow)
        if self._digests[slot] == EMPTY:
            return False
        self._seen[slot] = 1
        return True

    def unmarked(self) -> list[tuple[int, int]]:
        return [(flow, token) for flow, token, seen in zip(self._digests, self._tokens, self._seen)
                if flow != EMPTY and not seen]
