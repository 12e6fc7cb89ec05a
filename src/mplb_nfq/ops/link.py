"""The cluster link: a process of its own between the worker and Redis, so that nothing Redis does
(slow, gone, restarting) ever waits in the worker's loop.

Each balancer writes under its own prefix in Redis (core.news.Keys), with a user of its own
that may write nothing else: its news stream, its tokens (each until its connection ends), the
subflows it steered and its heartbeat. The link
publishes the worker's news in batches, follows every peer's stream, catches up from a peer's
hashes when it meets the peer or cannot go on where it left its stream, and publishes again what
this balancer holds after an outage. Both directions are plain data over a pipe (Batch, LinkState).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..core.news import (
    MAX_HEARTBEAT,
    MAX_PEERS,
    Batch,
    Checked,
    Keys,
    decode,
    encode,
    from_kept,
    heartbeat,
    peer_beats,
    record,
    record_subflows,
    resume_from,
)
from ..core.settings import ClusterConfig, sentinel_set, uses_tls
from ..kernel.process import die_with_parent

log = logging.getLogger("mplb_nfq.cluster")
STREAM_LENGTH = 100_000  # batches kept in the stream (about): a peer that falls further behind catches up
HEARTBEAT_SECONDS, HEARTBEAT_TTL = 2.0, 10
LOOK_SECONDS = 0.5  # how often the links look for a balancer they have not met, and read the peers' heartbeats
READ_ENTRIES = 100  # entries of a stream read at once (each up to MAX_ITEMS items: a reply stays bounded)
STATE_SECONDS = 1.0
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)
SCAN_CHUNK = 500
ENDED_KEPT = 1_000_000  # tokens ended while Redis was away, to delete once it is back
RESTART_SECONDS = 1.0  # a link process that died is started again this long after


@dataclass(frozen=True)
class PeerNews:
    """To the worker: a peer's batch (resync: read back from the hashes on (re)connecting)."""
    batch: Batch
    resync: bool = False


@dataclass(frozen=True)
class LinkState:
    """To the worker, every second: how the link is doing."""
    connected: bool
    published: int
    received: dict[str, int]
    rejected: dict[str, int]
    peers: dict[str, dict]
    error: str | None
    resyncs: int
    outages: int
    followed: bool = False  # every peer with a heartbeat follows this balancer's news


@dataclass
class Own:
    """What this balancer published and still holds: published again after an outage."""
    tokens: dict[int, tuple[str, float, tuple | None]] = field(default_factory=dict)  # backend, at, connection
    subflows: dict[int, dict[tuple, str]] = field(default_factory=dict)  # token -> flow -> backend

    def add(self, batch: Batch) -> None:
        for token, backend in batch.tokens.items():
            self.tokens[token] = (backend, batch.at, batch.connections.get(token))
        for flow, (token, backend) in batch.subflows.items():
            self.subflows.setdefault(token, {})[flow] = backend
        for token in batch.ended:
            self.tokens.pop(token, None)
            self.subflows.pop(token, None)

    def batches(self, origin: str, size: int = 1000) -> list[Batch]:
        out = []
        tokens = list(self.tokens.items())
        subflows = [(flow, (token, backend)) for token, flows in self.subflows.items() for flow, backend in flows.items()]
        for i in range(0, max(len(tokens), len(subflows)), size):
            chunk = tokens[i:i + size]
            batch = Batch(origin, time.time(), {t: b for t, (b, _, _) in chunk}, dict(subflows[i:i + size]),
                          connections={t: c for t, (_, _, c) in chunk if c})
            batch.at = min((at for _, (_, at, _) in chunk), default=batch.at)
            out.append(batch)
        return out


def said(error: Exception) -> str:
    """An error as the log and status say it: redis-py's Sentinel errors repeat every sentinel
    client's whole repr (thousands of characters)."""
    text = str(error)
    return text if len(text) <= 300 else text[:300] + "…"


