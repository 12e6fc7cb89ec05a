"""What a worker that stops gracefully leaves for the next one, so that a restart need not read the
token map back: the kernel dumps a set's elements walking it from its start again for each
message, which for a million tokens takes minutes. Two files in /run (gone at a reboot, as the
kernel's table is): the tokens and their backends (the worker's), the connections that taught
them (the conntrack follower's, as digests of their first flows). Each is valid only for the
table it was written for (its handle, the network namespace, the boot), and is read once and
removed.
"""
from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Iterable

DIRECTORY = Path("/run/mplb-nfq")
_COUNT = struct.Struct("!I")


def _path(table: str) -> Path:
    return DIRECTORY / f"{os.stat('/proc/self/ns/net').st_ino}-{table}"


def place(table: str, handle: int) -> tuple[Path, str]:
    """The snapshot's path (without suffix) for this table in this network namespace, and the
    identity a snapshot must carry to be read back."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    path = _path(table)
    return path, f"mplb-nfq snapshot 1 {boot} {path.name} {handle}"


def discard(table: str) -> None:
    """The table is gone (`mplb-nfq cleanup`): so is what a snapshot of it says."""
    for suffix in (".tokens", ".flows"):
        _path(table).with_suffix(suffix).unlink(missing_ok=True)


def _write(path: Path, identity: str, parts: list[bytes], count: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(identity.encode() + b"\n" + _COUNT.pack(count))
        for part in parts:
            out.write(part)
    partial.replace(path)


def _read(path: Path, identity: str) -> tuple[int, memoryview] | None:
    """(count, the rest), or None when there is no such snapshot or it is another table's; the
    file is removed either way."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    header = identity.encode() + b"\n"
    if not data.startswith(header) or len(data) < len(header) + 4:
        return None
    return _COUNT.unpack_from(data, len(header))[0], memoryview(data)[len(header) + 4:]


def write_tokens(path: Path, identity: str, entries: Iterable[tuple[int, int, float]]) -> int:
    """(token, the core's value, seconds left) of each token, in three arrays."""
    tokens, values, left = array("I"), array("I"), array("f")
    for token, value, seconds in entries:
        tokens.append(token), values.append(value), left.append(seconds)
    _write(path.with_suffix(".tokens"), identity, [tokens.tobytes(), values.tobytes(), left.tobytes()], len(tokens))
    return len(tokens)


def read_tokens(path: Path, identity: str) -> tuple[array, array, array] | None:
    """The three arrays: tokens, values, seconds left (in the order written)."""
    found = _read(path.with_suffix(".tokens"), identity)
    if found is None:
        return None
    count, rest = found
    tokens, values, left = array("I"), array("I"), array("f")
    tokens.frombytes(rest[:4 * count]), values.frombytes(rest[4 * count:8 * count])
    left.frombytes(rest[8 * count:12 * count])
    return tokens, values, left


def write_flows(path: Path, identity: str, teaching: Iterable[tuple[int, int]]) -> int:
    """(digest of the connection's first flow, token) of each watched connection (core.flowtokens)."""
    digests, tokens = array("Q"), array("I")
    for flow_digest, token in teaching:
        digests.append(flow_digest), tokens.append(token)
    _write(path.with_suffix(".flows"), identity, [digests.tobytes(), tokens.tobytes()], len(tokens))
    return len(tokens)


def read_flows(path: Path, identity: str) -> tuple[array, array] | None:
    """The two arrays: digests, tokens."""
    found = _read(path.with_suffix(".flows"), identity)
    if found is None:
        return None
    count, rest = found
    digests, tokens = array("Q"), array("I")
    digests.frombytes(rest[:8 * count]), tokens.frombytes(rest[8 * count:12 * count])
    return digests, tokens
