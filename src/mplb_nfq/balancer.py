"""The balancing decision: parsed packet + the mark it arrived with -> verdict. Pure, no I/O.

The kernel hands every queued packet over with the mark restored from its conntrack entry, so
the flow -> backend state lives in conntrack; the tables here are bounded caches of it (and the
only record of tokens not yet installed in the kernel map).
"""
from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Generic, Hashable, NamedTuple, TypeVar

from .packet import TCP_SYN, Malformed, Segment, token_of_key

# Mark layout: low 16 bits name the backend; high bits are flags.
BACKEND_MASK = 0x0000FFFF
LEARNED = 0x40000000  # kept in ct mark: this connection's token is known, stop queueing its MP_CAPABLE
REJECT = 0x20000000  # transient: nftables answers the packet with a TCP reset
QUEUE = 0x10000000  # transient: xtables NFQUEUE rule queues packets carrying it

SCHEDULERS = ("rr", "sh")
UNKNOWN_JOIN_POLICIES = ("random", "drop", "reset")


@dataclass(frozen=True)
class Backend:
    name: str
    address: str
    mark: int
    table: int


class Verdict(NamedTuple):
    accept: bool
    mark: int
    kind: str  # what the packet was, for the counters
    token: int | None = None  # learned: install token -> mark in the kernel map


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringTable(Generic[K, V]):
    """A dict with a cap and a time to live; the oldest entries go first when it is full."""

    def __init__(self, capacity: int, ttl: float):
        self.capacity, self.ttl = capacity, ttl
        self._entries: dict[K, tuple[V, float]] = {}
        self.evicted = 0

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
        self._entries.pop(key, None)  # re-insert so that insertion order stays expiry order
        self._entries[key] = (value, now + self.ttl)
        self.expire(now)
        while len(self._entries) > self.capacity:
            del self._entries[next(iter(self._entries))]
            self.evicted += 1

    def expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key = next(iter(entries))
            if entries[key][1] > now:
                break
            del entries[key]

    def items(self, now: float) -> list[tuple[K, V]]:
        return [(k, v) for k, (v, expires) in self._entries.items() if expires > now]


class RoundRobin:
    def __init__(self, backends: list[Backend]):
        self.backends, self._next = backends, 0

    def pick(self, segment: Segment) -> Backend:
        backend = self.backends[self._next % len(self.backends)]
        self._next += 1
        return backend


class SourceHash:
    """IPVS `sh`: the client address alone picks the backend (stateless affinity)."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends

    def pick(self, segment: Segment) -> Backend:
        return self.backends[zlib.crc32(segment.src) % len(self.backends)]


def make_scheduler(name: str, backends: list[Backend]) -> RoundRobin | SourceHash:
    return {"rr": RoundRobin, "sh": SourceHash}[name](backends)


class Balancer:
    def __init__(self, backends: list[Backend], scheduler: str = "rr", unknown_join: str = "random",
                 mptcp_aware: bool = True, flow_capacity: int = 1_000_000, flow_ttl: float = 7200.0,
                 token_capacity: int = 1_000_000, token_ttl: float = 7200.0, rng: random.Random | None = None):
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = backends
        self.scheduler = make_scheduler(scheduler, backends)
        self.unknown_join = unknown_join
        self.mptcp_aware = mptcp_aware
        self.flows: ExpiringTable[tuple, Backend] = ExpiringTable(flow_capacity, flow_ttl)
        self.tokens: ExpiringTable[int, Backend] = ExpiringTable(token_capacity, token_ttl)
        self.rng = rng or random.Random()
        self.by_mark = {b.mark: b for b in backends}
        self.counts: Counter[str] = Counter()

    def backend_of(self, mark: int) -> Backend | None:
        return self.by_mark.get(mark & BACKEND_MASK)

    def decide(self, segment: Segment | Malformed | None, mark: int, now: float) -> Verdict:
        verdict = self._decide(segment, mark, now)
        self.counts[verdict.kind] += 1
        return verdict

    def _decide(self, segment: Segment | Malformed | None, mark: int, now: float) -> Verdict:
        if segment is None:
            return Verdict(True, mark, "not_tcp")
        if isinstance(segment, Malformed):
            return Verdict(True, mark, "malformed")  # safe: the kernel routes it as it would without us
        if segment.is_syn:
            return self._on_syn(segment, now)
        capable = segment.capable
        if capable is None:
            return Verdict(True, mark, "other")
        if segment.flags & TCP_SYN:  # the backend's SYN-ACK: its key is the server's
            if capable.sender_key is not None:
                flow = (segment.dst, segment.dport, segment.src, segment.sport)
                return self._learn(capable.sender_key, capable.version, flow, mark, now, "syn_ack")
        elif capable.receiver_key is not None:  # the third ACK, or the first data packet, repeating both keys
            return self._learn(capable.receiver_key, capable.version, segment.flow, mark, now, "third_ack")
        return Verdict(True, mark, "other")

    def _on_syn(self, segment: Segment, now: float) -> Verdict:
        known = self.flows.get(segment.flow, now)  # a retransmitted SYN keeps its backend
        if known is not None:
            return Verdict(True, known.mark, "syn_retransmit")
        if segment.join is not None and self.mptcp_aware:
            backend = self.tokens.get(segment.join.token, now)
            if backend is not None:
                kind = "join_hit"
            elif self.unknown_join == "random":
                backend, kind = self.rng.choice(self.backends), "join_miss"
            elif self.unknown_join == "drop":
                return Verdict(False, 0, "join_miss")
            else:
                return Verdict(True, REJECT, "join_miss")
        else:
            backend = self.scheduler.pick(segment)
            kind = "join_unaware" if segment.join is not None else (
                "mp_capable_syn" if segment.capable is not None else "syn")
        self.flows.put(segment.flow, backend, now)
        return Verdict(True, backend.mark, kind)

    def _learn(self, server_key: bytes, version: int, flow: tuple, mark: int, now: float, kind: str) -> Verdict:
        backend = self.backend_of(mark) or self.flows.get(flow, now)
        if backend is None:
            return Verdict(True, mark, "capable_without_flow")  # e.g. opened while no worker listened
        if not self.mptcp_aware:
            return Verdict(True, backend.mark | LEARNED, kind)
        token = token_of_key(server_key, version)
        if self.tokens.get(token, now) is backend:  # already learned (SYN-ACK, then a racing ACK)
            return Verdict(True, backend.mark | LEARNED, kind + "_repeat")
        self.tokens.put(token, backend, now)
        return Verdict(True, backend.mark | LEARNED, kind, token)