def client_options(cfg: ClusterConfig) -> dict:
    """redis-py's options for the config's Redis: its credentials, TLS with the server's name
    checked against its certificate (redis-py before 6 did not unless told), and bytes that are
    not UTF-8 (anyone with the user can write them) read as U+FFFD, which no parser accepts:
    counted as malformed rather than raised from inside redis-py."""
    options = {"username": cfg.username, "password": cfg.password, "decode_responses": True,
               "encoding_errors": "replace", "socket_timeout": 2, "socket_connect_timeout": 2}
    if uses_tls(cfg.redis):
        options["ssl_check_hostname"] = True
        options.update({k: v for k, v in (("ssl_ca_certs", cfg.tls_ca), ("ssl_certfile", cfg.tls_cert),
                                          ("ssl_keyfile", cfg.tls_key)) if v})
    return options


def connect(cfg: ClusterConfig):
    """A client of the primary; with a Sentinel set, of the primary the sentinels name (asked
    again at each reconnection: after a failover, the link's next attempt finds the new one)."""
    import redis

    sentinels, options = sentinel_set(cfg.redis), client_options(cfg)
    if sentinels is None:
        client = redis.Redis.from_url(cfg.redis, **options)
    else:
        from redis.sentinel import Sentinel

        if sentinels.tls:
            options["ssl"] = True
        asking = {k: v for k, v in options.items() if k not in ("decode_responses", "encoding_errors")}
        client = Sentinel(sentinels.sentinels, sentinel_kwargs=asking, **options).master_for(sentinels.service,
                                                                                             db=sentinels.db)
    client.ping()
    return client


