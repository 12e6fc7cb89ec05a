"""Conntrack over ctnetlink, in the bytes the kernel speaks: the builders and the parser are pure
and tested byte for byte; `Conntrack` sends and reads them.

pyroute2's NFCTSocket decodes every attribute of every entry into objects (about 250 µs an entry
here, 2.5 s per 10,000); what the load balancer needs of an entry is its mark and its original
flow, which `entry_of` reads in a few µs.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterable, NamedTuple

from ..core.marks import CLOSING_LABEL
from .nfnetlink import (
    NETLINK_CAP_ACK,
    NETLINK_NETFILTER,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    SOL_NETLINK,
    ATTRIBUTE,
    attribute,
    message,
    messages,
)
from .nft import KernelError

NFNL_SUBSYS_CTNETLINK = 1
CT_NEW, CT_GET, CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8 | kind for kind in (0, 1, 2))
GROUPS = (1, 2, 3)  # NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY
NETLINK_ADD_MEMBERSHIP, NETLINK_BROADCAST_ERROR, NETLINK_NO_ENOBUFS = 1, 4, 5
NLM_F_EXCL = 0x200
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_PROTOINFO, CTA_TIMEOUT, CTA_MARK, CTA_LABELS = 1, 2, 4, 7, 8, 22
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
TCP_ESTABLISHED = 3
_U16, _U32, _PORTS = struct.Struct("!H"), struct.Struct("!I"), struct.Struct("!HH")


CREATED, CHANGED, DESTROYED = "created", "changed", "destroyed"


class Entry(NamedTuple):
    """What the load balancer reads of a conntrack entry: its original flow (client address
    packed, port, VIP packed, port), its mark, its TCP state (None if the message has none),
    what the message says of it (CREATED, CHANGED, DESTROYED; a dump's entries are CHANGED), and
    whether it has the closing label (core.marks.CLOSING_LABEL)."""
    flow: tuple
    mark: int
    state: int | None
    event: str
    closing: bool = False

    @property
    def key(self) -> bytes:
        return flow_key(self.flow)


def flow_key(flow: tuple) -> bytes:
    """A flow in 12 bytes (IPv4) or 36: a dict of a million of them as keys takes a third of what
    the same dict of tuples does."""
    src, sport, dst, dport = flow
    return src + dst + _PORTS.pack(sport, dport)


def _nested(kind: int, payload: bytes) -> bytes:
    return attribute(kind | NLA_F_NESTED, payload)


def _tuple(kind: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    v4 = len(src) == 4
    ips = attribute(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src) + attribute(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst)
    proto = attribute(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])) + attribute(CTA_PROTO_SRC_PORT, _U16.pack(sport)) \
        + attribute(CTA_PROTO_DST_PORT, _U16.pack(dport))
    return _nested(kind, _nested(CTA_TUPLE_IP, ips) + _nested(CTA_TUPLE_PROTO, proto))


def _family(flow: tuple) -> int:
    return socket.AF_INET if len(flow[0]) == 4 else socket.AF_INET6


def create_message(flow: tuple, mark: int, timeout: int, seq: int) -> bytes:
    """An established TCP entry for flow (client, port, VIP, port) with mark; the reply comes from
    the VIP (the entry a routed load balancer holds for a connection)."""
    src, sport, dst, dport = flow
    body = (_tuple(CTA_TUPLE_ORIG, src, sport, dst, dport) + _tuple(CTA_TUPLE_REPLY, dst, dport, src, sport)
            + attribute(CTA_TIMEOUT, _U32.pack(timeout)) + attribute(CTA_MARK, _U32.pack(mark))
            + _nested(CTA_PROTOINFO, _nested(CTA_PROTOINFO_TCP, attribute(CTA_PROTOINFO_TCP_STATE,
                                                                          bytes([TCP_ESTABLISHED])))))
    return message(CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, seq, _family(flow), body)


def flow_request(kind: int, flow: tuple, seq: int) -> bytes:
    """A request about the entry of one original flow: CT_GET (look it up) or CT_DELETE."""
    src, sport, dst, dport = flow
    return message(kind, NLM_F_REQUEST, seq, _family(flow), _tuple(CTA_TUPLE_ORIG, src, sport, dst, dport))


def dump_message(seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    return message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family)


def _flow_of(orig: bytes) -> tuple | None:
    """The TCP flow of a tuple; None for any other protocol: a UDP entry on a watched
    connection's addresses and ports must not end its token when it times out."""
    src = dst = sport = dport = None
    tcp = False
    offset = 0
    while offset + 4 <= len(orig):
        length, kind = ATTRIBUTE.unpack_from(orig, offset)
        if length < 4:
            return None
        kind &= ~NLA_F_NESTED
        inner, end = offset + 4, offset + length
        while inner + 4 <= end:
            ilength, ikind = ATTRIBUTE.unpack_from(orig, inner)
            if ilength < 4:
                return None
            value = orig[inner + 4:inner + ilength]
            if kind == CTA_TUPLE_IP:
                if ikind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = value
                elif ikind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = value
            elif kind == CTA_TUPLE_PROTO and ikind == CTA_PROTO_NUM and ilength == 5:
                tcp = value[0] == socket.IPPROTO_TCP
            elif kind == CTA_TUPLE_PROTO and ilength == 6:
                if ikind == CTA_PROTO_SRC_PORT:
                    sport = _U16.unpack(value)[0]
                elif ikind == CTA_PROTO_DST_PORT:
                    dport = _U16.unpack(value)[0]
            inner += ilength + (-ilength % 4)
        offset += length + (-length % 4)
    if not tcp or src is None or dst is None or sport is None or dport is None:
        return None
    return src, sport, dst, dport


def _state_of(protoinfo: bytes) -> int | None:
    offset = 0
    while offset + 4 <= len(protoinfo):
        length, kind = ATTRIBUTE.unpack_from(protoinfo, offset)
        if length < 4:
            return None
        if kind & ~NLA_F_NESTED == CTA_PROTOINFO_TCP:
            inner = offset + 4
            while inner + 4 <= offset + length:
                ilength, ikind = ATTRIBUTE.unpack_from(protoinfo, inner)
                if ilength < 4:
                    return None
                if ikind == CTA_PROTOINFO_TCP_STATE and ilength == 5:
                    return protoinfo[inner + 4]
                inner += ilength + (-ilength % 4)
        offset += length + (-length % 4)
    return None


# An IPv4 TCP original tuple as the kernel lays it out, first in every entry it sends: the
# attributes' headers at fixed offsets of the message body (after the 4 bytes of nfgenmsg). An
# entry whose tuple matches is read by slicing (the follower reads several events a connection);
# any other goes through the general walk.
_HEADER = struct.Struct("=HH")
_V4_ORIG_HEADERS = ((4, _HEADER.pack(52, CTA_TUPLE_ORIG | NLA_F_NESTED) + _HEADER.pack(20, CTA_TUPLE_IP | NLA_F_NESTED)
                     + _HEADER.pack(8, CTA_IP_V4_SRC)),
                    (20, _HEADER.pack(8, CTA_IP_V4_DST)),
                    (28, _HEADER.pack(28, CTA_TUPLE_PROTO | NLA_F_NESTED) + _HEADER.pack(5, CTA_PROTO_NUM)),
                    (40, _HEADER.pack(6, CTA_PROTO_SRC_PORT)),
                    (48, _HEADER.pack(6, CTA_PROTO_DST_PORT)))


def _v4_tcp_flow(body: bytes) -> tuple | None:
    for at, header in _V4_ORIG_HEADERS:
        if body[at:at + len(header)] != header:
            return None
    if body[36] != socket.IPPROTO_TCP:
        return None
    return body[16:20], _U16.unpack_from(body, 44)[0], body[24:28], _U16.unpack_from(body, 52)[0]


def entry_of(kind: int, flags: int, body: bytes) -> Entry | None:
    """The entry a ctnetlink message (its body after the netlink header) describes; None for a
    message that is not an entry, has no TCP original flow, or is cut short."""
    if kind not in (CT_NEW, CT_DELETE):
        return None
    try:
        return _entry_of(kind, flags, body)
    except (struct.error, IndexError):
        return None


def has_label(labels: bytes, bit: int) -> bool:
    """A bit of CTA_LABELS: the kernel's bitmap of unsigned longs, in host order."""
    word, at = divmod(bit, 64)
    return len(labels) >= 8 * (word + 1) and bool(struct.unpack_from("=Q", labels, 8 * word)[0] >> at & 1)


def _entry_of(kind: int, flags: int, body: bytes) -> Entry | None:
    mark, state, closing = 0, None, False
    flow = _v4_tcp_flow(body)
    offset = 4 if flow is None else 56  # nfgenmsg, or the original tuple too
    while offset + 4 <= len(body):
        length, attr = ATTRIBUTE.unpack_from(body, offset)
        if length < 4:
            break
        attr &= ~NLA_F_NESTED
        if attr == CTA_TUPLE_ORIG:
            flow = _flow_of(body[offset + 4:offset + length])
        elif attr == CTA_MARK and length == 8:
            mark = _U32.unpack_from(body, offset + 4)[0]
        elif attr == CTA_PROTOINFO:
            state = _state_of(body[offset + 4:offset + length])
        elif attr == CTA_LABELS:
            closing = has_label(body[offset + 4:offset + length], CLOSING_LABEL)
        offset += length + (-length % 4)
    if flow is None:
        return None
    event = DESTROYED if kind == CT_DELETE else CREATED if flags & NLM_F_CREATE else CHANGED
    return Entry(flow, mark, state, event, closing)


class Conntrack:
    """A ctnetlink socket in the caller's network namespace: subscribed to the entries' events
    (`events=True`), or for requests (dump, look up, create, delete)."""

    BUFFER = 1 << 20
    EVENT_BUFFER = 32 << 20  # a burst of 100,000 ends (about 300 bytes each) waits here
    BATCH = 256  # messages per datagram sent

    def __init__(self, events: bool = False):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        size = self.EVENT_BUFFER if events else self.BUFFER
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE: above rmem_max, as root
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        self.sock.bind((0, 0))
        if events:
            # Reliable delivery (as conntrackd's): an end the socket had no room for is not lost,
            # the kernel keeps the entry and tells it again; the socket is not failed with ENOBUFS.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            for group in GROUPS:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        self.seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def events(self) -> list[Entry]:
        """The entries of the events waiting on the socket, without blocking."""
        found = []
        while True:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            for kind, flags, _, body, _ in messages(data):
                entry = entry_of(kind, flags, body)
                if entry is not None:
                    found.append(entry)

    def dump(self) -> Iterable[Entry]:
        """Every entry of the table, as the kernel reads it out."""
        self.seq += 1
        self.sock.send(dump_message(self.seq))
        while True:
            data = self.sock.recv(1 << 16)
            for kind, flags, seq, body, error in messages(data):
                if seq != self.seq:
                    continue
                if error is not None:
                    if error:
                        raise KernelError(f"dumping conntrack: {os.strerror(error)}")
                    return
                entry = entry_of(kind, flags, body)
                if entry is not None:
                    yield entry

    def has(self, flow: tuple) -> bool:
        """Whether the table has an entry of this original flow."""
        self.seq += 1
        self.sock.send(flow_request(CT_GET, flow, self.seq))
        while True:
            for kind, _, seq, _, error in messages(self.sock.recv(1 << 16)):
                if seq != self.seq:
                    continue
                if error not in (None, 0, errno.ENOENT):
                    raise KernelError(f"looking a flow up in conntrack: {os.strerror(error)}")
                return kind == CT_NEW

    def _send_all(self, built: Iterable[bytes], tolerated: tuple[int, ...]) -> int:
        """Send messages, BATCH to a datagram, each acknowledged; the count the kernel took."""
        took = 0
        batch: list[bytes] = []

        def flush():
            nonlocal took
            if not batch:
                return
            self.sock.send(b"".join(batch))
            waiting = len(batch)
            batch.clear()
            while waiting:
                for _, _, _, _, error in messages(self.sock.recv(1 << 16)):
                    if error is None:
                        continue
                    waiting -= 1
                    if error == 0:
                        took += 1
                    elif error not in tolerated:
                        raise KernelError(f"writing conntrack: {os.strerror(error)}")

        for data in built:
            length = struct.unpack_from("=I", data)[0]
            flags = struct.unpack_from("=H", data, 6)[0]
            batch.append(data[:6] + struct.pack("=H", flags | NLM_F_ACK) + data[8:length])
            if len(batch) == self.BATCH:
                flush()
        flush()
        return took

    def create(self, entries: Iterable[tuple[tuple, int]], timeout: int) -> int:
        """Established entries (flow, mark) that time out after `timeout` s; those there already
        are left. The count created."""
        def built():
            for flow, mark in entries:
                self.seq += 1
                yield create_message(flow, mark, timeout, self.seq)
        return self._send_all(built(), (errno.EEXIST,))

    def delete(self, flows: Iterable[tuple]) -> int:
        """Remove the entries of these original flows (those not there are no error)."""
        def built():
            for flow in flows:
                self.seq += 1
                yield flow_request(CT_DELETE, flow, self.seq)
        return self._send_all(built(), (errno.ENOENT,))

    def close(self) -> None:
        self.sock.close()
