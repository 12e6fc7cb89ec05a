"""The worker's side of a cluster: what it learned and steered goes to the link (ops/link.py),
what peers learned and steered comes into its kernel maps and its core. A peer's word is
untrusted: what names a backend or a service this balancer does not have is counted, not
installed; a token this balancer knows already keeps what it knows; a peer may end only the
tokens it taught. A token lives as long as its connection anywhere in the cluster: when its
teacher's conntrack entry goes (the router moved the flow elsewhere, or it ended), the balancer
whose conntrack has the connection takes the token over and teaches it from then on."""
from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque

from ..core.balancer import Balancer
from ..core.news import MAX_PEERS, Batch, Subflows, accepted, teacher_of
from ..core.marks import JOIN, LEARNED
from .counters import Histogram
from .link import LinkState, PeerNews
from .logs import ThrottledLog
from .tokenstore import TokenStore

# A starting balancer announces its VIPs once it has caught up from Redis (a flow the router moves
# to it then finds its join subflows), or after this long without Redis: then it balances alone
CATCH_UP_SECONDS = 5.0
DELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)
# News older than this is a republication after an outage, a peer's clock far off, or a hostile
# entry: not a propagation delay (one would fill the histogram's sum and the status's p99)
PLAUSIBLE_DELAY_SECONDS = 300.0
GAVE_UP_KEPT = 4096  # tokens a held join gave up on, kept to see whether a peer brings them after all