class Link:
    def __init__(self, cfg: ClusterConfig, ttl: int, fingerprint: str, send):
        self.cfg, self.ttl, self.fingerprint, self.send = cfg, ttl, fingerprint, send
        self.keys, self.name = Keys(cfg.name), cfg.balancer
        self.incoming: queue.SimpleQueue[Batch] = queue.SimpleQueue()
        self.own = Own()
        self.ended: list[int] = []  # ended while the publisher was cut off
        self.published = 0
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.peers: dict[str, dict] = {}
        self.error: str | None = None
        self.writer_up = self.reader_up = False
        self.resyncs = self.outages = 0
        self.followed = False
        self.down: frozenset[str] | None = None  # the backends this balancer's checks see down (None: abstains)
        self.beat_due = False  # the checks changed: a heartbeat at once, not in HEARTBEAT_SECONDS

    # -- from the worker ----------------------------------------------------------------------
    def receive(self, pipe) -> None:
        """At once, so that the worker's sends never wait on a full pipe."""
        try:
            while True:
                self.incoming.put(pipe.recv())
        except (EOFError, OSError):
            self.incoming.put(None)

    def next_batch(self, wait: float) -> Batch | None:
        """What the worker sent since the last call, merged into one batch (or None when it is gone)."""
        merged = Batch(self.name, float("inf"))  # as old as its oldest news
        try:
            item = self.incoming.get(timeout=wait)
            while True:
                if item is None:
                    return None
                if isinstance(item, str):  # the config's fingerprint after a reload
                    self.fingerprint, self.beat_due = item, True
                    item = self.incoming.get_nowait()
                    continue
                if isinstance(item, Checked):
                    self.down, self.beat_due = item.down, True
                    item = self.incoming.get_nowait()
                    continue
                merged.at = min(merged.at, item.at)
                merged.tokens.update(item.tokens)
                merged.connections.update(item.connections)
                merged.subflows.update(item.subflows)
                merged.ended += item.ended
                item = self.incoming.get_nowait()
        except queue.Empty:
            if not merged:
                merged.at = time.time()
            return merged

    # -- to Redis -----------------------------------------------------------------------------
    def write(self, client, batch: Batch) -> None:
        """A batch into Redis: this balancer's kept tokens and subflows (as Own holds them now),
        then its news."""
        tokens, subflows, news = (self.keys.of(self.name, kind) for kind in ("tokens", "subflows", "news"))
        pipe = client.pipeline(transaction=False)
        if batch.tokens:
            pipe.hset(tokens, mapping={f"{t:08x}": record(backend, batch.at, batch.connections.get(t))
                                       for t, backend in batch.tokens.items()})
        steered = {token for token, _ in batch.subflows.values() if token in self.own.subflows}
        if steered:
            pipe.hset(subflows, mapping={f"{t:08x}": record_subflows(self.own.subflows[t]) for t in steered})
        for i in range(0, len(batch.ended), SCAN_CHUNK):
            ended = [f"{t:08x}" for t in batch.ended[i:i + SCAN_CHUNK]]
            pipe.hdel(tokens, *ended)
            pipe.hdel(subflows, *ended)
        pipe.xadd(news, encode(batch), maxlen=STREAM_LENGTH, approximate=True)
        for key in (tokens, subflows, news):  # a balancer retired for good leaves nothing behind
            pipe.expire(key, self.ttl)
        pipe.execute()
        self.published += len(batch.tokens) + len(batch.subflows)

    def publish_forever(self) -> None:
        client, retry, next_beat, next_look, next_state = None, 0, 0.0, 0.0, 0.0
        while True:
            batch = self.next_batch(0.05 if client else 0.2)
            if batch is None:
                return  # the worker is gone
            self.own.add(batch)
            if client is None:
                self.ended = (self.ended + batch.ended)[-ENDED_KEPT:]
                try:
                    client = connect(self.cfg)
                    self.beat(client)  # peers meet this balancer by it
                    self.look(client)
                    next_beat, next_look = time.monotonic() + HEARTBEAT_SECONDS, time.monotonic() + LOOK_SECONDS
                    self.publish_again(client)
                    self.ended, retry, self.writer_up = [], 0, True
                except Exception as e:
                    client = self._lost("publishing", e)
                    time.sleep(RETRY_SECONDS[min(retry, len(RETRY_SECONDS) - 1)])
                    retry += 1
            elif batch:
                try:
                    self.write(client, batch)
                except Exception as e:
                    self.ended = (self.ended + batch.ended)[-ENDED_KEPT:]
                    client = self._lost("publishing", e)
            now = time.monotonic()
            if client is not None and (now >= next_look or self.beat_due):
                try:
                    if now >= next_beat or self.beat_due:
                        self.beat(client)
                        next_beat = now + HEARTBEAT_SECONDS
                    if self.look(client):
                        next_state = now  # the worker may announce, or its backends' view changed: now
                except Exception as e:
                    client = self._lost("heartbeat", e)
                next_look = now + LOOK_SECONDS
            if now >= next_state:
                self.send(self.state())
                next_state = now + STATE_SECONDS

    def publish_again(self, client) -> None:
        """After an outage: what this balancer keeps in Redis becomes what it holds now (a replica
        promoted by Sentinel may lack the last writes, ends among them: an ended token kept there
        would be read back by every peer that catches up), and its peers' news tells them what
        they missed."""
        client.delete(self.keys.of(self.name, "tokens"), self.keys.of(self.name, "subflows"))
        for pending in self.own.batches(self.name) + [Batch(self.name, time.time(), ended=self.ended)]:
            if pending:
                self.write(client, pending)

    def _lost(self, doing: str, error: Exception) -> None:
        if self.writer_up:
            self.outages += 1
            log.warning("cluster: Redis lost while %s: %s", doing, said(error))
        self.writer_up, self.error = False, f"{doing}: {said(error)}"
        return None

    def beat(self, client) -> None:
        """This balancer's heartbeat, with the backends its checks see down (its vote)."""
        self.beat_due = False
        client.set(self.keys.of(self.name, "beat"),
                   heartbeat(self.fingerprint, self.published, time.time(), self.down), ex=HEARTBEAT_TTL)

    def look(self, client) -> bool:
        """The peers' heartbeats and whether each follows this balancer; True when the worker
        should hear of it at once: every peer follows it now, or a peer's vote on the backends
        changed (or a peer came or went)."""
        names = self.balancers(client, "beat")
        pipe = client.pipeline(transaction=False)
        for name in names:  # a value longer than a heartbeat is read no further than that
            pipe.getrange(self.keys.of(name, "beat"), 0, MAX_HEARTBEAT)
        beats = peer_beats(zip(names, pipe.execute(raise_on_error=False) if names else []), self.rejected)
        now = time.time()
        votes_before = self.votes_heard()
        self.peers = {name: {"fingerprint": beat.fingerprint, "age_s": round(now - beat.at, 1),
                             "down": None if beat.down is None else sorted(beat.down)} for name, beat in beats.items()}
        pipe = client.pipeline(transaction=False)
        for name in beats:
            pipe.sismember(self.keys.of(name, "following"), self.name)
        followed = self.followed
        # a peer's key of another type (its user can write one) answers an error: not followed there
        self.followed = all(answer == 1 for answer in pipe.execute(raise_on_error=False))
        return (self.followed and not followed) or votes_before != self.votes_heard()

    def votes_heard(self) -> dict[str, tuple]:
        """Each peer's config fingerprint and vote, as the last look read them."""
        return {name: (peer["fingerprint"], peer["down"]) for name, peer in self.peers.items()}

    def balancers(self, client, kind: str) -> list[str]:
        """The other balancers that have a `kind` key, MAX_PEERS of them at most."""
        names = []
        for key in itertools.islice(client.scan_iter(self.keys.every(kind), count=1000), 4 * MAX_PEERS):
            name = self.keys.balancer_of(key, kind)
            if name is None:
                self.rejected["malformed"] += 1
            elif name != self.name and len(names) < MAX_PEERS:
                names.append(name)
        return names

    def state(self) -> LinkState:
        return LinkState(self.writer_up and self.reader_up, self.published, dict(self.received), dict(self.rejected),
                         dict(self.peers), None if self.writer_up and self.reader_up else self.error, self.resyncs,
                         self.outages, self.followed)

    # -- from Redis ---------------------------------------------------------------------------
    def follow_forever(self) -> None:
        import redis

        retry, streams = 0, {}  # peer -> the last entry read from its stream
        while True:
            try:
                client = connect(self.cfg)
                self.catch_up(client, streams, set(streams) | set(self.peers_met(client)))
                self.resyncs += 1
                self.reader_up, retry = True, 0
                self.send(self.state())  # after the batches: the worker knows it has caught up
                next_look = time.monotonic() + LOOK_SECONDS
                while True:
                    if time.monotonic() >= next_look:  # a balancer that started meanwhile
                        self.catch_up(client, streams, set(self.peers_met(client)) - set(streams))
                        next_look = time.monotonic() + LOOK_SECONDS
                    if not streams:
                        time.sleep(LOOK_SECONDS)
                        continue
                    try:
                        self.read(client, streams, list(streams), block_ms=int(LOOK_SECONDS * 1000))
                    except redis.ResponseError:  # a peer's news key of another type: that peer is left out
                        self.drop_broken(client, streams)
            except Exception as e:
                if self.reader_up:
                    log.warning("cluster: Redis lost while following peers: %s", said(e))
                self.reader_up, self.error = False, f"following: {said(e)}"
                time.sleep(RETRY_SECONDS[min(retry, len(RETRY_SECONDS) - 1)])
                retry += 1

    def peers_met(self, client) -> list[str]:
        """Peers by their heartbeat (a balancer beats before it publishes) or their stream."""
        return list(dict.fromkeys(self.balancers(client, "beat") + self.balancers(client, "news")))[:MAX_PEERS]

    def catch_up(self, client, streams: dict[str, str], peers: set[str]) -> None:
        """Each of these peers' news up to now: from a peer whose stream cannot say all that
        happened since (core.news.resume_from), what it keeps first (entries written meanwhile
        come again from the stream: installs are idempotent), then its stream to its newest entry.
        A peer whose keys are not of their type (its user can write them so) is left out."""
        import redis

        for peer in peers:
            news = self.keys.of(peer, "news")
            try:
                oldest, newest = client.xrange(news, count=1), client.xrevrange(news, count=1)
                streams[peer], behind = resume_from(streams.get(peer), oldest[0][0] if oldest else None,
                                                    newest[0][0] if newest else None)
                if behind:
                    self.resync(client, peer)
                while self.read(client, streams, [peer]):  # to its newest entry: then this balancer has caught up
                    pass
            except redis.ResponseError:
                self.rejected["malformed"] += 1
                streams.pop(peer, None)
        if streams:  # they may announce: this balancer hears their news (said again: the set expires)
            following = self.keys.of(self.name, "following")
            client.sadd(following, *streams)
            client.expire(following, self.ttl)

    def drop_broken(self, client, streams: dict[str, str]) -> None:
        for peer in list(streams):
            if client.type(self.keys.of(peer, "news")) not in ("stream", "none"):
                self.rejected["malformed"] += 1
                del streams[peer]

    def read(self, client, streams: dict[str, str], peers, block_ms: int | None = None) -> int:
        """The next entries of these peers' streams (waiting up to block_ms for one), to the worker;
        how many there were."""
        read = 0
        reading = {self.keys.of(peer, "news"): streams[peer] for peer in peers}
        for key, entries in client.xread(reading, count=READ_ENTRIES, block=block_ms) or []:
            peer = self.keys.balancer_of(key, "news")
            for entry, fields in entries:
                streams[peer], read = entry, read + 1
                batch = decode(fields, peer, self.rejected)
                if batch:
                    self.received[peer] += len(batch.tokens) + len(batch.subflows)
                    self.send(PeerNews(batch))
        return read

    def resync(self, client, peer: str) -> None:
        """Every token a peer keeps in Redis and every subflow it steered, in batches."""
        for kind in ("tokens", "subflows"):
            fields = {}
            for name, value in client.hscan_iter(self.keys.of(peer, kind), count=SCAN_CHUNK):
                fields[name] = value
                if len(fields) == SCAN_CHUNK:
                    self._send_kept(peer, kind, fields)
                    fields = {}
            self._send_kept(peer, kind, fields)

    def _send_kept(self, peer: str, kind: str, fields: dict[str, str]) -> None:
        batch = from_kept(peer, fields, {}, self.rejected) if kind == "tokens" else \
            from_kept(peer, {}, fields, self.rejected)
        if batch:
            self.send(PeerNews(batch, resync=True))


