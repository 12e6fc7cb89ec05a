"""The cluster link: a process of its own between the worker and Redis, so that nothing Redis does
(slow, gone, restarting) ever waits in the worker's loop.

Redis holds, under mplb:CLUSTER:
  t:TOKEN   hash: b backend, o the balancer that learned it, at (ms); lives until its
            connection ends (the learner deletes it), token_timeout at most
  s:TOKEN   hash: FLOW -> backend, the join subflows of TOKEN's connection, by whoever steered them
  log       stream: every balancer's batches (core.cluster.encode), what peers follow
  b:NAME    each balancer's heartbeat: its config fingerprint and counts, for 10 s
The link publishes the worker's news in batches, follows the stream for the peers', catches up
from the hashes when it (re)connects, and publishes again what this balancer holds after an
outage. Both directions are plain data over a pipe (Batch, LinkState).
"""
from __future__ import annotations

import itertools
import logging
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..core.cluster import (
    MAX_PEERS,
    Batch,
    decode,
    encode,
    from_record,
    heartbeat,
    peer_beats,
    record,
    resume_from,
)
from ..core.tokens import flow_comment
from .config import ClusterConfig

log = logging.getLogger("mplb_nfq.cluster")
STREAM_LENGTH = 100_000  # batches kept in the stream (about): a peer that falls further behind catches up
HEARTBEAT_SECONDS, HEARTBEAT_TTL = 2.0, 10
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


@dataclass
class Own:
    """What this balancer published and still holds: published again after an outage."""
    tokens: dict[int, tuple[str, float]] = field(default_factory=dict)
    subflows: dict[tuple, tuple[int, str]] = field(default_factory=dict)

    def add(self, batch: Batch) -> None:
        for token, backend in batch.tokens.items():
            self.tokens[token] = (backend, batch.at)
        self.subflows.update(batch.subflows)
        if batch.ended:
            ended = set(batch.ended)
            for token in ended:
                self.tokens.pop(token, None)
            for flow in [f for f, (t, _) in self.subflows.items() if t in ended]:
                del self.subflows[flow]

    def batches(self, origin: str, size: int = 1000) -> list[Batch]:
        out = []
        tokens, subflows = list(self.tokens.items()), list(self.subflows.items())
        for i in range(0, max(len(tokens), len(subflows)), size):
            batch = Batch(origin, time.time(), {t: b for t, (b, _) in tokens[i:i + size]}, dict(subflows[i:i + size]))
            batch.at = min((at for _, (_, at) in tokens[i:i + size]), default=batch.at)
            out.append(batch)
        return out


def client_options(cfg: ClusterConfig) -> dict:
    """redis-py's options for the config's Redis: its credentials, TLS with the server's name
    checked against its certificate (redis-py before 6 did not unless told), and bytes that are
    not UTF-8 (anyone with the user can write them) read as U+FFFD, which no parser accepts:
    counted as malformed rather than raised from inside redis-py."""
    options = {"username": cfg.username, "password": cfg.password, "decode_responses": True,
               "encoding_errors": "replace", "socket_timeout": 2, "socket_connect_timeout": 2}
    if cfg.redis.startswith("rediss://"):
        options["ssl_check_hostname"] = True
        options.update({k: v for k, v in (("ssl_ca_certs", cfg.tls_ca), ("ssl_certfile", cfg.tls_cert),
                                          ("ssl_keyfile", cfg.tls_key)) if v})
    return options


def connect(cfg: ClusterConfig):
    import redis

    client = redis.Redis.from_url(cfg.redis, **client_options(cfg))
    client.ping()
    return client


