"""Schedulers: which backend a new connection goes to. Pure; each picks among the candidates it is
given (the service's backends that are healthy, not drained and of weight > 0) for a connection
(anything with the `src`, `sport`, `dst`, `dport` of its first packet).

Each scheduler but lc also lays its choice out as a lookup table, which the kernel indexes with a
counter (`numgen inc`) or a hash (`jhash`) of the connection: the SYN is decided there, and the
core's own `pick` reads the same table the same way."""
from __future__ import annotations

import hashlib
from enum import StrEnum
from math import gcd
from typing import NamedTuple, Protocol, Sequence

from .jhash import flow_key, slot

SCHEDULERS = ("rr", "wrr", "lc", "sh", "maglev")
MAGLEV_DEFAULT_SIZE = 65537
MAGLEV_MAX_SIZE = 131071  # its table takes 0.16 s to build here; 1,000,003 took 1.4 s


class Candidate(Protocol):
    name: str
    weight: int
    active: int


class Flow(NamedTuple):
    """A connection as the schedulers see it (a parsed Segment fits as well)."""
    src: bytes
    sport: int
    dst: bytes
    dport: int


class Index(StrEnum):
    """How the kernel picks a slot of a scheduler's table."""
    COUNTER = "numgen"  # the next slot, connection after connection
    FLOW = "flow"  # a hash of the connection's addresses and ports
    SOURCE = "source"  # a hash of the client's address
    WORKER = "worker"  # no table: the SYN goes to the worker


class RoundRobin:
    index = Index.COUNTER

    def __init__(self, **_):
        self._next = 0

    def table(self, candidates: Sequence[Candidate]) -> list[int]:
        return list(range(len(candidates)))

    def pick(self, flow, candidates: Sequence[Candidate]) -> Candidate:
        backend = candidates[self._next % len(candidates)]
        self._next += 1
        return backend


class WeightedRoundRobin:
    """Smooth weighted round robin (as nginx): weights 5,1,1 give a a b a c a a, not a a a a a b c.
    The core walks the same period of the sequence the kernel's counter walks."""

    index = Index.COUNTER

    def __init__(self, **_):
        self._next = 0
        self._built_for: tuple | None = None
        self._table: list[int] = []

    def table(self, candidates: Sequence[Candidate]) -> list[int]:
        """One period of the sequence: the weights' sum over their greatest common divisor."""
        signature = tuple((b.name, b.weight) for b in candidates)
        if signature != self._built_for:
            weights = [b.weight for b in candidates]
            total, current, sequence = sum(weights), [0] * len(weights), []
            for _ in range(total // gcd(*weights)):
                current = [c + w for c, w in zip(current, weights)]
                best = max(range(len(weights)), key=lambda i: (current[i], -i))
                current[best] -= total
                sequence.append(best)
            self._table, self._built_for = sequence, signature
        return self._table

    def pick(self, flow, candidates: Sequence[Candidate]) -> Candidate:
        table = self.table(candidates)
        backend = candidates[table[self._next % len(table)]]
        self._next += 1
        return backend


class LeastConnections:
    """IPVS wlc: the fewest active connections per unit of weight; ties go round robin. No table:
    the counts change with every connection, so its SYNs go to the worker."""
    index = Index.WORKER

    def __init__(self, **_):
        self._turn = 0

    def pick(self, flow, candidates: Sequence[Candidate]) -> Candidate:
        self._turn += 1
        n = len(candidates)
        order = [candidates[(self._turn + i) % n] for i in range(n)]
        return min(order, key=lambda b: b.active / b.weight)


def is_prime(n: int) -> bool:
    return n >= 2 and not any(n % d == 0 for d in range(2, int(n ** 0.5) + 1))


def _hash64(data: bytes, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "big")


class Maglev:
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016) of the connection's 5-tuple.

    A lookup table of prime size M is filled by the backends' permutations, in turns weighted by
    their weights; removing one of N backends moves about 1/N of the keys.
    """
    index = Index.FLOW

    def __init__(self, table_size: int = MAGLEV_DEFAULT_SIZE, **_):
        if not is_prime(table_size):
            raise ValueError(f"maglev table size {table_size} is not a prime")
        self.size = table_size
        self._built_for: tuple | None = None
        self._table: list[int] = []

    def _build(self, candidates: Sequence[Candidate]) -> None:
        m = self.size
        names = [b.name.encode() for b in candidates]
        offsets = [_hash64(n, b"offset") % m for n in names]
        skips = [_hash64(n, b"skip") % (m - 1) + 1 for n in names]
        weights = [b.weight for b in candidates]
        top = max(weights)
        following = [0] * len(names)
        table = [-1] * m
        filled = 0
        credit = [0] * len(names)
        while True:
            for i in range(len(names)):
                credit[i] += weights[i]
                if credit[i] < top:
                    continue  # a lighter backend takes a turn only every top/weight rounds
                credit[i] -= top
                slot = (offsets[i] + following[i] * skips[i]) % m
                while table[slot] >= 0:
                    following[i] += 1
                    slot = (offsets[i] + following[i] * skips[i]) % m
                table[slot] = i
                following[i] += 1
                filled += 1
                if filled == m:
                    self._table = table
                    return

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        """Build the table for these candidates unless it is built: off the packet path, when
        the backends' state changes, so that no SYN waits for it."""
        signature = tuple((b.name, b.weight) for b in candidates)
        if signature != self._built_for and candidates:
            self._build(candidates)
            self._built_for = signature

    def table(self, candidates: Sequence[Candidate]) -> list[int]:
        self.prepare(candidates)
        return self._table

    def key(self, flow) -> bytes:
        return flow_key(flow.src, flow.sport, flow.dst, flow.dport)

    def pick(self, flow, candidates: Sequence[Candidate]) -> Candidate:
        self.prepare(candidates)
        return candidates[self._table[slot(self.key(flow), self.size)]]


class SourceHash(Maglev):
    """IPVS sh: the client address alone picks the backend (stateless affinity), through a
    Maglev table, so that a backend's going moves only its own clients."""
    index = Index.SOURCE

    def key(self, flow) -> bytes:
        return flow.src


def make_scheduler(name: str, maglev_size: int = MAGLEV_DEFAULT_SIZE):
    return {"rr": RoundRobin, "wrr": WeightedRoundRobin, "lc": LeastConnections, "sh": SourceHash,
            "maglev": Maglev}[name](table_size=maglev_size)