def serve_link(pipe, cfg: ClusterConfig, ttl: int, fingerprint: str) -> None:
    die_with_parent()
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            pipe.send(message)

    link = Link(cfg, ttl, fingerprint, send)
    threading.Thread(target=link.receive, args=(pipe,), name="from worker", daemon=True).start()
    threading.Thread(target=link.follow_forever, name="from peers", daemon=True).start()
    try:
        link.publish_forever()
    except (BrokenPipeError, EOFError):
        return


class LinkHandle:
    """The worker's end of the link: the process, spawned (a fresh interpreter: it can be started
    again from a worker whose threads run), and its pipe. A link that dies is started again after
    RESTART_SECONDS; meanwhile the worker balances alone and what it sends is dropped (the new
    link catches up from Redis, and the worker's own entries come back through its next news)."""

    def __init__(self, cfg: ClusterConfig, ttl: int, fingerprint: str):
        self.cfg, self.ttl, self.fingerprint = cfg, ttl, fingerprint
        self.process = self.pipe = None
        self.lost_at: float | None = None
        self.start()

    def start(self) -> None:
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        self.pipe, theirs = spawn.Pipe()
        self.process = spawn.Process(target=serve_link, args=(theirs, self.cfg, self.ttl, self.fingerprint),
                                     name="mplb-nfq cluster link", daemon=True)
        self.process.start()
        theirs.close()
        self.lost_at = None

    @property
    def alive(self) -> bool:
        return self.lost_at is None

    def send(self, message) -> None:
        if self.alive:
            try:
                self.pipe.send(message)
            except OSError:  # its end is gone: recv() says so too
                self.lost()

    def recv(self):
        """The link's next message; EOFError once it is gone."""
        try:
            return self.pipe.recv()
        except (EOFError, OSError):
            self.lost()
            raise EOFError("the cluster link is gone") from None

    def lost(self) -> None:
        if self.lost_at is None:
            log.error("cluster: the link process ended (exit code %s); started again in %.0f s",
                      self.process.exitcode, RESTART_SECONDS)
            self.lost_at = time.monotonic()
            self.process.kill()
            self.process.join(1)
            self.pipe.close()

    def restart_due(self) -> bool:
        return self.lost_at is not None and time.monotonic() - self.lost_at >= RESTART_SECONDS

    def restart(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.start()

    def stop(self) -> None:
        if self.alive:
            self.process.kill()
