"""The balancing decision: parsed packet + the mark it arrived with -> verdict. Pure, no I/O.

The kernel hands every queued packet over with the mark restored from its conntrack entry, so
the flow -> backend state lives in conntrack; the tables here are bounded caches of it (and the
only record of a token whose install in the kernel map failed).
"""
from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from .expiring import ExpiringTable
from .marks import BACKEND_MASK, DISPLACEABLE, JOIN, LEARNED, PROVISIONAL, REJECT
from .packet import TCP_SYN, Malformed, Segment, token_of_key
from .schedulers import MAGLEV_DEFAULT_SIZE, Index, Maglev, make_scheduler
from .tokens import AMBIGUOUS, INSTALL_PENDING, PROVISIONAL_SECONDS, token_capacities
from .verdicts import Kind, Verdict

UNKNOWN_JOIN_POLICIES = ("random", "drop", "reset")
REPEATED = {Kind.SYN_ACK: Kind.SYN_ACK_REPEAT, Kind.THIRD_ACK: Kind.THIRD_ACK_REPEAT}


SCHEDULING_STATE = frozenset({"weight", "healthy", "drained", "retired"})  # what `available` reads


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
    # times what the scheduler tables are built from changed: any backend's SCHEDULING_STATE, set
    # by any thread (the health thread, the loop), or a balancer's services. The loop writes the
    # kernel's tables when it moves, not on every turn. It moves after the value is stored: a loop
    # that sees it move reads the new state.
    changes: ClassVar[int] = 0
    _changing: ClassVar[threading.Lock] = threading.Lock()

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name in SCHEDULING_STATE:
            Backend.changed()

    @staticmethod
    def changed() -> None:
        with Backend._changing:
            Backend.changes += 1

    @property
    def available(self) -> bool:
        return self.healthy and not self.drained and not self.retired and self.weight > 0

    @property
    def idle(self) -> bool:
        """No connection and no subflow left (conntrack's count): a retired backend can go."""
        return self.active == 0 and self.subflows == 0

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
    maglev_size: int = MAGLEV_DEFAULT_SIZE
    direct_return: bool = False
    picker: object = field(init=False)
    affinity: ExpiringTable[bytes, Backend] = field(init=False)

    def __post_init__(self):
        self.picker = make_scheduler(self.scheduler, self.maglev_size, self.backends)
        self.affinity = ExpiringTable(1_000_000, self.persistence)

    @property
    def index(self) -> Index:
        """How the kernel indexes this service's table (lc counts connections: it decides in the
        worker). Under direct server return the SYN leaves no conntrack entry to remember a
        counter's pick for the next packet, so round robin hashes the connection instead."""
        if self.picker.index is Index.COUNTER and self.direct_return:
            return Index.FLOW
        return self.picker.index


@dataclass(frozen=True)
class LookupTable:
    """A service's SYN decision as the kernel takes it: the slot its index picks holds the
    backend's mark; REJECT alone when no backend is available; no slot when the worker decides.
    With `via` (Maglev): the slot holds a virtual backend's number (with REJECT: should the
    kernel not find it, the SYN is refused, not sent by a number), and via[number] the mark.
    affinity: seconds a client keeps the backend it last got (persistence), 0: none."""
    index: Index
    slots: tuple[int, ...]
    affinity: int = 0
    via: tuple[int, ...] = ()

    def mark_at(self, position: int) -> int:
        value = self.slots[position]
        return self.via[value & ~VIRTUAL] if self.via else value

    def marks(self) -> set[int]:
        """The marks its SYNs may get."""
        return set(self.via) if self.via else set(self.slots)


VIRTUAL = REJECT  # in a slot: a virtual backend's number (LookupTable.via)


