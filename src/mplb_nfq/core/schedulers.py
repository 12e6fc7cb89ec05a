"""Schedulers: which backend a new connection goes to. Pure; each picks among the candidates it is
given (the service's backends that are healthy, not drained and of weight > 0) for a connection
(anything with the `src`, `sport`, `dst`, `dport` of its first packet).

Each scheduler but lc also lays its choice out as a lookup table, which the kernel indexes with a
counter (`numgen inc`) or a hash (`jhash`) of the connection: the SYN is decided there, and the
core's own `pick` reads the same table the same way."""
from __future__ import annotations

import bisect
import hashlib
import itertools
from enum import StrEnum
from math import gcd
from typing import NamedTuple, Protocol, Sequence

from .jhash import flow_key, slot

SCHEDULERS = ("rr", "wrr", "lc", "sh", "maglev")
MAGLEV_DEFAULT_SIZE = 65537
MAGLEV_MAX_SIZE = 131071  # its table takes 0.16 s to build here; 1,000,003 took 1.4 s
VIRTUAL_PER_BACKEND = 256  # a Maglev table's virtual backends per backend...
VIRTUAL_BACKENDS = 8192  # ...and per table: beyond 32 backends each has fewer (a failure's work stays bounded)
HEIR_DRAWS = 32  # draws for a gone backend's virtual backend, then the first candidate by its number


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

    Given the service's backends, the table is built for all of them (weight > 0), up or down,
    and its slots hold virtual backends: each backend's slots go in turn to its
    VIRTUAL_PER_BACKEND virtual ones. A second, small table gives each virtual backend its
    backend: its own while that one takes new connections, else its heir: the first of a
    sequence of backends drawn by weight (fixed for each virtual backend) that takes new
    connections, so each takes a share of a gone backend by its weight, and another backend's
    going moves none but its own. A backend that goes or comes rewrites its virtual backends'
    entries, a few hundred, not the third of the M slots a table built again would change;
    exactly its own keys move.
    """
    index = Index.FLOW

    def __init__(self, table_size: int = MAGLEV_DEFAULT_SIZE, backends: Sequence[Candidate] | None = None, **_):
        if not is_prime(table_size):
            raise ValueError(f"maglev table size {table_size} is not a prime")
        self.size = table_size
        self.backends = backends  # the service's, up or down (None: the table follows the candidates)
        self._built_for: tuple | None = None
        self._table: list[int] = []
        self._names: list[str] = []  # the backends the table was built for, and their weights summed in turn
        self._per_backend = 1  # virtual backends each (virtual // _per_backend: its backend's index)
        self._cumulative: list[int] = []
        self._via_for: tuple | None = None
        self._via: list[int] = []

    def _build(self, built: Sequence[Candidate]) -> None:
        m = self.size
        names = [b.name.encode() for b in built]
        per_backend = max(1, min(VIRTUAL_PER_BACKEND, VIRTUAL_BACKENDS // len(built), m // len(built))) \
            if self.backends is not None else 1
        offsets = [_hash64(n, b"offset") % m for n in names]
        skips = [_hash64(n, b"skip") % (m - 1) + 1 for n in names]
        weights = [b.weight for b in built]
        top = max(weights)
        following = [0] * len(names)
        table = [-1] * m
        filled = 0
        credit = [0] * len(names)
        taken = [0] * len(names)
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
                table[slot] = i * per_backend + taken[i] % per_backend
                taken[i] += 1
                following[i] += 1
                filled += 1
                if filled == m:
                    self._table = table
                    self._names, self._cumulative = [b.name for b in built], list(itertools.accumulate(weights))
                    self._per_backend = per_backend
                    return

    def _built(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        return candidates if self.backends is None else [b for b in self.backends if b.weight > 0]

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        """Build the tables for these candidates unless they are built: off the packet path, when
        the backends' state changes, so that no SYN waits for them."""
        built = self._built(candidates)
        signature = tuple((b.name, b.weight) for b in built)
        if signature != self._built_for and built:
            self._build(built)
            self._built_for, self._via_for = signature, None
        if self._via_for != (signature, tuple(b.name for b in candidates)) and candidates:
            self._via = self._virtual_to_candidates(candidates)
            self._via_for = (signature, tuple(b.name for b in candidates))

    def _virtual_to_candidates(self, candidates: Sequence[Candidate]) -> list[int]:
        index = {b.name: i for i, b in enumerate(candidates)}
        via = []
        for virtual in range(len(self._names) * self._per_backend):
            own = index.get(self._names[virtual // self._per_backend])
            via.append(own if own is not None else self._heir(virtual, index))
        return via

    def _heir(self, virtual: int, index: dict[str, int]) -> int:
        total = self._cumulative[-1]
        for draw in range(HEIR_DRAWS):
            h = _hash64(virtual.to_bytes(4, "big") + draw.to_bytes(2, "big"), b"heir")
            i = index.get(self._names[bisect.bisect_right(self._cumulative, h % total)])
            if i is not None:
                return i
        return virtual % len(index)  # next to none take new connections

    def table(self, candidates: Sequence[Candidate]) -> list[int]:
        """slot -> virtual backend."""
        self.prepare(candidates)
        return self._table

    def virtual_backends(self, candidates: Sequence[Candidate]) -> list[int]:
        """virtual backend -> index in candidates."""
        self.prepare(candidates)
        return self._via

    def key(self, flow) -> bytes:
        return flow_key(flow.src, flow.sport, flow.dst, flow.dport)

    def pick(self, flow, candidates: Sequence[Candidate]) -> Candidate:
        self.prepare(candidates)
        return candidates[self._via[self._table[slot(self.key(flow), self.size)]]]


class SourceHash(Maglev):
    """IPVS sh: the client address alone picks the backend (stateless affinity), through a
    Maglev table, so that a backend's going moves only its own clients."""
    index = Index.SOURCE

    def key(self, flow) -> bytes:
        return flow.src


def make_scheduler(name: str, maglev_size: int = MAGLEV_DEFAULT_SIZE, backends: Sequence[Candidate] | None = None):
    return {"rr": RoundRobin, "wrr": WeightedRoundRobin, "lc": LeastConnections, "sh": SourceHash,
            "maglev": Maglev}[name](table_size=maglev_size, backends=backends)