class Link:
    def __init__(self, cfg: ClusterConfig, ttl: int, fingerprint: str, send):
        self.cfg, self.ttl, self.fingerprint, self.send = cfg, ttl, fingerprint, send
        self.prefix = f"mplb:{cfg.name}:"
        self.stream = self.prefix + "log"
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
        merged = Batch(self.cfg.balancer, float("inf"))  # as old as its oldest news
        try:
            item = self.incoming.get(timeout=wait)
            while True:
                if item is None:
                    return None
                if isinstance(item, str):  # the config's fingerprint after a reload
                    self.fingerprint = item
                    item = self.incoming.get_nowait()
                    continue
                merged.at = min(merged.at, item.at)
                merged.tokens.update(item.tokens)
                merged.subflows.update(item.subflows)
                merged.ended += item.ended
                item = self.incoming.get_nowait()
        except queue.Empty:
            if not merged:
                merged.at = time.time()
            return merged

    # -- to Redis -----------------------------------------------------------------------------
    def write(self, client, batch: Batch) -> None:
        pipe = client.pipeline(transaction=False)
        for token, backend in batch.tokens.items():
            key = f"{self.prefix}t:{token:08x}"
            pipe.hset(key, mapping=record(backend, batch.origin, batch.at))
            pipe.expire(key, self.ttl)
        by_token: dict[int, dict[str, str]] = {}
        for flow, (token, backend) in batch.subflows.items():
            by_token.setdefault(token, {})[flow_comment(flow)] = backend
        for token, fields in by_token.items():
            key = f"{self.prefix}s:{token:08x}"
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl)
        for token in batch.ended:
            pipe.delete(f"{self.prefix}t:{token:08x}", f"{self.prefix}s:{token:08x}")
        pipe.xadd(self.stream, encode(batch), maxlen=STREAM_LENGTH, approximate=True)
        pipe.execute()
        self.published += len(batch.tokens) + len(batch.subflows)

    def publish_forever(self) -> None:
        client, retry, next_beat, next_state = None, 0, 0.0, 0.0
        while True:
            batch = self.next_batch(0.05 if client else 0.2)
            if batch is None:
                return  # the worker is gone
            self.own.add(batch)
            if client is None:
                self.ended = (self.ended + batch.ended)[-ENDED_KEPT:]
                try:
                    client = connect(self.cfg)
                    # what peers missed while this balancer could not publish
                    for pending in self.own.batches(self.cfg.balancer) + [Batch(self.cfg.balancer, time.time(),
                                                                                ended=self.ended)]:
                        if pending:
                            self.write(client, pending)
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
            if client is not None and now >= next_beat:
                try:
                    self.heartbeat(client)
                except Exception as e:
                    client = self._lost("heartbeat", e)
                next_beat = now + HEARTBEAT_SECONDS
            if now >= next_state:
                self.send(self.state())
                next_state = now + STATE_SECONDS

    def _lost(self, doing: str, error: Exception) -> None:
        if self.writer_up:
            self.outages += 1
            log.warning("cluster: Redis lost while %s: %s", doing, error)
        self.writer_up, self.error = False, f"{doing}: {error}"
        return None

    def heartbeat(self, client) -> None:
        client.set(f"{self.prefix}b:{self.cfg.balancer}", heartbeat(self.fingerprint, self.published, time.time()),
                   ex=HEARTBEAT_TTL)
        keys = list(itertools.islice(client.scan_iter(f"{self.prefix}b:*", count=100), 4 * MAX_PEERS))
        names = [key.removeprefix(f"{self.prefix}b:") for key in keys]
        beats = peer_beats(zip(names, client.mget(keys) if keys else []), self.rejected)
        beats.pop(self.cfg.balancer, None)
        now = time.time()
        self.peers = {name: {"fingerprint": fingerprint, "age_s": round(now - at, 1)}
                      for name, (fingerprint, at) in beats.items()}

    def state(self) -> LinkState:
        return LinkState(self.writer_up and self.reader_up, self.published, dict(self.received), dict(self.rejected),
                         dict(self.peers), None if self.writer_up and self.reader_up else self.error, self.resyncs,
                         self.outages)

    # -- from Redis ---------------------------------------------------------------------------
    def follow_forever(self) -> None:
        retry, last = 0, None
        while True:
            try:
                client = connect(self.cfg)
                oldest, newest = client.xrange(self.stream, count=1), client.xrevrange(self.stream, count=1)
                last, behind = resume_from(last, oldest[0][0] if oldest else None, newest[0][0] if newest else None)
                if behind:
                    self.resync(client)  # entries written meanwhile come again from the stream: installs are idempotent
                self.reader_up, retry = True, 0
                self.send(self.state())  # after the batches: the worker knows it has caught up
                while True:
                    for _, entries in client.xread({self.stream: last}, count=1000, block=1000) or []:
                        for last, fields in entries:
                            if fields.get("o") == self.cfg.balancer:
                                continue
                            batch = decode(fields, self.rejected)
                            if batch:
                                self.received[batch.origin] += len(batch.tokens) + len(batch.subflows)
                                self.send(PeerNews(batch))
            except Exception as e:
                if self.reader_up:
                    log.warning("cluster: Redis lost while following peers: %s", e)
                self.reader_up, self.error = False, f"following: {e}"
                time.sleep(RETRY_SECONDS[min(retry, len(RETRY_SECONDS) - 1)])
                retry += 1

    def resync(self, client) -> None:
        """Every token kept in Redis, with its subflows, in batches by origin."""
        keys = list(client.scan_iter(f"{self.prefix}t:*", count=SCAN_CHUNK))
        for i in range(0, len(keys), SCAN_CHUNK):
            chunk = keys[i:i + SCAN_CHUNK]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.hgetall(key)
                pipe.hgetall(key.replace(":t:", ":s:", 1))
            answers = pipe.execute()
            by_origin: dict[str, Batch] = {}
            for key, kept, subflows in zip(chunk, answers[::2], answers[1::2]):
                token = key.rpartition(":")[2]
                if len(token) != 8 or any(c not in "0123456789abcdef" for c in token) or not kept:
                    self.rejected["malformed"] += 1
                    continue
                batch = from_record(int(token, 16), {**kept, **{f"s:{k}": v for k, v in subflows.items()}},
                                    self.rejected)
                if batch is None:
                    continue
                merged = by_origin.setdefault(batch.origin, Batch(batch.origin, batch.at))
                merged.at = min(merged.at, batch.at)
                merged.tokens.update(batch.tokens)
                merged.subflows.update(batch.subflows)
            for batch in by_origin.values():
                self.send(PeerNews(batch, resync=True))
        self.resyncs += 1


def serve_link(pipe, cfg: ClusterConfig, ttl: int, fingerprint: str) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for ignored in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(ignored, signal.SIG_IGN)
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
