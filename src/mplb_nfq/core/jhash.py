"""Linux's jhash (lib/jhash.h, Bob Jenkins' lookup3) and nft's `jhash ... mod N`: the kernel
indexes a scheduler's table with it, and the core must find the same slot for the same packet
(queued packets, `inspect`). Held to the kernel by a test that reads the marks nft set."""
from __future__ import annotations

MASK = 0xFFFFFFFF
INITIAL = 0xDEADBEEF
SEED = 0x6D706C62  # every table's hash seed ("mplb"): the same on every balancer


def _rol(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (32 - shift))) & MASK


def _words(data: bytes) -> tuple[int, int, int]:
    return (int.from_bytes(data[0:4], "little"), int.from_bytes(data[4:8], "little"),
            int.from_bytes(data[8:12], "little"))


def jhash(data: bytes, seed: int) -> int:
    a = b = c = (INITIAL + len(data) + seed) & MASK
    while len(data) > 12:
        x, y, z = _words(data)
        a, b, c = (a + x) & MASK, (b + y) & MASK, (c + z) & MASK
        a = ((a - c) & MASK) ^ _rol(c, 4); c = (c + b) & MASK  # noqa: E702 (the mix, as lookup3 writes it)
        b = ((b - a) & MASK) ^ _rol(a, 6); a = (a + c) & MASK  # noqa: E702
        c = ((c - b) & MASK) ^ _rol(b, 8); b = (b + a) & MASK  # noqa: E702
        a = ((a - c) & MASK) ^ _rol(c, 16); c = (c + b) & MASK  # noqa: E702
        b = ((b - a) & MASK) ^ _rol(a, 19); a = (a + c) & MASK  # noqa: E702
        c = ((c - b) & MASK) ^ _rol(b, 4); b = (b + a) & MASK  # noqa: E702
        data = data[12:]
    if not data:
        return c
    x, y, z = _words(data + bytes(12 - len(data)))
    a, b, c = (a + x) & MASK, (b + y) & MASK, (c + z) & MASK
    c = ((c ^ b) - _rol(b, 14)) & MASK
    a = ((a ^ c) - _rol(c, 11)) & MASK
    b = ((b ^ a) - _rol(a, 25)) & MASK
    c = ((c ^ b) - _rol(b, 16)) & MASK
    a = ((a ^ c) - _rol(c, 4)) & MASK
    b = ((b ^ a) - _rol(a, 14)) & MASK
    c = ((c ^ b) - _rol(b, 24)) & MASK
    return c


def slot(data: bytes, size: int) -> int:
    """nft_jhash: the hash scaled to 0..size-1 (reciprocal_scale, not a modulo)."""
    return (jhash(data, SEED) * size) >> 32


def flow_key(src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """`ip saddr . tcp sport . ip daddr . tcp dport` as nft lays it out in its registers: each
    field in whole 32-bit words, the ports zero-padded."""
    return src + sport.to_bytes(2, "big") + b"\0\0" + dst + dport.to_bytes(2, "big") + b"\0\0"
