"""What balancers of one cluster tell each other, as pure data: the tokens each learned and the
join subflows each steered, by backend name (marks are local), and the tokens whose connections
ended; and where each balancer keeps them in Redis. Encoded as the text fields of a Redis stream
entry or hash; whatever is read back is untrusted: it is parsed strictly, and an entry that is
malformed or names a backend this balancer does not know is counted and dropped, never
installed. Who said something is where it is written (a prefix only its author's Redis user may
write), never what the entry claims."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

from .tokens import flow_comment, flow_of_comment

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOKEN = re.compile(r"[0-9a-f]{8}")
MILLIS = re.compile(r"[0-9]{1,15}")  # Unix milliseconds, ASCII digits only (str.isdigit takes "²")
FINGERPRINT = re.compile(r"[0-9a-f]{12}")
MAX_ITEMS = 100_000  # in one field: more is not a batch a balancer writes
MAX_PEERS = 64  # heartbeats read: their names become metric labels
MAX_DOWN = 4096  # backends a heartbeat may say are down (kernel.max_backends's highest)
MAX_HEARTBEAT = 128 + 70 * MAX_DOWN  # bytes: a balancer's is under 128, and at most 70 more per backend down
MAX_SUBFLOWS = 8  # join subflows kept per connection (Linux opens at most 8): more are a client's replays


@dataclass
class Batch:
    """One balancer's news: token -> backend, join subflow (client -> VIP) -> (token, backend),
    tokens whose connection ended; `at`: when the oldest of it was learned (Unix seconds);
    `connections`: token -> its connection's first flow, where known (a peer that finds the
    connection in its own conntrack when the teacher ends the token takes it over)."""
    origin: str
    at: float
    tokens: dict[int, str] = field(default_factory=dict)
    subflows: dict[tuple, tuple[int, str]] = field(default_factory=dict)
    ended: list[int] = field(default_factory=list)
    connections: dict[int, tuple] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tokens or self.subflows or self.ended)


class Keys:
    """Where a cluster's balancers keep their news in Redis: five keys each, under
    mplb:CLUSTER:lb:BALANCER:, a prefix that only its own ACL user may write
    (deploy/cluster/redis-acl.conf):
      news      stream: its batches (encode), which its peers follow
      tokens    hash: TOKEN -> its record (record), until its connection ends
      subflows  hash: TOKEN -> the join subflows it steered on TOKEN's connection (record_subflows)
      beat      its heartbeat (config fingerprint, counts), for a few seconds
      following set: the peers whose news it follows (a peer announces once all follow it)
    A handful of keys per balancer, whatever the number of connections: finding the peers (SCAN)
    stays cheap."""
    KINDS = ("news", "tokens", "subflows", "beat", "following")

    def __init__(self, cluster: str):
        self.root = f"mplb:{cluster}:lb:"

    def of(self, balancer: str, kind: str) -> str:
        return f"{self.root}{balancer}:{kind}"

    def every(self, kind: str) -> str:
        """The SCAN pattern of every balancer's `kind` key."""
        return f"{self.root}*:{kind}"

    def balancer_of(self, key: str, kind: str) -> str | None:
        """The balancer whose `kind` key this is; None for anything else."""
        name = key.removeprefix(self.root).removesuffix(f":{kind}")
        return name if key == self.of(name, kind) and NAME.fullmatch(name) else None


def encode(batch: Batch) -> dict[str, str]:
    """A stream entry's fields (its origin is the stream's owner)."""
    fields = {"at": str(int(batch.at * 1000))}
    if batch.tokens:
        fields["t"] = " ".join(_token_item(t, b, batch.connections.get(t)) for t, b in batch.tokens.items())
    if batch.subflows:
        fields["s"] = " ".join(f"{flow_comment(f)}={t:08x}={b}" for f, (t, b) in batch.subflows.items())
    if batch.ended:
        fields["d"] = " ".join(f"{t:08x}" for t in batch.ended)
    return fields


def decode(fields: Mapping[str, str], origin: str, rejected: Counter[str]) -> Batch | None:
    """An entry of `origin`'s stream back to a Batch; its malformed items (or the whole entry)
    counted in `rejected` by reason and left out."""
    at = fields.get("at", "")
    if not MILLIS.fullmatch(at):
        rejected["malformed"] += 1
        return None
    batch = Batch(origin, int(at) / 1000)
    for item in _items(fields.get("t", ""), rejected):
        _read_token(item, batch, rejected)
    for item in _items(fields.get("s", ""), rejected):
        parts = item.split("=")
        flow = flow_of_comment(parts[0]) if len(parts) == 3 else None
        if flow is not None and TOKEN.fullmatch(parts[1]) and NAME.fullmatch(parts[2]):
            batch.subflows[flow] = (int(parts[1], 16), parts[2])
        else:
            rejected["malformed"] += 1
    for item in _items(fields.get("d", ""), rejected):
        if TOKEN.fullmatch(item):
            batch.ended.append(int(item, 16))
        else:
            rejected["malformed"] += 1
    return batch


