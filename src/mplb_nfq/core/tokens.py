"""Token policy, as pure functions: who may teach a token, what goes to the kernel map for the
tokens a batch learned, what a refused or failed install means, how old a token read back from
the map is.

Trust: a server's key (in the MP_CAPABLE SYN-ACK, which the LB sees when replies pass through
it) comes from a backend. A client's key echo (the third ACK) is whatever the client sends: it
is what direct server return has, and what a worker restarted mid-handshake has. So a token a
client taught never displaces another: the first connection to hold a token keeps it, and a
client's later claim is refused and counted. A server's token displaces a client's (the
client's may be forged). Two server tokens on different backends are a real collision: its
joins are reset, never guessed.

A client's token is provisional until its connection proves itself: one spoofed packet teaches
a token, so the tokens of connections that sent nothing after their third ACK live in a pool of
their own (a quarter of the capacity, the oldest pushed out first, PROVISIONAL_SECONDS each)
and never take the place of a proven connection's. Its next MPTCP packet (a DSS option: the
connection goes on past its handshake, as a one-packet spoof does not) proves it; its token
then lives as long as the connection.
"""
from __future__ import annotations

import ipaddress
import re
from socket import AF_INET, inet_ntop
from typing import Iterable, Mapping, NamedTuple

from .marks import BACKEND_MASK, DISPLACEABLE, JOIN
from .packet import endpoint
from .verdicts import Kind, Verdict

PORT = re.compile(r"[0-9]{1,5}")
# Held in the token table for a token that two live connections on different backends share: a
# join carrying it could belong to either, so it is refused (TCP reset) rather than misrouted.
AMBIGUOUS = -1
# In the core's token table (never in a kernel mark): the kernel map does not have it yet; the
# connection's next MP_CAPABLE packet tries the install again
INSTALL_PENDING = 1 << 32
TAUGHT_BY_CLIENT_KINDS = (Kind.THIRD_ACK, Kind.TOKEN_PROVEN)
PROVISIONAL_SECONDS = 30


def token_capacities(capacity: int) -> tuple[int, int]:
    """(proven, provisional): how the kernel map's `capacity` elements are shared."""
    provisional = max(1, capacity // 4)
    return max(1, capacity - provisional), provisional


def map_value(verdict: Verdict) -> int:
    """The kernel map's value for the token a verdict taught: its joins' mark."""
    by_client = DISPLACEABLE if verdict.kind in TAUGHT_BY_CLIENT_KINDS else 0
    return (verdict.mark & BACKEND_MASK) | JOIN | by_client


class TokenWrites(NamedTuple):
    install: list[tuple[int, int]]  # token -> the mark its joins get in the kernel map
    reject: list[int]  # tokens whose joins the kernel map answers with a reset
    replace: list[tuple[int, int]]  # a server's token in place of what a client taught
    ignored: list[int] = []  # a client's token the map holds for another connection: not ours
    provisional: list[tuple[int, int]] = []  # installed for PROVISIONAL_SECONDS
    renew: list[tuple[int, int]] = []  # proven: their elements get the whole token timeout

    def refused(self, existing: Mapping[int, int | None]) -> TokenWrites:
        """The map refused these tokens (token -> what it holds, None if gone meanwhile): another
        worker's connection holds them. A client's claim yields; a server's token replaces a
        client's, and collides with another server's, for every worker."""
        install, reject, replace, ignored = [], list(self.reject), list(self.replace), list(self.ignored)
        provisional = []
        for token, mark in self.provisional:
            if token in existing:
                ignored.append(token)
            else:
                provisional.append((token, mark))
        for token, mark in self.install:
            if token not in existing:
                install.append((token, mark))
            elif mark & DISPLACEABLE:
                ignored.append(token)
            elif existing[token] is None or existing[token] & DISPLACEABLE:
                replace.append((token, mark))
            else:
                reject.append(token)
        return TokenWrites(install, reject, replace, ignored, provisional, list(self.renew))

    @property
    def added(self) -> list[tuple[int, int]]:
        return self.install + self.provisional


OPERATIONS = {Kind.TOKEN_COLLISION: "reject", Kind.SYN_ACK_OVER_CLIENT: "replace", Kind.THIRD_ACK: "provisional",
              Kind.TOKEN_PROVEN: "renew"}


def plan_writes(verdicts: Iterable[Verdict]) -> TokenWrites:
    """One batch's writes: the last word on a token wins (a collision found later in the batch
    takes back the install of the same token earlier in it)."""
    final: dict[int, tuple[str, int]] = {}
    for v in verdicts:
        if v.token is not None:
            operation = OPERATIONS.get(v.kind, "install")
            if operation == "renew" and final.get(v.token, ("",))[0] == "provisional":
                operation = "install"  # taught and proven in one batch: not in the map yet, and may be another's
            final[v.token] = (operation, 0 if v.kind is Kind.TOKEN_COLLISION else map_value(v))
    planned: dict[str, list] = {"install": [], "reject": [], "replace": [], "provisional": [], "renew": []}
    for token, (operation, mark) in final.items():
        planned[operation].append((token, mark))
    return TokenWrites(planned["install"], [t for t, _ in planned["reject"]], planned["replace"], [],
                       planned["provisional"], planned["renew"])


def learned_at(now: float, ttl: float, seconds_left: float) -> float:
    """When a token the kernel map holds with `seconds_left` to live was learned, on the clock `now`
    is read from (the map's timeout and the core's table's TTL are the same)."""
    return now - max(0.0, ttl - seconds_left)


def flow_comment(flow: tuple) -> str:
    """A connection as the kernel map's element comment shows it: client > VIP."""
    src, sport, dst, dport = flow
    if len(src) == 4 == len(dst):  # one call for the common case: every learned token's comment is one
        return f"{inet_ntop(AF_INET, src)}:{sport}>{inet_ntop(AF_INET, dst)}:{dport}"
    return f"{endpoint(src, sport)}>{endpoint(dst, dport)}"


def flow_of_comment(comment: str) -> tuple | None:
    """The connection a map element's comment names, or None when it names none (or a port
    that is not one: comments also come from Redis, untrusted)."""
    try:
        client, vip = comment.split(">")
        ends = []
        for endpoint in (client, vip):
            address, _, port = endpoint.rpartition(":")
            if not PORT.fullmatch(port) or int(port) > 65535:
                return None
            ends += [ipaddress.ip_address(address.strip("[]")).packed, int(port)]
        return tuple(ends)
    except ValueError:
        return None
