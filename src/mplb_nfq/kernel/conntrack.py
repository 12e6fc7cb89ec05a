"""Following conntrack in a process of its own: live entries per backend mark, and which learned
tokens' connections are gone, from the kernel's events (ctnetlink), with a full reading now and
then to correct what events cannot tell (counts of entries whose events were lost)."""
from __future__ import annotations

import logging
import multiprocessing
import queue
import select
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..core.flowtokens import FlowTokens, digest
from ..core.marks import BACKEND_MASK, JOIN
from .ctnetlink import CHANGED, CREATED, DESTROYED, Conntrack, Entry, flow_key
from .process import die_with_parent
from .snapshot import read_flows, write_flows

log = logging.getLogger("mplb_nfq.conntrack")
LIVE_TCP_STATES = range(1, 7)  # SYN_SENT .. LAST_ACK: not TIME_WAIT, not CLOSE
ABSENT_READINGS = 2  # a watched connection missing from this many full readings in a row is gone
ABSENT_ASKS = 2  # a handed-over connection this balancer was asked for this many times is elsewhere
RECENT_SECONDS = 30.0  # an ended connection is remembered this long, for a watch sent after its end
# and at most this many (a flood's entries end by the thousand a second): a watch comes within a
# second or so; one that finds its end forgotten is ended by the full readings instead
RECENT_MAX = 1 << 18
READING_SECONDS = 300.0  # between full readings; longer if one takes more than a twentieth of this
WATCH_WAIT = 0.05  # a watch sent is taken this soon
# An event that wakes the follower waits this long for those that follow it, then they are read in
# one turn: a turn per event woke the follower for most of them, and its CPU took the fetches' time
# (at 1,000 connections/s, 32-35 ticks of 10 ms per 3,000 connections against 10-13 in turns). A
# turn at once after a quiet spell came with the connection whose event woke it, in its handshake:
# waiting first, the fetches' p99 518 against 568 µs (plain forwarding 463); 10 ms, bursts: 725.
# A token's end waits this much longer.
TURN_SECONDS = 0.005


@dataclass(frozen=True)
class Watch:
    """From the worker: these tokens live as long as these connections (client -> VIP).
    handed_over: a cluster's peer taught them and ended them (its entry is gone); the reader says
    whether this balancer has the connection (HandedOver) and, if it has, watches it as its own."""
    tokens: list[tuple[int, tuple]]
    handed_over: bool = False


@dataclass(frozen=True)
class Save:
    """From the worker, stopping: write the watched connections to path (kernel.snapshot), then
    answer Saved."""
    path: Path
    identity: str


@dataclass(frozen=True)
class Saved:
    count: int


@dataclass(frozen=True)
class Load:
    """From the worker, restarted: watch the connections a Save left at path."""
    path: Path
    identity: str


@dataclass(frozen=True)
class Counts:
    """To the worker: live connections and added subflows per backend mark; and of the follower,
    the connections it watches, its full readings of conntrack and how long the last one took."""
    connections: dict[int, int]
    subflows: dict[int, int]
    watched: int = 0
    readings: int = 0
    reading_s: float = 0.0


@dataclass(frozen=True)
class Ended:
    """To the worker: the connections of these tokens are no longer in conntrack."""
    tokens: list[int]


@dataclass(frozen=True)
class HandedOver:
    """To the worker: of the tokens a peer handed over, those whose connection this balancer's
    conntrack has (`here`: watched from now on) and those it has not (`elsewhere`)."""
    here: list[int]
    elsewhere: list[int]


def live(entry: Entry) -> bool:
    """A connection counts as live until its first FIN or RST (the ruleset's closing label; an
    entry older than that rule: until TIME_WAIT or CLOSE)."""
    return not entry.closing and (entry.state is None or entry.state in LIVE_TCP_STATES)


class Tally:
    """Live connections and added subflows per backend mark: set from each full reading, kept in
    between from the entries' events (created; closing; destroyed). `closed` holds the flows
    counted out before their end: their destruction is no second end."""

    def __init__(self):
        self.connections: Counter[int] = Counter()
        self.subflows: Counter[int] = Counter()
        self.closed: set[bytes] = set()  # flow keys

    def _counter(self, mark: int) -> Counter[int]:
        return self.subflows if mark & JOIN else self.connections

    @staticmethod
    def _less(counter: Counter[int], backend: int) -> None:
        if counter[backend] > 0:
            counter[backend] -= 1

    def event(self, entry: Entry) -> None:
        backend = entry.mark & BACKEND_MASK
        if not backend:
            return
        counter, is_live = self._counter(entry.mark), live(entry)
        if entry.event == CREATED:
            if is_live:
                counter[backend] += 1
            else:
                self.closed.add(entry.key)
        elif entry.event == CHANGED:
            if is_live and entry.key in self.closed:
                self.closed.discard(entry.key)
                counter[backend] += 1
            elif not is_live and entry.key not in self.closed:
                self.closed.add(entry.key)
                self._less(counter, backend)
        elif entry.key in self.closed:
            self.closed.discard(entry.key)
        else:
            self._less(counter, backend)

    def reading(self, entries: Iterable[Entry]) -> None:
        self.connections.clear(), self.subflows.clear(), self.closed.clear()
        for entry in entries:
            if entry.mark & BACKEND_MASK:
                if entry.state is not None and live(entry):
                    self._counter(entry.mark)[entry.mark & BACKEND_MASK] += 1
                else:
                    self.closed.add(entry.key)

    def counts(self, watched: int = 0, readings: int = 0, reading_s: float = 0.0) -> Counts:
        return Counts(dict(+self.connections), dict(+self.subflows), watched, readings, reading_s)