def _token_item(token: int, backend: str, connection: tuple | None) -> str:
    return f"{token:08x}={backend}" + (f"={flow_comment(connection)}" if connection else "")


def _read_token(item: str, batch: Batch, rejected: Counter[str]) -> bool:
    """TOKEN=BACKEND[=FLOW] into `batch`; False when malformed (and counted)."""
    parts = item.split("=")
    connection = flow_of_comment(parts[2]) if len(parts) == 3 else None
    if not 2 <= len(parts) <= 3 or not TOKEN.fullmatch(parts[0]) or not NAME.fullmatch(parts[1]) or \
            (len(parts) == 3 and connection is None):
        rejected["malformed"] += 1
        return False
    token = int(parts[0], 16)
    batch.tokens[token] = parts[1]
    if connection is not None:
        batch.connections[token] = connection
    return True


def _items(text: str, rejected: Counter[str]) -> list[str]:
    items = text.split()
    if len(items) > MAX_ITEMS:
        rejected["malformed"] += len(items)
        return []
    return items


def record(backend: str, at: float, connection: tuple | None = None) -> str:
    """A token as its teacher keeps it (for a balancer that catches up): when it was learned, its
    backend and its connection's first flow, where known."""
    return f"{int(at * 1000)} {backend}" + (f"={flow_comment(connection)}" if connection else "")


def record_subflows(subflows: Mapping[tuple, str]) -> str:
    """The join subflows (flow -> backend) a balancer steered on one connection."""
    return " ".join(f"{flow_comment(flow)}={backend}" for flow, backend in subflows.items())


def from_kept(origin: str, tokens: Mapping[str, str], subflows: Mapping[str, str], rejected: Counter[str]) -> Batch:
    """Fields of what `origin` keeps in Redis (its tokens hash: record; its subflows hash:
    record_subflows), as one Batch; the malformed counted and left out."""
    batch = Batch(origin, float("inf"))
    for token, kept in tokens.items():
        at, _, item = kept.partition(" ")
        if not MILLIS.fullmatch(at):
            rejected["malformed"] += 1
            continue
        if _read_token(f"{token}={item}", batch, rejected):
            batch.at = min(batch.at, int(at) / 1000)
    for token, kept in subflows.items():
        items = kept.split()
        if not TOKEN.fullmatch(token) or len(items) > MAX_SUBFLOWS:
            rejected["malformed"] += 1
            continue
        for item in items:
            comment, _, backend = item.partition("=")
            flow = flow_of_comment(comment)
            if flow is None or not NAME.fullmatch(backend):
                rejected["malformed"] += 1
                continue
            batch.subflows[flow] = (int(token, 16), backend)
    if batch.at == float("inf"):
        batch.at = 0.0
    return batch


def entry_id(text: str) -> tuple[int, int]:
    """A stream entry's ID (MILLISECONDS-SEQUENCE) as a pair that orders like Redis orders them."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def resume_from(last: str | None, oldest: str | None, newest: str | None) -> tuple[str, bool]:
    """Where a follower of a peer's stream goes on after (re)connecting, and whether it must catch
    up from what the peer keeps first. It goes on after the last entry it read, so that what the
    peer published meanwhile (ends too) still comes, unless the stream no longer holds what
    followed that entry: trimmed, or Redis came back without it. A peer met for the first time is
    caught up from what it keeps (its live tokens and subflows, not its history: a replayed
    subflow of an ended connection would stand in the way of a new one on the same four-tuple),
    then followed from its newest entry."""
    if last is not None and oldest is not None and entry_id(oldest) <= entry_id(last) <= entry_id(newest):
        return last, False
    return newest or "0-0", True


def peer_comment(origin: str, connection: tuple | None) -> str:
    """The comment of a kernel map element a peer taught: a restarted worker reads who it was
    and, where the comment has room for it, the connection's first flow."""
    return f"peer {origin}" + (f" {flow_comment(connection)}" if connection else "")


def teacher_of(comment: str | None) -> tuple[str, tuple | None] | None:
    """The peer a map element's comment names and its connection (or None), or None."""
    kind, origin, connection = ((comment or "").split(" ", 2) + ["", ""])[:3]
    if kind != "peer" or not NAME.fullmatch(origin):
        return None
    return origin, flow_of_comment(connection)


@dataclass(frozen=True)
class Checked:
    """The backends a balancer's own health checks see down, from its worker to its link (None:
    it abstains, core.backend_view)."""
    down: frozenset[str] | None


