"""The NFQUEUE side: reading the queue's socket in bounded batches, and the kernel's drop counts."""
from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path
from typing import Callable

VERDICT_BATCH = 32  # packets decided in a row before their verdicts go out (the queue empty: at once)
NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, NLM_F_REQUEST = 3, 2, 1
NFQA_CFG_MASK, NFQA_CFG_FLAGS, NFQA_CFG_F_FAIL_OPEN = 4, 5, 1


def fail_open_request(queue: int) -> bytes:
    """NFQNL_MSG_CONFIG setting NFQA_CFG_F_FAIL_OPEN on a queue: what the kernel cannot queue (the
    queue full, or the reader's socket) is accepted rather than dropped. No acknowledgement is
    asked: the binding reads the socket, and would take it for a packet."""
    # attribute headers in host order, like every netlink header; their values big endian
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(
        struct.pack("=HH", 8, kind) + struct.pack("!I", value)
        for kind, value in ((NFQA_CFG_MASK, NFQA_CFG_F_FAIL_OPEN), (NFQA_CFG_FLAGS, NFQA_CFG_F_FAIL_OPEN)))
    return struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG, NLM_F_REQUEST, 0, 0) + body


def set_fail_open(fd: int, queue: int) -> None:
    """On the socket that bound the queue: the kernel takes a queue's config from its owner only."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.send(fail_open_request(queue))


class QueueReader:
    """The queue's socket as NetfilterQueue.run_socket reads it, but ending a read loop after
    `left` packets (under a flood, held joins, reloads and the control socket still get their turn).
    Before each read it has the decided packets given their verdicts: the first packet read after
    the queue was found empty at once, so that a lone packet waits for nothing; in a burst,
    VERDICT_BATCH at a time, or what is left when the queue is empty again."""

    def __init__(self, fd: int, left: int, decided: list, give_decided: Callable[[], None]):
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.left, self.decided, self.give_decided = left, decided, give_decided
        self.in_a_row = 0  # packets read since the queue was last found empty

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        if self.decided and (self.in_a_row < 2 or len(self.decided) >= VERDICT_BATCH):
            self.give_decided()
        self.left -= 1
        try:
            packet = self.sock.recv(size)
        except BlockingIOError:
            self.in_a_row = 0
            self.give_decided()
            raise
        self.in_a_row += 1
        return packet


def queue_drops(first: int, count: int = 1) -> dict:
    """Packets the kernel dropped because a queue was full, or its worker's socket buffer was,
    and those waiting, summed over queues first .. first + count - 1 (one per worker)."""
    try:
        return count_queue_drops(Path("/proc/net/netfilter/nfnetlink_queue").read_text(), range(first, first + count))
    except OSError:
        return {"queue_full": 0, "socket_full": 0, "waiting": 0}


def count_queue_drops(table: str, queues: range) -> dict:
    """The sums of /proc/net/netfilter/nfnetlink_queue's columns over `queues`."""
    found = {"queue_full": 0, "socket_full": 0, "waiting": 0}
    for line in table.splitlines():
        fields = line.split()
        try:
            if int(fields[0]) in queues:
                found["queue_full"] += int(fields[5])
                found["socket_full"] += int(fields[6])
                found["waiting"] += int(fields[2])
        except (ValueError, IndexError):
            continue
    return found
