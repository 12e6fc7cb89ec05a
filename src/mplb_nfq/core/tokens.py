"""Token policy, as pure functions: what goes to the kernel map for the tokens a batch learned,
what a refused install means, how old a token read back from the map is, and whether a join
whose token is unknown may wait for it."""
from __future__ import annotations

from enum import StrEnum
from typing import Iterable, NamedTuple

from .marks import BACKEND_MASK, JOIN
from .verdicts import Kind, Verdict

# Held in the token table for a token that two live connections on different backends share: a
# join carrying it could belong to either, so it is refused (TCP reset) rather than misrouted.
AMBIGUOUS = -1


class TokenWrites(NamedTuple):
    install: list[tuple[int, int]]  # token -> the mark its joins get in the kernel map
    reject: list[int]  # tokens whose joins the kernel map answers with a reset

    def refused(self, tokens: Iterable[int]) -> TokenWrites:
        """The map refused these: another worker's connection holds them on another backend, so
        they collide, for every worker."""
        refused = set(tokens)
        return TokenWrites([(t, m) for t, m in self.install if t not in refused], self.reject + sorted(refused))


def plan_writes(verdicts: Iterable[Verdict]) -> TokenWrites:
    """One batch's writes: the last word on a token wins (a collision found later in the batch
    takes back the install of the same token earlier in it)."""
    final: dict[int, int | None] = {}
    for v in verdicts:
        if v.token is not None:
            final[v.token] = None if v.kind is Kind.TOKEN_COLLISION else (v.mark & BACKEND_MASK) | JOIN
    return TokenWrites([(t, m) for t, m in final.items() if m is not None],
                       [t for t, m in final.items() if m is None])


def learned_at(now: float, ttl: float, seconds_left: float) -> float:
    """When a token the kernel map holds with `seconds_left` to live was learned, on the clock `now`
    is read from (the map's timeout and the core's table's TTL are the same)."""
    return now - max(0.0, ttl - seconds_left)


def may_hold(workers: int, held: int, hold_max: int) -> bool:
    """An unknown join may wait only where another worker may learn its token, and only so many."""
    return workers > 1 and held < hold_max


class Held(StrEnum):
    FOUND = "held_found"  # its token reached the kernel map: to its backend
    EXPIRED = "held_expired"  # waited long enough: the unknown-join policy
    WAITING = "held_waiting"


def held_outcome(found_in_map: bool, now: float, deadline: float) -> Held:
    if found_in_map:
        return Held.FOUND
    return Held.EXPIRED if now >= deadline else Held.WAITING