class Beat(NamedTuple):
    """A peer's heartbeat, read: its config's fingerprint, when it beat (Unix seconds), and the
    backends its own health checks see down (None: it abstains, or is of a version that does not vote)."""
    fingerprint: str
    at: float
    down: frozenset[str] | None = None


def heartbeat(fingerprint: str, published: int, at: float, down: Iterable[str] | None = None) -> str:
    """A balancer's heartbeat value: its config's fingerprint, what it published, when (Unix
    seconds), and the backends its own checks see down (its vote in the cluster's view of them;
    None: it abstains)."""
    return json.dumps({"fingerprint": fingerprint, "published": published, "at": int(at * 1000),
                       "down": None if down is None else sorted(down)})


def peer_beats(beats: Iterable[tuple[str, str | None]], rejected: Counter[str]) -> dict[str, Beat]:
    """(name, heartbeat value) as read from Redis -> name: Beat, at most MAX_PEERS of them; a
    malformed one is counted in `rejected` and left out."""
    peers = {}
    for name, value in beats:
        try:
            if len(value or "") > MAX_HEARTBEAT:  # "[" * 100000 would reach json's recursion limit
                raise ValueError("too long")
            beat = json.loads(value or "")
            fingerprint, at, down = beat["fingerprint"], beat["at"], beat.get("down")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            fingerprint = at = down = None
        if (not NAME.fullmatch(name) or not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint)
                or type(at) is not int or not 0 <= at < 10 ** 15 or len(peers) >= MAX_PEERS
                or not (down is None or isinstance(down, list) and len(down) <= MAX_DOWN
                        and all(isinstance(d, str) and NAME.fullmatch(d) for d in down))):
            rejected["malformed"] += 1
            continue
        peers[name] = Beat(fingerprint, at / 1000, None if down is None else frozenset(down))
    return peers


def accepted(batch: Batch, backends: Mapping[str, int], services: Iterable[tuple[bytes, int]],
             rejected: Counter[str]) -> Batch:
    """Of a peer's batch, what names a backend this balancer has (`backends`: name -> mark) and,
    for subflows, a VIP . port it serves; a connection's flow only when both its ends are of one
    family (no packet has two: conntrack would be asked for a flow it cannot hold); the rest
    counted in `rejected` by reason."""
    served = set(services)
    tokens = {}
    for token, backend in batch.tokens.items():
        if backend in backends:
            tokens[token] = backend
        else:
            rejected["unknown_backend"] += 1
    subflows = {}
    for flow, (token, backend) in batch.subflows.items():
        if backend not in backends:
            rejected["unknown_backend"] += 1
        elif (flow[2], flow[3]) not in served or len(flow[0]) != len(flow[2]):
            rejected["unknown_service"] += 1
        else:
            subflows[flow] = (token, backend)
    connections = {}
    for token, flow in batch.connections.items():
        if token not in tokens:
            continue
        if len(flow[0]) != len(flow[2]):
            rejected["malformed"] += 1
        else:
            connections[token] = flow
    return Batch(batch.origin, batch.at, tokens, subflows, list(batch.ended), connections)


class Subflows:
    """Join subflows by connection (token): each flow once, under one token, at most MAX_SUBFLOWS
    a connection, so that SYNs a client repeats or forges with a known token cannot grow what
    balancers publish and install."""

    def __init__(self):
        self.of: dict[int, set[tuple]] = {}
        self.token_of: dict[tuple, int] = {}

    def add(self, flow: tuple, token: int) -> str | None:
        """None when taken; else why not: "known" (the same flow and token again), "conflict" (the
        flow is another token's), "full" (its connection has MAX_SUBFLOWS already)."""
        held = self.token_of.get(flow)
        if held is not None:
            return "known" if held == token else "conflict"
        flows = self.of.setdefault(token, set())
        if len(flows) >= MAX_SUBFLOWS:
            return "full"
        flows.add(flow)
        self.token_of[flow] = token
        return None

    def end(self, tokens: Iterable[int]) -> list[tuple]:
        """The subflows of connections that ended, forgotten."""
        flows = [flow for token in tokens for flow in self.of.get(token, ())]
        self.discard(flows)
        return flows

    def discard(self, flows: Iterable[tuple]) -> None:
        for flow in flows:
            token = self.token_of.pop(flow, None)
            if token is not None:
                self.of[token].discard(flow)
                if not self.of[token]:
                    del self.of[token]

    def __len__(self) -> int:
        return len(self.token_of)


def fingerprint(description: object) -> str:
    """A short digest of what makes two balancers decide alike (services, backends, weights):
    peers compare theirs to see a config that drifted."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
