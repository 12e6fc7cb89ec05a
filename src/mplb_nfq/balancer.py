"""The balancing decision: parsed packet + the mark it arrived with -> verdict. Pure, no I/O.

The kernel hands every queued packet over with the mark restored from its conntrack entry, so
the flow -> backend state lives in conntrack; the tables here are bounded caches of it (and the
only record of a token whose install in the kernel map failed).
"""
from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Generic, Hashable, NamedTuple, TypeVar

from .packet import TCP_SYN, Malformed, Segment, token_of_key
from .schedulers import make_scheduler

# Mark layout: low 16 bits name the backend; high bits are flags.
BACKEND_MASK = 0x0000FFFF
LEARNED = 0x40000000  # kept in ct mark: this connection's token is known, stop queueing its MP_CAPABLE
REJECT = 0x20000000  # transient: nftables answers the packet with a TCP reset
QUEUE = 0x10000000  # transient: xtables NFQUEUE rule queues packets carrying it
JOIN = 0x08000000  # kept in ct mark: this flow is an added subflow (MP_JOIN), not a new connection

UNKNOWN_JOIN_POLICIES = ("random", "drop", "reset")


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringTable(Generic[K, V]):
    """A dict with a cap and a time to live; the oldest entries go first when it is full.

    Expiry order lives in a deque beside the dict, each entry once per put. Popping a dict from
    its front would cost a scan over every slot deleted before (CPython iterates over them), 150 µs
    per put in a full table of 100k; here every operation is O(1) amortised. An entry replaced or
    deleted stays in the deque, stale, until it reaches the front or a compaction drops it.
    """

    def __init__(self, capacity: int, ttl: float):
        self.capacity, self.ttl = capacity, ttl
        self._entries: dict[K, tuple[V, float, K]] = {}  # key -> (value, expiry, key)
        self._order: deque[tuple[V, float, K]] = deque()  # the same tuples, oldest first
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
        entry = (value, now + self.ttl, key)
        self._entries[key] = entry
        self._order.append(entry)
        self.expire(now)
        entries, order = self._entries, self._order
        while len(entries) > self.capacity:
            oldest = order.popleft()
            if entries.get(oldest[2]) is oldest:
                del entries[oldest[2]]
                self.evicted += 1
        if len(order) > 2 * len(entries) + 1024:  # mostly stale: keep the deque in proportion
            self._order = deque(e for e in order if entries.get(e[2]) is e)

    def expire(self, now: float) -> None:
        entries, order = self._entries, self._order
        while order:
            oldest = order[0]
            if entries.get(oldest[2]) is oldest:
                if oldest[1] > now:
                    break
                del entries[oldest[2]]
            order.popleft()


@dataclass(eq=False)
class Backend:
    name: str
    addresses: tuple[str, ...]  # real addresses, at most one per family
    mark: int
    table: int
    weight: int = 1
    healthy: bool = True
    drained: bool = False  # by the operator: no new connections, joins of existing ones still come
    retired: bool = False  # gone from the config: drained until its connections are gone
    active: int = 0  # connections (conntrack's count, plus those placed since)
    subflows: int = 0

    @property
    def available(self) -> bool:
        return self.healthy and not self.drained and not self.retired and self.weight > 0

    @property
    def state(self) -> str:
        if self.retired:
            return "retired"
        if self.drained or self.weight == 0:
            return "draining"
        return "up" if self.healthy else "down"


@dataclass(eq=False)
class Service:
    name: str
    vips: tuple[bytes, ...]  # packed addresses
    ports: tuple[int, ...]
    backends: list[Backend]
    scheduler: str = "rr"
    unknown_join: str = "random"
    mptcp_aware: bool = True
    persistence: float = 0.0  # seconds of source-address affinity (IPVS persistence); 0: off
    maglev_size: int = 65537
    picker: object = field(init=False)
    affinity: ExpiringTable[bytes, Backend] = field(init=False)

    def __post_init__(self):
        self.picker = make_scheduler(self.scheduler, self.maglev_size)
        self.affinity = ExpiringTable(1_000_000, self.persistence)


# Held in the token table for a token that two live connections on different backends share: a
# join carrying it could belong to either, so it is refused (TCP reset) rather than misrouted.
AMBIGUOUS = -1


class Verdict(NamedTuple):
    accept: bool
    mark: int
    kind: str  # what the packet was, for the counters
    token: int | None = None  # learned: install token -> mark in the kernel map (a collision: remove it)