class Lifetimes:
    """Tokens watched against the connections that taught them (pure: fed the entries' events,
    the answers to "is this flow here?", and the full readings). A connection is known by the
    digest of its first flow (core.flowtokens: 24 bytes a connection). What it found waits in
    `ended`, `here` and `elsewhere` until taken."""

    def __init__(self):
        self.teaching = FlowTokens()  # digest of a connection's first flow -> its token
        self.handed_over: dict[int, list] = {}  # token -> [flow, digest, times asked]: not seen here yet
        self.absent: dict[int, int] = {}  # digest -> full readings in a row without the connection
        self.recent: OrderedDict[int, float] = OrderedDict()  # digests of flows that ended, and when
        self.ended: list[int] = []
        self.here: list[int] = []
        self.elsewhere: list[int] = []
        self.in_reading = False

    def watch(self, tokens: list[tuple[int, tuple]], handed_over: bool = False) -> None:
        for token, flow in tokens:
            flow_digest = digest(flow_key(flow))
            self.handed_over.pop(token, None)
            if flow_digest in self.recent and not handed_over:  # its end came first
                self.ended.append(token)
                continue
            self.teaching.put(flow_digest, token)
            self.absent.pop(flow_digest, None)
            if handed_over:
                self.handed_over[token] = [flow, flow_digest, 0]

    def restore(self, digests: Iterable[int], tokens: Iterable[int]) -> None:
        """Flow digests and their tokens, as a snapshot kept them: any connection the next full
        reading misses ended while no worker ran (a reading under way may have passed it)."""
        for flow_digest, token in zip(digests, tokens):
            self.teaching.put(flow_digest, token)
            if not self.in_reading:
                self.absent[flow_digest] = ABSENT_READINGS - 1

    def event(self, entry: Entry, now: float) -> None:
        if entry.mark & JOIN:
            return
        flow_digest = digest(entry.key)
        if entry.event == CREATED:  # a new connection on the four-tuple: a watch for it is no late one
            self.recent.pop(flow_digest, None)
        elif entry.event == DESTROYED:
            if entry.mark & BACKEND_MASK:  # (only a connection with a backend teaches a token)
                self.recent[flow_digest] = now
                self.recent.move_to_end(flow_digest)
                if len(self.recent) > RECENT_MAX:
                    self.recent.popitem(last=False)
            token = self.teaching.pop(flow_digest)
            if token is not None:
                self.absent.pop(flow_digest, None)
                (self.elsewhere if self.handed_over.pop(token, None) else self.ended).append(token)
        elif self.handed_over:
            token = self.teaching.get(flow_digest)
            if token is not None and self.handed_over.pop(token, None):
                self.here.append(token)

    def asked(self, has) -> None:
        """Ask for the handed-over connections not seen here yet (has(flow) -> bool)."""
        for token, asked in list(self.handed_over.items()):
            flow, flow_digest, times = asked
            if has(flow):
                self.here.append(token)
                del self.handed_over[token]
            elif times + 1 >= ABSENT_ASKS:
                self.elsewhere.append(token)
                self.teaching.pop(flow_digest)
                del self.handed_over[token]
            else:
                asked[2] = times + 1

    # A full reading: begin, every entry seen, end. The connections it and the readings before
    # missed have ended (an event lost, or an end while no worker ran).
    def begin_reading(self) -> None:
        self.teaching.unmark()
        self.in_reading = True

    def seen(self, entry: Entry) -> None:
        if entry.mark & BACKEND_MASK and not entry.mark & JOIN:
            self.teaching.mark(digest(entry.key))

    def end_reading(self) -> None:
        self.in_reading = False
        absent = {}
        for flow_digest, token in self.teaching.unmarked():
            if token in self.handed_over:
                continue
            missed = self.absent.get(flow_digest, 0) + 1
            if missed >= ABSENT_READINGS:
                self.ended.append(token)
                self.teaching.pop(flow_digest)
            else:
                absent[flow_digest] = missed
        self.absent = absent

    def prune(self, now: float) -> None:
        while self.recent and now - next(iter(self.recent.values())) >= RECENT_SECONDS:
            self.recent.popitem(last=False)

    def take(self) -> tuple[list[int], HandedOver]:
        found = self.ended, HandedOver(self.here, self.elsewhere)
        self.ended, self.here, self.elsewhere = [], [], []
        return found


