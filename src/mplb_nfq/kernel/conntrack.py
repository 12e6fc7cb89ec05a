"""Counting conntrack's live entries per backend mark, in a process of its own."""
from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections import Counter

from ..core.marks import BACKEND_MASK, JOIN

log = logging.getLogger("mplb_nfq.conntrack")
LIVE_TCP_STATES = range(1, 7)  # SYN_SENT .. LAST_ACK: not TIME_WAIT, not CLOSE


def count_conntrack(out, interval: float) -> None:
    """In a process of its own, so that a large conntrack table never stalls the queue: count the
    live entries per backend mark, connections and added subflows apart, every interval, and send
    them on `out`."""
    import ctypes

    from pyroute2 import NFCTSocket

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for ignored in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(ignored, signal.SIG_IGN)
    while True:
        started = time.monotonic()
        connections: Counter[int] = Counter()
        subflows: Counter[int] = Counter()
        try:
            with NFCTSocket() as ct:
                for entry in ct.dump():
                    mark = entry.get_attr("CTA_MARK") or 0
                    if not mark & BACKEND_MASK:
                        continue
                    state = entry.get_nested("CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE")
                    if state in LIVE_TCP_STATES:
                        (subflows if mark & JOIN else connections)[mark & BACKEND_MASK] += 1
            out.send((dict(connections), dict(subflows)))
        except (BrokenPipeError, EOFError):
            return
        except Exception as e:
            log.warning("conntrack count failed: %s", e)
        # A large table takes long to read: wait at least 4 times as long as the reading took,
        # so that counting never takes more than a fifth of a core.
        time.sleep(max(interval, 4 * (time.monotonic() - started)))


def start_counter(interval: float):
    """The counting process, and the pipe its counts arrive on."""
    counts, counter_end = multiprocessing.Pipe(duplex=False)
    counter = multiprocessing.Process(target=count_conntrack, args=(counter_end, interval),
                                      name="mplb-nfq conntrack counter", daemon=True)
    counter.start()
    return counter, counts
