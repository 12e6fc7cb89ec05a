"""Build IPv4/IPv6 TCP packets with MPTCP options, for the tests and the floods of the lab (checksums: TCP only)."""
from __future__ import annotations

import ipaddress

SYN, ACK, PSH = 0x02, 0x10, 0x08


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp(src: str, dst: str, sport: int = 40000, dport: int = 80, flags: int = SYN,
        options: bytes = b"", payload: bytes = b"", seq: int = 1000, ack: int = 0) -> bytes:
    """An IP packet holding one TCP segment, with a correct TCP checksum (header checksum: the kernel's)."""
    options += b"\x01" * (-len(options) % 4)  # NOP padding to a 32-bit boundary
    doff = (20 + len(options)) // 4
    header = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + seq.to_bytes(4, "big")
              + ack.to_bytes(4, "big") + bytes([(doff & 0xF) << 4, flags]) + (65535).to_bytes(2, "big") + b"\0\0\0\0")
    segment = header + options + payload
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    pseudo = s.packed + d.packed + (len(segment).to_bytes(2, "big") + b"\0\x06" if s.version == 4
                                    else len(segment).to_bytes(4, "big") + b"\0\0\0\x06")
    segment = segment[:16] + _checksum(pseudo + segment).to_bytes(2, "big") + segment[18:]
    if s.version == 4:
        return (bytes([0x45, 0]) + (20 + len(segment)).to_bytes(2, "big") + b"\0\0\x40\0\x40\x06\0\0"
                + s.packed + d.packed + segment)
    return (bytes([0x60, 0, 0, 0]) + len(segment).to_bytes(2, "big") + b"\x06\x40" + s.packed + d.packed
            + segment)


def mp_capable(version: int = 1, flags: int = 0x01, sender: bytes | None = None, receiver: bytes | None = None,
               data_len: int | None = None, checksum: int | None = None) -> bytes:
    body = bytes([0x00 | version, flags])
    for part in (sender, receiver):
        if part is not None:
            body += part
    if data_len is not None:
        body += data_len.to_bytes(2, "big")
    if checksum is not None:
        body += checksum.to_bytes(2, "big")
    return bytes([30, 2 + len(body)]) + body


def dss(data_ack: int = 1) -> bytes:
    """A DSS option carrying a 4-byte data ACK: what an MPTCP connection's packets carry once established."""
    return bytes([30, 8, 0x20, 0x01]) + data_ack.to_bytes(4, "big")


def mp_join_syn(token: int, nonce: int = 0x11223344, address_id: int = 1, backup: bool = False) -> bytes:
    return bytes([30, 12, 0x10 | int(backup), address_id]) + token.to_bytes(4, "big") + nonce.to_bytes(4, "big")


def mp_join_ack(hmac: bytes = bytes(20)) -> bytes:
    """The MP_JOIN of a join's third packet (the client's ACK): its truncated HMAC, no token."""
    return bytes([30, 24, 0x10, 0]) + hmac


CLIENT_KEY = bytes.fromhex("1fdb5df328bc3def")
SERVER_KEY = bytes.fromhex("29a6c86981ad933c")

# Two real 8-byte keys per version whose tokens collide (found by a birthday search): v1 SHA-256, v0 SHA-1.
COLLIDING = {1: (bytes.fromhex("000000000000c66f"), bytes.fromhex("000000000000e658")),
             0: (bytes.fromhex("0000010000000036"), bytes.fromhex("0000010000012645"))}
