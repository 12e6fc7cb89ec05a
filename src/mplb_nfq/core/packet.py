"""Parse IPv4/IPv6 TCP segments and their MPTCP options, by hand over bytes.

Pure: bytes in, a `Segment` (or a `Malformed` saying why) out. Never raises on bad input.
"""
from __future__ import annotations

import hashlib
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
OPT_EOL, OPT_NOP, OPT_MPTCP = 0, 1, 30

MP_CAPABLE, MP_JOIN, DSS, ADD_ADDR, REMOVE_ADDR, MP_PRIO, MP_FAIL, MP_FASTCLOSE, MP_TCPRST = range(9)

# MP_CAPABLE flags byte (RFC 8684 3.1): A checksum required,
# C "do not open subflows to my source address", H HMAC-SHA256 (v1) / HMAC-SHA1 (v0).
CAP_FLAG_A, CAP_FLAG_C, CAP_FLAG_H = 0x80, 0x20, 0x01

MP_CAPABLE_LENGTHS = {0: (12, 20), 1: (4, 12, 20, 22, 24)}
ADD_ADDR_LENGTHS = (8, 10, 16, 18, 20, 22, 28, 30)
FIXED_LENGTHS = {MP_JOIN: (12, 16, 24), MP_PRIO: (3, 4), MP_FAIL: (12,), MP_FASTCLOSE: (12,), MP_TCPRST: (4,)}


class MpCapable(NamedTuple):
    version: int
    flags: int
    sender_key: bytes | None  # 8 bytes, absent in a v1 SYN
    receiver_key: bytes | None  # 8 bytes, present from length 20 on
    data_len: int | None = None  # v1 length 22/24: data-level length of the payload

    @property
    def checksum_required(self) -> bool:
        return bool(self.flags & CAP_FLAG_A)

    @property
    def no_subflows_to_source(self) -> bool:
        return bool(self.flags & CAP_FLAG_C)

    @property
    def hmac_sha(self) -> bool:
        return bool(self.flags & CAP_FLAG_H)


class MpJoinSyn(NamedTuple):
    backup: bool
    address_id: int
    token: int  # receiver token, as a 32-bit number (wire order, big-endian)
    nonce: int