class Balancer:
    def __init__(self, services: list[Service], flow_capacity: int = 1_000_000, flow_ttl: float = 7200.0,
                 token_capacity: int = 1_000_000, token_ttl: float = 7200.0, rng: random.Random | None = None):
        self.flows: ExpiringTable[tuple, int] = ExpiringTable(flow_capacity, flow_ttl)  # flow -> the mark it got
        # token -> its backend's mark: entries of plain ints, which the cyclic GC stops tracking, so
        # that a full collection does not walk a million of them
        self.tokens: ExpiringTable[int, int] = ExpiringTable(token_capacity, token_ttl)
        self.rng = rng or random.Random()
        self.counts: Counter[str] = Counter()
        self.update(services)

    def update(self, services: list[Service], retired: list[Backend] = ()) -> None:
        """Take a new set of services (a reload); learned flows and tokens stay. Retired backends
        (gone from the config) get no new connections but still take their connections' joins."""
        if not services or not all(s.backends for s in services):
            raise ValueError("every service needs at least one backend")
        previous = {s.name: s for s in getattr(self, "services", [])}
        for service in services:  # clients keep their backend across a reload
            if service.name in previous and service.persistence == previous[service.name].persistence:
                service.affinity = previous[service.name].affinity
        self.services = services
        self._service_at = {(vip, port): s for s in services for vip in s.vips for port in s.ports}
        self.by_mark = {b.mark: b for b in retired}
        self.by_mark.update({b.mark: b for s in services for b in s.backends})

    @property
    def backends(self) -> list[Backend]:
        return list(self.by_mark.values())

    def backend_of(self, mark: int) -> Backend | None:
        return self.by_mark.get(mark & BACKEND_MASK)

    def decide(self, segment: Segment | Malformed | None, mark: int, now: float, hold: bool = False) -> Verdict:
        """hold: a join whose token is unknown yet may wait (kind "join_held"), for another
        worker may have learned the token and be putting it in the kernel map."""
        verdict = self._decide(segment, mark, now, hold)
        self.counts[verdict.kind] += 1
        return verdict

    def learn_token(self, token: int, mark: int, now: float) -> None:
        """A token read back from the kernel map, where a worker put it: with its backend's mark,
        or with REJECT when it collides (then it overrides what this worker knew)."""
        if mark & REJECT:
            self.tokens.put(token, AMBIGUOUS, now)
            return
        backend = self.backend_of(mark)
        if backend is not None and self.tokens.get(token, now) is None:
            self.tokens.put(token, backend.mark, now)

    def collide(self, token: int, now: float) -> None:
        """The kernel map refused this token: another worker's connection holds it on another backend."""
        self.tokens.put(token, AMBIGUOUS, now)
        self.counts["token_collision"] += 1

    def _decide(self, segment: Segment | Malformed | None, mark: int, now: float, hold: bool) -> Verdict:
        if segment is None:
            return Verdict(True, mark, "not_tcp")
        if isinstance(segment, Malformed):
            return Verdict(True, mark, "malformed")  # safe: the kernel routes it as it would without us
        if segment.is_syn:
            service = self._service_at.get((segment.dst, segment.dport))
            if service is None:
                return Verdict(True, mark, "no_service")
            return self._on_syn(service, segment, now, hold)
        if not mark & BACKEND_MASK and not segment.flags & TCP_SYN:
            # the first packet of a conntrack entry made mid-stream (direct server return: the
            # SYN was not tracked): it takes the backend decided for its SYN
            mark = self.flows.get(segment.flow, now) or 0
            if not mark:
                return Verdict(True, 0, "first_without_flow")
            if segment.capable is None or segment.capable.receiver_key is None:
                return Verdict(True, mark, "first_packet")
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

    def _on_syn(self, service: Service, segment: Segment, now: float, hold: bool) -> Verdict:
        known = self.flows.get(segment.flow, now)  # a retransmitted SYN keeps its backend
        if known is not None:
            return Verdict(True, known, "syn_retransmit")
        if segment.join is not None and service.mptcp_aware:
            known = self.tokens.get(segment.join.token, now)
            if known == AMBIGUOUS:
                return Verdict(True, REJECT, "join_collision")
            backend = None if known is None else self.backend_of(known)
            if backend is not None:  # even to a drained backend: the connection lives there
                backend.subflows += 1
                self.flows.put(segment.flow, backend.mark | JOIN, now)
                return Verdict(True, backend.mark | JOIN, "join_hit")
            if hold:
                return Verdict(True, 0, "join_held")
            if service.unknown_join == "drop":
                return Verdict(False, 0, "join_miss")
            if service.unknown_join == "reset":
                return Verdict(True, REJECT, "join_miss")
            candidates = [b for b in service.backends if b.available] or service.backends
            backend = self.rng.choice(candidates)
            self.flows.put(segment.flow, backend.mark | JOIN, now)
            return Verdict(True, backend.mark | JOIN, "join_miss")
        else:
            backend = self._schedule(service, segment, now)
            if backend is None:
                return Verdict(True, REJECT, "no_backend")
            kind = "join_unaware" if segment.join is not None else (
                "mp_capable_syn" if segment.capable is not None else "syn")
            backend.active += 1
        self.flows.put(segment.flow, backend.mark, now)
        return Verdict(True, backend.mark, kind)

    def _schedule(self, service: Service, segment: Segment, now: float) -> Backend | None:
        if service.persistence:
            sticky = service.affinity.get(segment.src, now)
            if sticky is not None and sticky.available:
                service.affinity.put(segment.src, sticky, now)
                return sticky
        candidates = [b for b in service.backends if b.available]
        if not candidates:
            return None
        backend = service.picker.pick(segment, candidates)
        if service.persistence:
            service.affinity.put(segment.src, backend, now)
        return backend

    def _learn(self, server_key: bytes, version: int, flow: tuple, mark: int, now: float, kind: str) -> Verdict:
        backend = self.backend_of(mark or self.flows.get(flow, now) or 0)
        if backend is None:
            return Verdict(True, mark, "capable_without_flow")  # e.g. opened while no worker listened
        service = self._service_at.get((flow[2], flow[3]))
        if service is not None and not service.mptcp_aware:
            return Verdict(True, backend.mark | LEARNED, kind)
        token = token_of_key(server_key, version)
        known = self.tokens.get(token, now)
        if known == backend.mark:  # already learned (SYN-ACK, then a racing ACK)
            return Verdict(True, backend.mark | LEARNED, kind + "_repeat")
        if known == AMBIGUOUS:
            return Verdict(True, backend.mark | LEARNED, "token_collision_repeat")
        if known is not None:  # another connection, on another backend, has the same token
            self.tokens.put(token, AMBIGUOUS, now)
            return Verdict(True, backend.mark | LEARNED, "token_collision", token)
        self.tokens.put(token, backend.mark, now)
        return Verdict(True, backend.mark | LEARNED, kind, token)