def follow_conntrack(pipe, interval: float) -> None:
    """In a process of its own, so that a large conntrack table never stalls the queue: follow
    the entries' events, tell the worker which watched tokens' connections ended as they end, and
    the live entries per backend mark at most every interval; read the whole table at start and
    now and then (at most a twentieth of a core) to correct what lost events left wrong."""
    die_with_parent()
    events = Conntrack(events=True)  # subscribed before the first reading: no end falls between
    table = Conntrack()
    lifetimes, tally = Lifetimes(), Tally()
    incoming: queue.SimpleQueue[Watch] = queue.SimpleQueue()

    def receive():  # at once, so that the worker's sends never wait on a full pipe
        try:
            while True:
                incoming.put(pipe.recv())
        except (EOFError, OSError):
            return

    def take_incoming():
        nonlocal reread, next_reading
        while not incoming.empty():
            told = incoming.get()
            if isinstance(told, Watch):
                lifetimes.watch(told.tokens, told.handed_over)
            elif isinstance(told, Save):
                pipe.send(Saved(write_flows(told.path, told.identity, lifetimes.teaching.items())))
            elif isinstance(told, Load):
                lifetimes.restore(*(read_flows(told.path, told.identity) or ((), ())))
                if lifetimes.in_reading:
                    reread = True
                else:
                    next_reading = 0.0

    def full_reading():
        def entries():  # (a million take seconds: what the worker says meanwhile is taken on the way)
            for count, entry in enumerate(table.dump()):
                lifetimes.seen(entry)
                if count % 4096 == 4095:
                    take_incoming()
                yield entry
        lifetimes.begin_reading()
        tally.reading(entries())
        lifetimes.end_reading()

    threading.Thread(target=receive, name="watches", daemon=True).start()
    next_reading = next_turn = 0.0
    sent, readings, reading_s, reread = None, 0, 0.0, False
    while True:
        try:
            now = time.monotonic()
            # events first: a four-tuple's old end and new start come before the new one's watch
            for entry in events.events():
                tally.event(entry)
                lifetimes.event(entry, now)
            take_incoming()
            if now >= next_reading:
                full_reading()
                readings, reading_s = readings + 1, round(time.monotonic() - now, 3)
                next_reading = now + max(READING_SECONDS, 20 * reading_s)
            if reread:  # what a snapshot kept is checked at once
                reread, next_reading = False, now
            if now >= next_turn:
                next_turn = now + interval
                lifetimes.asked(table.has)
                lifetimes.prune(now)
                counts = tally.counts(len(lifetimes.teaching), readings, reading_s)
                if counts != sent:
                    pipe.send(counts)
                    sent = counts
            ended, handed_over = lifetimes.take()
            if ended:
                pipe.send(Ended(ended))
            if handed_over.here or handed_over.elsewhere:
                pipe.send(handed_over)
        except (BrokenPipeError, EOFError):
            return
        except Exception as e:
            log.warning("following conntrack failed: %s", e)
            time.sleep(interval)
        if select.select([events.sock], [], [], min(interval, WATCH_WAIT))[0]:
            time.sleep(TURN_SECONDS)


class FollowerLost(Exception):
    """The follower process is gone: tokens would no longer end with their connections."""

    def __init__(self, exitcode: int | None):
        super().__init__(f"the conntrack follower exited (code {exitcode}): without it no token ends with its "
                         "connection; stopping, so that the service manager starts a worker that reads the "
                         "token map back")


class Follower:
    """The worker's end of the follower's pipe, and its process: a pipe that breaks, either way,
    is the follower's death (FollowerLost)."""

    def __init__(self, process, pipe):
        self.process, self.pipe = process, pipe

    def lost(self) -> FollowerLost:
        self.process.join(1)
        return FollowerLost(self.process.exitcode)

    def send(self, message) -> None:
        try:
            self.pipe.send(message)
        except (EOFError, OSError) as e:
            raise self.lost() from e

    def recv(self):
        try:
            return self.pipe.recv()
        except (EOFError, OSError) as e:
            raise self.lost() from e

    def poll(self, timeout: float) -> bool:
        return self.pipe.poll(timeout)

    def fileno(self) -> int:
        return self.pipe.fileno()

    def kill(self) -> None:
        self.process.kill()


def start_reader(interval: float) -> Follower:
    mine, theirs = multiprocessing.Pipe()
    reader = multiprocessing.Process(target=follow_conntrack, args=(theirs, interval),
                                     name="mplb-nfq conntrack follower", daemon=True)
    reader.start()
    theirs.close()
    return Follower(reader, mine)