class Peers:
    def __init__(self, name: str, balancer: Balancer, dataplane, tokens: TokenStore, errors: ThrottledLog):
        """tokens: where peers' tokens go (the token state's one writer); dataplane: the subflow maps."""
        self.name, self.balancer, self.dataplane, self.tokens, self.errors = name, balancer, dataplane, tokens, errors
        self.outgoing = Batch(name, time.time())
        self.fingerprint = ""  # of the config in force, as the link last heard it
        self.announced: bool | None = None  # the VIPs' route (None: no announcement device)
        self.started = time.monotonic()
        self.ready = False  # to announce: once true, for good
        self.taught: dict[int, str] = {}  # token -> the peer that taught it
        self.connection_of: dict[int, tuple] = {}  # a peer's token -> its connection's first flow, where known
        self.handed_over: set[int] = set()  # ended by their teacher: is the connection here?
        self.published = Subflows()  # the join subflows this balancer steered and told its peers
        self.installed = Subflows()  # those its peers steered, in the kernel's subflow map
        self.stats: Counter[str] = Counter(joins_crossed=0, held_for_peer=0, tokens_after_held_joins_gave_up=0,
                                           subflows_installed=0, subflows_not_published=0)
        self.gave_up: OrderedDict[int, float] = OrderedDict()  # token -> when a join held for it gave up
        self.rejected: Counter[str] = Counter()
        self.received: Counter[str] = Counter()  # items installed, per peer
        self.state: LinkState | None = None
        self.delays = Histogram(DELAY_BUCKETS)
        self.recent_delays: deque[float] = deque(maxlen=4096)  # for the percentiles `status` shows

    # -- out ----------------------------------------------------------------------------------
    def learned(self, tokens: dict[int, int], connections: dict[int, tuple]) -> None:
        """Tokens this balancer put in its kernel map (token -> mark), with their connections'
        first flows (token -> flow) where known."""
        for token, mark in tokens.items():
            backend = self.balancer.backend_of(mark)
            if backend is not None:
                self._starting()
                self.outgoing.tokens[token] = backend.name
                if token in connections:
                    self.outgoing.connections[token] = connections[token]

    def steered(self, flow: tuple, token: int, mark: int, held: bool = False) -> None:
        """A join this balancer steered (held: after waiting for its token): should the router
        move it, a peer keeps its backend."""
        if held and self.taught.get(token, self.name) != self.name:
            self.stats["held_for_peer"] += 1
        backend = self.balancer.backend_of(mark)
        if backend is None:
            return
        if self.published.add(flow, token):  # a repeated SYN, or more than a connection opens
            self.stats["subflows_not_published"] += 1
            return
        self._starting()
        self.outgoing.subflows[flow] = (token, backend.name)
        if self.taught.get(token, self.name) != self.name:
            self.stats["joins_crossed"] += 1  # its connection came through another balancer

    def ended(self, tokens: list[int]) -> None:
        """Connections this balancer taught are gone: peers take their tokens out."""
        self.outgoing.ended += tokens
        self.published.end(tokens)
        self._drop_subflows(tokens)

    def _starting(self) -> None:
        """A batch is as old as its oldest news: the receiver's propagation delay starts there."""
        if not self.outgoing.tokens and not self.outgoing.subflows:
            self.outgoing.at = time.time()

    def flush(self, link) -> None:
        if self.outgoing:
            link.send(self.outgoing)
            self.outgoing = Batch(self.name, time.time())

    # -- in -----------------------------------------------------------------------------------
    def news(self, news: PeerNews) -> None:
        backends = {b.name: b.mark for b in self.balancer.backends}
        served = [(vip, port) for s in self.balancer.services for vip in s.vips for port in s.ports]
        batch = accepted(news.batch, backends, served, self.rejected)
        now = time.perf_counter()
        installed = self.tokens.from_peer([(token, backends[name]) for token, name in batch.tokens.items()],
                                          batch.origin, batch.connections)
        for token in installed:
            self._taught_by(token, batch.origin, batch.connections.get(token))
        for token in self.handed_over.intersection(batch.tokens).difference(installed):
            if self._backend(token) == batch.tokens[token]:  # its teacher ended it: the peer it moved to took it over
                self._taught_by(token, batch.origin, batch.connections.get(token))
        late = [(token, self.gave_up.pop(token)) for token in installed if token in self.gave_up]
        if late:
            self.stats["tokens_after_held_joins_gave_up"] += len(late)
            self.errors.error("late-token", f"{len(late)} tokens from {batch.origin} came after a join held for "
                                            f"them took the unknown-join policy (the last "
                                            f"{(time.monotonic() - late[-1][1]) * 1000:.0f} ms after): a join "
                                            f"waits hold_ms for its token")
        if installed and (batch.origin in self.received or len(self.received) < MAX_PEERS):  # a metric label each
            self.received[batch.origin] += len(installed)
        subflows = {}
        if batch.origin != self.name:  # (this balancer's own, read back: conntrack has them)
            for flow, (token, name) in batch.subflows.items():
                why_not = self.installed.add(flow, token)
                if why_not is None:
                    subflows[flow] = (token, backends[name] | JOIN)
                elif why_not != "known":
                    self.rejected[f"subflow_{why_not}"] += 1
        if subflows:
            try:
                self.dataplane.add_subflows([(flow, mark | LEARNED) for flow, (_, mark) in subflows.items()])
            except Exception as e:
                self.errors.error("peer-subflows", f"installing {len(subflows)} subflows from {batch.origin} "
                                                   f"failed: {e}")
                self.installed.discard(subflows)  # not in the kernel: a later copy may try again
            else:
                for flow, (token, mark) in subflows.items():
                    self.balancer.flows.put(flow, mark, now)  # its first ACK may reach the worker
                self.stats["subflows_installed"] += len(subflows)
        ended = [t for t in batch.ended if self.taught.get(t) == batch.origin]
        handed = [(token, self.connection_of[token]) for token in ended if token in self.connection_of]
        if handed:  # kept until this balancer's conntrack says whether the connection is here
            self.tokens.hand_over(handed)
            self.handed_over.update(token for token, _ in handed)
        self._end([token for token in ended if token not in self.connection_of], batch.origin)
        delay = max(0.0, time.time() - batch.at)
        if not news.resync and (batch.tokens or batch.subflows) and delay <= PLAUSIBLE_DELAY_SECONDS:
            self.delays.observe(delay)
            self.recent_delays.append(delay)

    def gave_up_on(self, token: int) -> None:
        """A join held for this token took the unknown-join policy: should a peer's news bring
        the token after all, it came too late for that join (counted, and logged)."""
        self.gave_up[token] = time.monotonic()
        self.gave_up.move_to_end(token)
        if len(self.gave_up) > GAVE_UP_KEPT:
            self.gave_up.popitem(last=False)

    def handed_over_found(self, here: list[int], elsewhere: list[int]) -> None:
        """What this balancer's conntrack says of the tokens their teachers ended: a connection
        here is this balancer's to teach from now on; one that is not has ended (unless a peer
        took its token over meanwhile)."""
        moved = {token: flow for token in here
                 if token in self.handed_over and (flow := self.connection_of.get(token)) is not None}
        for token, mark in self.tokens.take_over(moved).items():
            self._starting()
            self.outgoing.tokens[token] = self.balancer.backend_of(mark).name
            self.outgoing.connections[token] = moved[token]
            self.taught.pop(token, None)
            self.connection_of.pop(token, None)
        self.handed_over.difference_update(here)
        gone = [token for token in elsewhere if token in self.handed_over]
        self.handed_over.difference_update(gone)
        self._end(gone, None)

    def _end(self, tokens: list[int], origin: str | None) -> None:
        """Tokens whose connection ended (origin: the peer that said so, if one did)."""
        if not tokens:
            return
        self.tokens.ended_by_peer(tokens, origin or "its teacher")
        for token in tokens:
            self.taught.pop(token, None)
            self.connection_of.pop(token, None)
        if self.published.end(tokens):  # the joins this balancer steered on them: out of Redis too
            self.outgoing.ended += tokens
        self._drop_subflows(tokens)

    def _taught_by(self, token: int, origin: str, connection: tuple | None) -> None:
        self.taught[token] = origin
        self.handed_over.discard(token)
        if connection is not None:
            self.connection_of[token] = connection

    def _backend(self, token: int) -> str | None:
        mark = self.balancer.known_token(token, time.perf_counter())
        backend = self.balancer.backend_of(mark) if mark is not None else None
        return backend.name if backend else None

    def adopted(self, token: int, comment: str | None) -> None:
        """A token a restarted worker found in the kernel map: if a peer taught it, that peer's
        end of it still takes it out (or hands it over)."""
        teacher = teacher_of(comment)
        if teacher is not None:
            self._taught_by(token, *teacher)

    def _drop_subflows(self, tokens: list[int]) -> None:
        flows = self.installed.end(tokens)
        if flows:
            try:
                self.dataplane.delete_subflows(flows)
            except Exception as e:
                self.errors.error("peer-subflows", f"deleting {len(flows)} subflows failed: {e}")

    def ready_to_announce(self) -> bool:
        """Once caught up from Redis and followed by every peer that beats (a join that reaches a
        peer then finds this balancer's tokens there), or after CATCH_UP_SECONDS without that; and
        from then on: a peer that starts later must not make a running balancer withdraw."""
        self.ready = self.ready or (self.state is not None and self.state.resyncs > 0 and self.state.followed) \
            or time.monotonic() - self.started > CATCH_UP_SECONDS
        return self.ready

    def votes(self) -> list[frozenset[str]] | None:
        """The backends each peer sees down, of the peers whose heartbeat is in Redis, whose
        config decides as this one's (a peer's of another config may name other backends) and
        that do not abstain; None while the link does not reach Redis: this balancer then goes
        by its own checks."""
        if self.state is None or not self.state.connected:
            return None
        return [frozenset(peer["down"]) for peer in self.state.peers.values()
                if peer["fingerprint"] == self.fingerprint and peer["down"] is not None]

    def report(self) -> dict:
        state = self.state
        return {"balancer": self.name, "announced": self.announced, "fingerprint": self.fingerprint,
                "redis": "connected" if state and state.connected else "down",
                "error": state.error if state else "starting", "published": state.published if state else 0,
                "received": dict(self.received), "peers": state.peers if state else {},
                "rejected": {**self.rejected, **(state.rejected if state else {})},
                "resyncs": state.resyncs if state else 0, "outages": state.outages if state else 0,
                **self.stats, "tokens_received": sum(self.received.values()), "peer_tokens": len(self.taught),
                **self.propagation_ms()}

    def propagation_ms(self) -> dict:
        """From a peer's learning to this balancer's kernel map, over the last batches received."""
        delays = sorted(self.recent_delays.copy())  # a copy is atomic: the metrics thread reads it too
        if not delays:
            return {"propagation_ms_p50": None, "propagation_ms_p99": None}
        return {"propagation_ms_p50": round(delays[len(delays) // 2] * 1000, 2),
                "propagation_ms_p99": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000, 2)}