class Balancer:
    def __init__(self, services: list[Service], flow_capacity: int = 1_000_000, flow_ttl: float = 7200.0,
                 token_capacity: int = 1_000_000, token_ttl: float = 7200.0, rng: random.Random | None = None):
        self.flows: ExpiringTable[tuple, int] = ExpiringTable(flow_capacity, flow_ttl)  # flow -> the mark it got
        # token -> its backend's mark: entries of plain ints, which the cyclic GC stops tracking, so
        # that a full collection does not walk a million of them. Proven tokens, and the provisional
        # ones a client taught (see core.tokens), with the connection that taught each
        proven, provisional = token_capacities(token_capacity)
        self.tokens: ExpiringTable[int, int] = ExpiringTable(proven, token_ttl)
        self.provisional: ExpiringTable[int, int] = ExpiringTable(provisional, PROVISIONAL_SECONDS, True)
        self.provisional_flows: ExpiringTable[tuple, int] = ExpiringTable(provisional, PROVISIONAL_SECONDS)
        self.newly_known: list[int] = []  # tokens learned since the worker last took them (held joins wait)
        self.rng = rng or random.Random()
        self.counts: Counter[Kind] = Counter()
        self._tables: dict[str, tuple[tuple, LookupTable]] = {}  # service -> (what it was built for, table)
        self._slots: dict[str, tuple[list[int], tuple[int, ...]]] = {}  # service -> its Maglev table, as slots
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
        Backend.changed()

    def lookup_tables(self) -> dict[str, LookupTable]:
        """Every service's table for the backends available now; one is built again only when
        their state changes (the same object comes back otherwise)."""
        tables = {}
        for service in self.services:
            # read once: the health thread may change a backend between two readings
            states = [(b, b.available) for b in service.backends]
            candidates = [b for b, available in states if available]
            signature = (service.index, service.scheduler, service.maglev_size, service.mptcp_aware,
                         service.persistence, tuple((b.name, b.mark, b.weight, up) for b, up in states))
            cached = self._tables.get(service.name)
            if cached is None or cached[0] != signature:
                via = ()
                if service.index is Index.WORKER:
                    slots = ()
                elif not candidates:
                    slots = (REJECT,)
                elif isinstance(service.picker, Maglev):
                    slots = self._virtual_slots(service, candidates)
                    via = tuple(candidates[i].mark for i in service.picker.virtual_backends(candidates))
                else:
                    slots = tuple(candidates[i].mark for i in service.picker.table(candidates))
                table = LookupTable(service.index, slots, int(service.persistence), via)
                cached = self._tables[service.name] = (signature, table)
            tables[service.name] = cached[1]
        return tables

    def _virtual_slots(self, service: Service, candidates: list[Backend]) -> tuple[int, ...]:
        """A Maglev table's slots: the same tuple while its backends stay (a backend's going
        changes only `via`), so that nothing compares 65,537 slots for it."""
        table = service.picker.table(candidates)
        kept = self._slots.get(service.name)
        if kept is None or kept[0] is not table:
            kept = self._slots[service.name] = (table, tuple(VIRTUAL | virtual for virtual in table))
        return kept[1]

    @property
    def backends(self) -> list[Backend]:
        return list(self.by_mark.values())

    def backend_of(self, mark: int) -> Backend | None:
        return self.by_mark.get(mark & BACKEND_MASK)

    def decide(self, segment: Segment | Malformed | None, mark: int, now: float, hold: bool = False) -> Verdict:
        """hold: a join whose token is unknown yet may wait (kind Kind.JOIN_HELD), for another
        worker may have learned the token and be putting it in the kernel map.

        A packet Linux would drop (its IP or TCP header broken) is dropped; one whose options
        are broken is decided as Linux's stack will take it. Every queued packet but a client's
        SYN settles its flow (the learned bit in its mark): whatever a client sends, a
        connection reaches the worker a bounded number of times."""
        if isinstance(segment, Malformed):
            self.counts[Kind.MALFORMED] += 1
            if segment.linux is None:
                return Verdict(False, mark, Kind.MALFORMED)
            segment = segment.linux
        verdict = self._decide(segment, mark, now, hold)
        if segment is not None and not segment.is_syn and verdict.accept and not verdict.mark & (REJECT | LEARNED):
            verdict = verdict._replace(mark=verdict.mark | LEARNED)
        self.counts[verdict.kind] += 1
        return verdict

    def learn_copy(self, copy: tuple[bool, bytes, int, tuple], mark: int, now: float) -> Verdict:
        """decide() for what packet.capable_copy read of a copy whose mark names a backend: the
        same verdict and counts, without a Segment."""
        from_server, key, version, flow = copy
        verdict = self._learn(key, version, flow, mark, now, Kind.SYN_ACK if from_server else Kind.THIRD_ACK)
        if verdict.accept and not verdict.mark & (REJECT | LEARNED):  # as decide(): no copy is a client's SYN
            verdict = verdict._replace(mark=verdict.mark | LEARNED)
        self.counts[verdict.kind] += 1
        return verdict

    def learn_token(self, token: int, mark: int, now: float) -> None:
        """A token read back from the kernel map, where a worker put it: with its backend's mark
        (and whether a client taught it), or with REJECT when it collides (then it overrides
        what this worker knew)."""
        if mark & REJECT:
            self._settle(token, AMBIGUOUS, now)
            return
        backend = self.backend_of(mark)
        if backend is not None and self.known_token(token, now) is None:
            if self.tokens.add(token, backend.mark | (mark & DISPLACEABLE), now):
                self.newly_known.append(token)

    def decide_join_by(self, segment: Segment, mark: int, now: float) -> Verdict:
        """A held join whose token the kernel map holds (another worker's): where the map says."""
        if mark & REJECT:
            verdict = Verdict(True, REJECT, Kind.JOIN_COLLISION)
        else:
            backend = self.backend_of(mark)
            if backend is None:  # a backend this worker no longer has: as if unknown
                return self.decide(segment, 0, now)
            verdict = self._join_to(backend, segment.flow, now)
        self.counts[verdict.kind] += 1
        return verdict

    def learn_provisional(self, token: int, mark: int, flow: tuple, now: float) -> None:
        """A provisional token read back from the kernel map, with the connection that taught it."""
        backend = self.backend_of(mark)
        if backend is not None and self.known_token(token, now) is None:
            self._hold_provisional(token, backend.mark | DISPLACEABLE, flow, now)

    def _hold_provisional(self, token: int, value: int, flow: tuple, now: float) -> None:
        """A client's token, and the connection whose next packet will prove it (the oldest such
        pushed out when the pool is full)."""
        self.provisional.put(token, value, now)
        self.provisional_flows.put(flow, token, now)
        self.newly_known.append(token)

    def take_newly_known(self) -> list[int]:
        taken, self.newly_known = self.newly_known, []
        return taken

    def known_token(self, token: int, now: float) -> int | None:
        """What the core knows of a token: its backend's mark (flags too), AMBIGUOUS, or None."""
        known = self.tokens.get(token, now)
        return self.provisional.get(token, now) if known is None else known

    def forget(self, token: int) -> None:
        """Its connection is gone: the token means nothing any more."""
        self.tokens.remove(token)
        self.provisional.remove(token)

    def install_failed(self, token: int, now: float) -> None:
        """The kernel map did not take it: the connection's next MP_CAPABLE packet tries again."""
        for table in (self.tokens, self.provisional):
            known = table.get(token, now)
            if known is not None and known != AMBIGUOUS:
                table.put(token, known | INSTALL_PENDING, now)

    def collide(self, token: int, now: float) -> None:
        """The kernel map refused this token: another worker's connection holds it on another backend."""
        self._settle(token, AMBIGUOUS, now)
        self.counts[Kind.TOKEN_COLLISION] += 1

    def _settle(self, token: int, value: int, now: float) -> None:
        """The token's lasting value (a server's word, or a collision): it is provisional no more."""
        self.provisional.remove(token)
        self.tokens.put(token, value, now)
        self.newly_known.append(token)

    def _decide(self, segment: Segment | None, mark: int, now: float, hold: bool) -> Verdict:
        if segment is None:
            return Verdict(True, mark, Kind.NOT_TCP)
        if segment.is_syn:
            service = self._service_at.get((segment.dst, segment.dport))
            if service is None:
                return Verdict(True, mark, Kind.NO_SERVICE)
            return self._on_syn(service, segment, now, hold)
        if not mark & BACKEND_MASK and not segment.flags & TCP_SYN:
            # the first packet of a conntrack entry made mid-stream (direct server return: the
            # SYN was not tracked): it takes the backend decided for its SYN
            mark = self.flows.get(segment.flow, now) or 0
            if not mark:
                return Verdict(True, 0, Kind.FIRST_WITHOUT_FLOW)
            if segment.capable is None or segment.capable.receiver_key is None:
                return Verdict(True, mark, Kind.FIRST_PACKET)
        capable = segment.capable
        if capable is None:
            if mark & PROVISIONAL and not segment.flags & TCP_SYN:  # the kernel copied its proof
                return self._prove(segment.flow, mark, now)
            return Verdict(True, mark, Kind.OTHER)
        if segment.flags & TCP_SYN:  # the backend's SYN-ACK: its key is the server's
            if capable.sender_key is not None:
                flow = (segment.dst, segment.dport, segment.src, segment.sport)
                return self._learn(capable.sender_key, capable.version, flow, mark, now, Kind.SYN_ACK)
        elif capable.receiver_key is not None:  # the third ACK, or the first data packet, repeating both keys
            return self._learn(capable.receiver_key, capable.version, segment.flow, mark, now, Kind.THIRD_ACK)
        return Verdict(True, mark, Kind.OTHER)

    def _on_syn(self, service: Service, segment: Segment, now: float, hold: bool) -> Verdict:
        cached = self.flows.get(segment.flow, now)  # a retransmitted SYN keeps its backend
        if segment.join is not None and service.mptcp_aware:
            known = self.known_token(segment.join.token, now)
            # so does a join, unless its token is known on another backend: then the four-tuple is
            # an earlier subflow's (clients reuse ports: a few hundred joins a minute meet one in a lab)
            if cached is not None and (known is None or known == AMBIGUOUS
                                       or known & BACKEND_MASK == cached & BACKEND_MASK):
                return Verdict(True, cached, Kind.SYN_RETRANSMIT)
            if known == AMBIGUOUS:
                return Verdict(True, REJECT, Kind.JOIN_COLLISION)
            backend = None if known is None else self.backend_of(known)
            if backend is not None:  # even to a drained backend: the connection lives there
                return self._join_to(backend, segment.flow, now)
            if hold:
                return Verdict(True, 0, Kind.JOIN_HELD)
            if service.unknown_join == "drop":
                return Verdict(False, 0, Kind.JOIN_MISS)
            if service.unknown_join == "reset":
                return Verdict(True, REJECT, Kind.JOIN_MISS)
            candidates = [b for b in service.backends if b.available] or service.backends
            backend = self.rng.choice(candidates)
            self.flows.put(segment.flow, backend.mark | JOIN, now)
            return Verdict(True, backend.mark | JOIN, Kind.JOIN_MISS)
        else:
            if cached is not None:
                return Verdict(True, cached, Kind.SYN_RETRANSMIT)
            backend = self._schedule(service, segment, now)
            if backend is None:
                return Verdict(True, REJECT, Kind.NO_BACKEND)
            kind = Kind.JOIN_UNAWARE if segment.join is not None else (
                Kind.MP_CAPABLE_SYN if segment.capable is not None else Kind.SYN)
            backend.active += 1
        # Only an MPTCP-aware service's MP_CAPABLE SYN leaves something to learn: any other
        # connection is settled from its SYN on, and nothing it sends later reaches the worker
        settled = 0 if kind is Kind.MP_CAPABLE_SYN and service.mptcp_aware else LEARNED
        self.flows.put(segment.flow, backend.mark | settled, now)
        return Verdict(True, backend.mark | settled, kind)

    def _join_to(self, backend: Backend, flow: tuple, now: float) -> Verdict:
        backend.subflows += 1
        self.flows.put(flow, backend.mark | JOIN, now)
        return Verdict(True, backend.mark | JOIN, Kind.JOIN_HIT)

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

    def _learn(self, key: bytes, version: int, flow: tuple, mark: int, now: float, kind: Kind) -> Verdict:
        """A server's key (kind SYN_ACK) or a client's echo of it (THIRD_ACK) on a connection
        whose SYN asked for MPTCP; see core.tokens for whom to believe."""
        if mark & LEARNED:  # a settled connection (its SYN was plain TCP) teaches nothing
            return Verdict(True, mark, Kind.OTHER)
        backend = self.backend_of(mark or self.flows.get(flow, now) or 0)
        if backend is None:
            return Verdict(True, mark, Kind.CAPABLE_WITHOUT_FLOW)  # e.g. opened while no worker listened
        service = self._service_at.get((flow[2], flow[3]))
        if service is not None and not service.mptcp_aware:
            return Verdict(True, backend.mark | LEARNED, kind)
        settled = backend.mark | LEARNED
        token = token_of_key(key, version)
        by_client = DISPLACEABLE if kind is Kind.THIRD_ACK else 0
        known = self.known_token(token, now)
        if known is None:
            if by_client:  # one packet, maybe spoofed: provisional
                self._hold_provisional(token, backend.mark | by_client, flow, now)
                return Verdict(True, settled | PROVISIONAL, kind, token, flow)
            if not self.tokens.add(token, backend.mark, now):
                return Verdict(True, settled, Kind.TOKEN_TABLE_FULL)
            self.newly_known.append(token)
            return Verdict(True, settled, kind, token, flow)
        if known == AMBIGUOUS:
            return Verdict(True, settled, Kind.TOKEN_COLLISION_REPEAT)
        ours = known & BACKEND_MASK == backend.mark
        if ours and known & INSTALL_PENDING:  # the last install failed: once more
            provisional = self.provisional.get(token, now) is not None
            (self.provisional if provisional else self.tokens).put(token, known & ~INSTALL_PENDING, now)
            retried = Kind.SYN_ACK if not known & DISPLACEABLE else \
                Kind.THIRD_ACK if provisional else Kind.TOKEN_PROVEN
            return Verdict(True, settled | (PROVISIONAL if provisional else 0), retried, token, flow)
        if by_client:
            return Verdict(True, settled, REPEATED[kind] if ours else Kind.TOKEN_REFUSED)
        if known & DISPLACEABLE:  # a server's word over a client's: the client's may be forged
            self._settle(token, backend.mark, now)
            return Verdict(True, settled, Kind.SYN_ACK_OVER_CLIENT, token, flow)
        if ours:  # already learned (SYN-ACK, then a racing ACK)
            return Verdict(True, settled, REPEATED[kind])
        # another connection, on another backend, has the same token
        self._settle(token, AMBIGUOUS, now)
        return Verdict(True, settled, Kind.TOKEN_COLLISION, token)

    def _prove(self, flow: tuple, mark: int, now: float) -> Verdict:
        """The connection that taught a provisional token sent its next MPTCP packet: the token
        is proven, if it is still there and there is room among the proven."""
        token = self.provisional_flows.get(flow, now)
        known = None if token is None else self.provisional.get(token, now)
        if known is None or self.backend_of(known) is None or self.tokens.get(token, now) is not None:
            return Verdict(True, mark, Kind.PROOF_WITHOUT_TOKEN)
        if not self.tokens.add(token, known & ~INSTALL_PENDING, now):
            return Verdict(True, mark, Kind.TOKEN_TABLE_FULL)  # provisional still, until it expires
        self.provisional.remove(token)
        self.provisional_flows.remove(flow)
        return Verdict(True, known & BACKEND_MASK | LEARNED, Kind.TOKEN_PROVEN, token, flow)
