"""Netlink's netfilter family, the bytes of it every adapter here builds and reads: message
headers, attributes, and walking them. Pure."""
from __future__ import annotations

import socket
import struct

NETLINK_NETFILTER, SOL_NETLINK, NETLINK_CAP_ACK = 12, 270, 10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_CREATE, NLA_F_NESTED = 1, 4, 0x300, 0x400, 0x8000
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port
ATTRIBUTE = struct.Struct("=HH")  # length, type
NFGEN_HEADER_SIZE = 4


def attribute(kind: int, *payload: bytes) -> bytes:
    data = b"".join(payload)
    return ATTRIBUTE.pack(4 + len(data), kind) + data + bytes(-len(data) % 4)


def message(kind: int, flags: int, seq: int, family: int, body: bytes = b"", res_id: int = 0) -> bytes:
    """A netfilter netlink message: the netlink header, the nfgenmsg header, the body."""
    header = NLMSG_HEADER.pack(20 + len(body), kind, flags, seq, 0)
    return header + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body


def walk(data: bytes, offset: int = 0):
    """(type, payload) of each netlink attribute in data[offset:], the nested flag cleared."""
    while offset + ATTRIBUTE.size <= len(data):
        length, kind = ATTRIBUTE.unpack_from(data, offset)
        if length < ATTRIBUTE.size:
            return
        yield kind & ~NLA_F_NESTED, data[offset + ATTRIBUTE.size:offset + length]
        offset += length + (-length % 4)


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    return dict(walk(data, offset))


def messages(data: bytes):
    """(type, flags, seq, body, errno or None) of each netlink message in a datagram: errno 0 for
    an acknowledgement or a dump's end."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, flags, seq, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return
        body = data[offset + NLMSG_HEADER.size:offset + length]
        error = -struct.unpack_from("=i", body)[0] if kind == NLMSG_ERROR else (0 if kind == NLMSG_DONE else None)
        yield kind, flags, seq, body, error
        offset += length + (-length % 4)
