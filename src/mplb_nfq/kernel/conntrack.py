"""Reading conntrack in a process of its own: live entries per backend mark, and which learned
tokens' connections are gone."""
from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

from ..core.marks import BACKEND_MASK, JOIN
from .process import die_with_parent

log = logging.getLogger("mplb_nfq.conntrack")
LIVE_TCP_STATES = range(1, 7)  # SYN_SENT .. LAST_ACK: not TIME_WAIT, not CLOSE
ABSENT_READINGS = 2  # a watched connection missing from this many readings in a row is gone


@dataclass(frozen=True)
class Watch:
    """From the worker: these tokens live as long as these connections (client -> VIP).
    handed_over: a cluster's peer taught them and ended them (its entry is gone); the reader says
    whether this balancer has the connection (HandedOver) and, if it has, watches it as its own."""
    tokens: list[tuple[int, tuple]]
    handed_over: bool = False


@dataclass(frozen=True)
class Counts:
    """To the worker: live connections and added subflows per backend mark."""
    connections: dict[int, int]
    subflows: dict[int, int]


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


def original_flow(entry) -> tuple | None:
    """(client address packed, port, VIP packed, port) of a conntrack entry's original direction."""
    ip = ("CTA_TUPLE_ORIG", "CTA_TUPLE_IP")
    ports = ("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO")
    src = entry.get_nested(*ip, "CTA_IP_V4_SRC") or entry.get_nested(*ip, "CTA_IP_V6_SRC")
    dst = entry.get_nested(*ip, "CTA_IP_V4_DST") or entry.get_nested(*ip, "CTA_IP_V6_DST")
    if src is None or dst is None:
        return None
    return (ipaddress.ip_address(src).packed, entry.get_nested(*ports, "CTA_PROTO_SRC_PORT"),
            ipaddress.ip_address(dst).packed, entry.get_nested(*ports, "CTA_PROTO_DST_PORT"))


class Lifetimes:
    """Tokens watched against the connections that taught them (pure: fed each reading)."""

    def __init__(self):
        self.watched: dict[int, tuple] = {}
        self.absent: Counter[int] = Counter()
        self.handed_over: set[int] = set()  # watched, and not yet seen here

    def watch(self, tokens: list[tuple[int, tuple]], handed_over: bool = False) -> None:
        for token, flow in tokens:
            self.watched[token] = flow
            self.absent.pop(token, None)
            if handed_over:
                self.handed_over.add(token)
            else:
                self.handed_over.discard(token)

    def reading(self, live: set[tuple]) -> tuple[list[int], HandedOver]:
        """The tokens whose connection this reading, and the ones before, did not have; and of
        those handed over, which connections are here and which are not."""
        gone, here = [], []
        for token, flow in self.watched.items():
            if flow in live:
                self.absent.pop(token, None)
                if token in self.handed_over:
                    here.append(token)
                continue
            self.absent[token] += 1
            if self.absent[token] >= ABSENT_READINGS:
                gone.append(token)
        self.handed_over.difference_update(here)
        ended, elsewhere = [], []
        for token in gone:
            del self.watched[token], self.absent[token]
            (elsewhere if token in self.handed_over else ended).append(token)
        self.handed_over.difference_update(elsewhere)
        return ended, HandedOver(here, elsewhere)


def read_conntrack(pipe, interval: float) -> None:
    """In a process of its own, so that a large conntrack table never stalls the queue: every
    interval, count the live entries per backend mark (connections and added subflows apart),
    and tell which watched tokens' connections are gone."""
    from pyroute2 import NFCTSocket

    die_with_parent()
    lifetimes = Lifetimes()
    incoming: queue.SimpleQueue[Watch] = queue.SimpleQueue()

    def receive():  # at once, so that the worker's sends never wait on a full pipe
        try:
            while True:
                incoming.put(pipe.recv())
        except (EOFError, OSError):
            return

    threading.Thread(target=receive, name="watches", daemon=True).start()
    while True:
        started = time.monotonic()
        try:
            while not incoming.empty():
                watch = incoming.get()
                lifetimes.watch(watch.tokens, watch.handed_over)
            connections: Counter[int] = Counter()
            subflows: Counter[int] = Counter()
            live: set[tuple] = set()
            with NFCTSocket() as ct:
                for entry in ct.dump():
                    mark = entry.get_attr("CTA_MARK") or 0
                    if not mark & BACKEND_MASK:
                        continue
                    if not mark & JOIN:
                        live.add(original_flow(entry))  # in any state, TIME_WAIT too: a late join finds its token
                    state = entry.get_nested("CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE")
                    if state in LIVE_TCP_STATES:
                        (subflows if mark & JOIN else connections)[mark & BACKEND_MASK] += 1
            pipe.send(Counts(dict(connections), dict(subflows)))
            ended, handed_over = lifetimes.reading(live)
            if ended:
                pipe.send(Ended(ended))
            if handed_over.here or handed_over.elsewhere:
                pipe.send(handed_over)
        except (BrokenPipeError, EOFError):
            return
        except Exception as e:
            log.warning("reading conntrack failed: %s", e)
        # A large table takes long to read: wait at least 4 times as long as the reading took,
        # so that reading never takes more than a fifth of a core.
        time.sleep(max(interval, 4 * (time.monotonic() - started)))


def start_reader(interval: float):
    """The reading process, and the worker's end of its pipe."""
    mine, theirs = multiprocessing.Pipe()
    reader = multiprocessing.Process(target=read_conntrack, args=(theirs, interval),
                                     name="mplb-nfq conntrack reader", daemon=True)
    reader.start()
    theirs.close()
    return reader, mine