class Segment(NamedTuple):
    version: int  # IP version: 4 or 6
    src: bytes  # packed addresses (4 or 16 bytes)
    dst: bytes
    sport: int
    dport: int
    flags: int
    options: bytes  # the TCP options as on the wire; option_list splits them
    payload_len: int
    mptcp_subtype: int | None = None  # of the first valid MPTCP option
    capable: MpCapable | None = None
    join: MpJoinSyn | None = None

    @property
    def is_syn(self) -> bool:
        return self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN

    @property
    def flow(self) -> tuple[bytes, int, bytes, int]:
        return (self.src, self.sport, self.dst, self.dport)

    @property
    def option_list(self) -> tuple[tuple[int, bytes], ...]:
        """(kind, whole option incl. kind and length) for every option but NOP and EOL."""
        found, raw, i = [], self.options, 0
        while i < len(raw) and raw[i] != OPT_EOL:
            if raw[i] == OPT_NOP:
                i += 1
                continue
            if i + 1 >= len(raw) or raw[i + 1] < 2 or i + raw[i + 1] > len(raw):
                break  # where Linux stops reading, too
            found.append((raw[i], raw[i:i + raw[i + 1]]))
            i += raw[i + 1]
        return tuple(found)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A packet that breaks a rule of IP, TCP or MPTCP. `segment`: its headers as on the wire;
    None when the IP or TCP header itself is broken, which Linux drops. `ambiguous`: kernels
    disagree on how to take it."""
    reason: str
    segment: Segment | None = None
    ambiguous: bool = False

    @property
    def linux(self) -> Segment | None:
        """The segment as Linux's stack takes it (it stops reading TCP options at a broken one,
        and ignores an MPTCP option of a wrong length); None when it drops it, or when kernels
        disagree on its reading: then nobody may take it."""
        return None if self.ambiguous else self.segment


def endpoint(address: bytes, port: int) -> str:
    """address:port, an IPv6 address in brackets (inet_ntop: a tenth of ipaddress's cost, and
    every learned token's comment names two)."""
    if len(address) == 16:
        return f"[{socket.inet_ntop(socket.AF_INET6, address)}]:{port}"
    return f"{socket.inet_ntop(socket.AF_INET, address)}:{port}"


def token_of_key(key: bytes, version: int) -> int:
    """Token of the key's owner: top 32 bits of SHA-256 (v1, RFC 8684) or SHA-1 (v0, RFC 6824)."""
    digest = hashlib.sha256(key).digest() if version >= 1 else hashlib.sha1(key).digest()
    return int.from_bytes(digest[:4], "big")


IPV4_HEADER = struct.Struct("!BxHxxHxB2x4s4s")  # version/ihl, total length, fragment, protocol, src, dst
IPV6_HEADER = struct.Struct("!B3xHBx16s16s")  # version, payload length, next header, src, dst
TCP_FIXED = struct.Struct("!HH8xBB")  # ports, data offset byte, flags


IPV6_EXTENSIONS = {0, 43, 60, 51}  # hop-by-hop, routing, destination options, authentication
IPV6_FRAGMENT = 44


def parse_ip(buf: bytes) -> Segment | Malformed | None:
    """Parse an IP packet. None: well-formed but not TCP (nothing for us to do)."""
    n = len(buf)
    if n < 1:
        return Malformed("empty packet")
    version = buf[0] >> 4
    if version == 4:
        if n < 20:
            return Malformed("truncated IPv4 header")
        first, total, fragment, protocol, src, dst = IPV4_HEADER.unpack_from(buf)
        ihl = (first & 0x0F) * 4
        if ihl < 20 or ihl > n:
            return Malformed(f"bad IPv4 header length {ihl}")
        if total < ihl:
            return Malformed(f"IPv4 total length {total} below header length")
        if fragment & 0x1FFF or protocol != 6:
            return None  # not TCP, or a non-first fragment, which carries no TCP header
        return _parse_tcp(buf, ihl, min(n, total), 4, src, dst)
    if version == 6:
        if n < 40:
            return Malformed("truncated IPv6 header")
        _, payload, next_header, src, dst = IPV6_HEADER.unpack_from(buf)
        end, start = min(n, 40 + payload), 40
        while next_header in IPV6_EXTENSIONS or next_header == IPV6_FRAGMENT:
            if start + 8 > end:
                return Malformed(f"truncated IPv6 extension header {next_header}")
            if next_header == IPV6_FRAGMENT:
                if int.from_bytes(buf[start + 2:start + 4], "big") & 0xFFF8:
                    return None  # a non-first fragment: no TCP header in it
                length = 8
            elif next_header == 51:
                length = (buf[start + 1] + 2) * 4
            else:
                length = (buf[start + 1] + 1) * 8
            next_header, start = buf[start], start + length
        if next_header != 6:
            return None
        return _parse_tcp(buf, start, end, 6, src, dst)
    return Malformed(f"IP version {version}")


U16 = struct.Struct("!H")


def capable_copy(buf: bytes) -> tuple[bool, bytes, int, tuple] | None:
    """The learning path's shortcut for a copy of a handshake packet: (from the server, the key it
    teaches, MP_CAPABLE version, the connection's flow, client first) when the packet is what
    Linux sends (a plain IPv4 or IPv6 header, a SYN-ACK or an ACK, sound options, one MPTCP
    option: an MP_CAPABLE that carries the key); None for anything else, which parse_ip reads.
    It builds no Segment: most of the learning's cost per token was building objects."""
    n = len(buf)
    if n >= 40 and buf[0] == 0x45:
        if buf[9] != 6 or buf[6] & 0x1F or buf[7]:
            return None
        end, start = min(n, U16.unpack_from(buf, 2)[0]), 20
        src, dst = buf[12:16], buf[16:20]
    elif n >= 60 and buf[0] >> 4 == 6 and buf[6] == 6:
        end, start = min(n, 40 + U16.unpack_from(buf, 4)[0]), 40
        src, dst = buf[8:24], buf[24:40]
    else:
        return None
    if end - start < 20:
        return None
    sport, dport, offset, flags = TCP_FIXED.unpack_from(buf, start)
    i, stop = start + 20, start + (offset >> 4) * 4
    if stop < i or stop > end or flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
        return None
    at = 0
    while i < stop:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= stop:
            return None
        length = buf[i + 1]
        if length < 2 or i + length > stop:
            return None
        if kind == OPT_MPTCP:  # one, an MP_CAPABLE: a DSS (a proof) or a second one goes to parse_ip now
            if at or length < 3 or buf[i + 2] >> 4 != MP_CAPABLE:
                return None
            at = i
        i += length
    if not at:
        return None
    length, version = buf[at + 1], buf[at + 2] & 0x0F
    if length not in MP_CAPABLE_LENGTHS.get(version, ()):
        return None
    if flags & TCP_SYN:  # the backend's SYN-ACK: its own key
        return (True, buf[at + 4:at + 12], version, (dst, dport, src, sport)) if length >= 12 else None
    return (False, buf[at + 12:at + 20], version, (src, sport, dst, dport)) if length >= 20 else None


def _parse_tcp(buf: bytes, start: int, end: int, version: int, src: bytes, dst: bytes) -> Segment | Malformed:
    """The TCP header at buf[start:end] (end: where the IP packet says it stops, or the capture does).
    MPTCP options are read as Linux reads them: every one of them, the last of a subtype winning.
    A SYN that asks for both MP_CAPABLE and MP_JOIN is read as plain TCP by some kernels and as a
    join by others (6.18): no verdict but a drop is safe under both, so it has no `linux` reading."""
    if end - start < 20:
        return Malformed("truncated TCP header")
    sport, dport, offset, flags = TCP_FIXED.unpack_from(buf, start)
    doff = (offset >> 4) * 4
    if doff < 20:
        return Malformed(f"TCP data offset {doff} below 20")
    if start + doff > end:
        return Malformed(f"TCP data offset {doff} beyond the packet")
    problem = None
    subtype = capable = join = None
    i, options_end = start + 20, start + doff
    while i < options_end:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= options_end:
            problem = f"TCP option {kind} without length"
            break
        length = buf[i + 1]
        if length < 2:
            problem = f"TCP option {kind} length {length}"
            break
        if i + length > options_end:
            problem = f"TCP option {kind} length {length} overruns the header"
            break
        if kind == OPT_MPTCP:
            found = _parse_mptcp(buf[i:i + length], flags)
            if isinstance(found, Malformed):
                problem = problem or found.reason
            else:
                subtype = found[0] if subtype is None else subtype
                capable, join = found[1] or capable, found[2] or join
        i += length
    segment = Segment(version, src, dst, sport, dport, flags, buf[start + 20:start + doff], end - start - doff,
                      subtype, capable, join)
    if capable is not None and join is not None and flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
        return Malformed("a SYN with both MP_CAPABLE and MP_JOIN", segment, ambiguous=True)
    return segment if problem is None else Malformed(problem, segment)


def _parse_mptcp(opt: bytes, flags: int) -> tuple[int, MpCapable | None, MpJoinSyn | None] | Malformed:
    length = len(opt)
    if length < 3:
        return Malformed(f"MPTCP option length {length}")
    subtype = opt[2] >> 4
    if subtype == MP_CAPABLE:
        capable = _parse_capable(opt)
        return capable if isinstance(capable, Malformed) else (subtype, capable, None)
    if subtype == MP_JOIN:
        if length not in FIXED_LENGTHS[MP_JOIN]:
            return Malformed(f"MP_JOIN length {length}")
        if flags & (TCP_SYN | TCP_ACK) != TCP_SYN:
            return subtype, None, None
        if length != 12:
            return Malformed(f"MP_JOIN SYN length {length}, expected 12")
        join = MpJoinSyn(bool(opt[2] & 0x01), opt[3], int.from_bytes(opt[4:8], "big"),
                         int.from_bytes(opt[8:12], "big"))
        return subtype, None, join
    problem = _check_other_subtype(subtype, opt)
    return Malformed(problem) if problem else (subtype, None, None)


def _parse_capable(opt: bytes) -> MpCapable | Malformed:
    length, version = len(opt), opt[2] & 0x0F
    if version not in MP_CAPABLE_LENGTHS:
        return Malformed(f"MP_CAPABLE version {version}")
    if length < 4 or length not in MP_CAPABLE_LENGTHS[version]:
        return Malformed(f"MP_CAPABLE v{version} length {length}")
    flags = opt[3]
    sender = opt[4:12] if length >= 12 else None
    receiver = opt[12:20] if length >= 20 else None
    data_len = int.from_bytes(opt[20:22], "big") if length >= 22 else None
    return MpCapable(version, flags, sender, receiver, data_len)


def _check_other_subtype(subtype: int, opt: bytes) -> str | None:
    length = len(opt)
    if subtype in FIXED_LENGTHS:
        return None if length in FIXED_LENGTHS[subtype] else f"MPTCP subtype {subtype} length {length}"
    if subtype == DSS:
        if length < 4:
            return f"DSS length {length}"
        flags = opt[3]
        expected = 4
        if flags & 0x01:
            expected += 8 if flags & 0x02 else 4
        if flags & 0x04:
            expected += (8 if flags & 0x08 else 4) + 6
            if length in (expected, expected + 2):
                return None
        elif length == expected:
            return None
        return f"DSS length {length} does not match its flags 0x{flags:02x}"
    if subtype == ADD_ADDR:
        return None if length in ADD_ADDR_LENGTHS else f"ADD_ADDR length {length}"
    if subtype == REMOVE_ADDR:
        return None if length >= 4 else f"REMOVE_ADDR length {length}"
    return None  # unknown and experimental subtypes are ignored, as RFC 8684 says
