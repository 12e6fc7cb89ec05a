"""Copies of handshake packets from nfnetlink_log (the ruleset's `log group N snaplen S`): the
packet itself goes on at once; the worker reads the copies in batches and learns tokens from them.
The messages are built and parsed by pure functions, tested byte for byte."""
from __future__ import annotations

import errno
import os
import socket
import struct

from .nft import KernelError
from .nfnetlink import ATTRIBUTE, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NLMSG_HEADER, attribute, message

NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 4, 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_COPY_PACKET = 1, 2
NFULA_MARK, NFULA_PAYLOAD = 2, 9
# copies of a burst of handshakes (about 1 KB each in it) wait here while the worker decides queued packets
RECEIVE_BUFFER = 32 << 20


def bind_request(group: int, snaplen: int, seq: int) -> bytes:
    """Bind this socket to the group, packets copied up to snaplen bytes, each sent at once
    (queue threshold 1: a join races its token's copy)."""
    body = (attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
            + attribute(NFULA_CFG_MODE, struct.pack("!IBB", snaplen, NFULNL_COPY_PACKET, 0))
            + attribute(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
            + attribute(NFULA_CFG_TIMEOUT, struct.pack("!I", 0)))
    return message(NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, socket.AF_UNSPEC,
                      body, res_id=group)


COPY = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
MESSAGE_START = struct.Struct("=IH")  # a netlink message's length and type
MARK = struct.Struct("!I")


def parse_copies(data: bytes) -> list[tuple[bytes, int]]:
    """(packet from its IP header on, mark) of each copy in what one read returned. Only the two
    attributes it needs are read: this runs once per learned token."""
    copies, offset, end = [], 0, len(data)
    header, attribute_at, mark_at = MESSAGE_START.unpack_from, ATTRIBUTE.unpack_from, MARK.unpack_from
    while offset + NLMSG_HEADER.size <= end:
        length, kind = header(data, offset)
        if length < NLMSG_HEADER.size:
            break
        if kind == COPY:
            mark, payload = 0, None
            at, stop = offset + NLMSG_HEADER.size + 4, min(offset + length, end)
            while at + 4 <= stop:
                size, attribute = attribute_at(data, at)
                if size < 4:
                    break
                if attribute == NFULA_MARK and size == 8:
                    mark = mark_at(data, at + 4)[0]
                elif attribute == NFULA_PAYLOAD:
                    payload = data[at + 4:at + size]
                at += (size + 3) & ~3
            if payload is not None:
                copies.append((payload, mark))
        offset += (length + 3) & ~3
    return copies


class CopyReader:
    """The group's socket; one process reads a group."""

    def __init__(self, group: int, snaplen: int):
        self.lost = 0  # reads that found the socket overrun: copies the kernel could not deliver
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE: above rmem_max
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.sock.send(bind_request(group, snaplen, 1))
        while True:  # a copy may come before the acknowledgement
            reply = self.sock.recv(1 << 16)
            length, kind, _, seq, _ = NLMSG_HEADER.unpack_from(reply)
            if kind == NLMSG_ERROR and seq == 1:
                error = -struct.unpack_from("=i", reply, NLMSG_HEADER.size)[0]
                if error:
                    self.sock.close()
                    raise KernelError(f"binding nflog group {group}: {os.strerror(error)}"
                                      + (" (another process reads it)" if error == errno.EBUSY else ""))
                break
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int) -> list[tuple[bytes, int]]:
        """The copies waiting, up to about `limit` of them."""
        copies = []
        while len(copies) < limit:
            try:
                copies += parse_copies(self.sock.recv(1 << 16))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.lost += 1
        return copies

    def close(self) -> None:
        self.sock.close()
