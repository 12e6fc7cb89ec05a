"""Joins held in the queue until their token is known: a join may race the copy of its
connection's handshake (or, in a cluster, a peer's news) by a few milliseconds. Pure: time is
passed in, packets are opaque.

A flood of joins with random tokens must not crowd the real ones out, nor cost a scan per
loop turn: joins are found by token when it is learned, expire in the order they came, and when
the budget is spent the oldest goes first (it has had its chance: a real join's token comes
within a round trip, and the newest is the likeliest to be one still waiting).

A join whose token did not come within its wait is dropped, once: the client sends its SYN again
a second later, when a token that was slow (a stalled worker, a peer's late news) is in the
kernel map and the join goes straight to its backend. A guess (the unknown-join policy) would
send it to the wrong backend as often as not, and a subflow reset there is not tried again. The
join sent again waits once more, then meets the policy. Those dropped are remembered for
RETRY_SECONDS, as many as joins may be held: strangers' joins can push a real one out of that
memory, and then it is dropped again when sent again: a join whose token is only late still
reaches its backend, one whose token never comes is dropped at each try under a flood, never
sent to a guessed backend.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from enum import StrEnum

RETRY_SECONDS = 3.0  # a dropped join SYN comes again a second after it was first sent (then 3 s, 7 s)


class Held(StrEnum):
    FOUND = "held_found"  # its token became known: to its backend
    DROPPED_ONCE = "held_dropped_once"  # waited hold_ms: dropped, its token may be known when it comes again
    EXPIRED = "held_expired"  # waited hold_ms, dropped once, waited again: the unknown-join policy
    PUSHED_OUT = "held_pushed_out"  # the budget was spent on newer joins: the unknown-join policy


class HeldJoin:
    __slots__ = ("packet", "segment", "token", "deadline", "interval", "waiting")

    def __init__(self, packet, segment, token: int, deadline: float, interval: float | None):
        self.packet, self.segment, self.token = packet, segment, token
        self.deadline, self.interval, self.waiting = deadline, interval, True


class HeldJoins:
    """At most `budget` joins, each for `seconds`. recheck_after: where no news of a token can
    come (another worker learns it and puts it in the kernel map), a join's token is asked for
    that long after it came, then after twice as long, and so on; None where news always comes."""

    def __init__(self, budget: int, seconds: float, recheck_after: float | None = None):
        self.budget, self.seconds, self.recheck_after = budget, seconds, recheck_after
        self._by_token: dict[int, list[HeldJoin]] = {}
        self._order: deque[HeldJoin] = deque()  # oldest first: deadlines in order
        self._rechecks: list[tuple[float, int, HeldJoin]] = []  # a heap: (when, tie-break, join)
        self._sequence = itertools.count()
        self._count = 0
        self._dropped: OrderedDict[tuple, float] = OrderedDict()  # (flow, token) -> when it was dropped

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return (join for join in self._order if join.waiting)

    def make_room(self) -> list[HeldJoin]:
        """Before a hold: those pushed out for one more (the budget is at least 1), oldest first."""
        return [self._take(self._oldest()) for _ in range(self._count - self.budget + 1)]

    def hold(self, packet, segment, token: int, now: float) -> None:
        """Hold a join; make_room() first."""
        join = HeldJoin(packet, segment, token, now + self.seconds, self.recheck_after)
        self._by_token.setdefault(token, []).append(join)
        self._order.append(join)
        if self.recheck_after is not None:
            heapq.heappush(self._rechecks, (now + self.recheck_after, next(self._sequence), join))
        self._count += 1

    def release(self, token: int) -> list[HeldJoin]:
        """Its token is known now: the joins that waited for it."""
        joins = self._by_token.pop(token, [])
        for join in joins:
            join.waiting = False
        self._count -= len(joins)
        return joins

    def expired(self, now: float) -> list[HeldJoin]:
        gone = []
        while self._order and (not self._order[0].waiting or self._order[0].deadline <= now):
            join = self._order.popleft()
            if join.waiting:
                gone.append(self._take(join))
        return gone

    def drop_first_expiry(self, flow: tuple, token: int, now: float) -> bool:
        """An expired join: True the first time (drop it; remembered), False when it is the one
        dropped before, sent again (the policy)."""
        key = (flow, token)
        while self._dropped and next(iter(self._dropped.values())) < now - RETRY_SECONDS:
            self._dropped.popitem(last=False)
        if self._dropped.pop(key, None) is not None:
            return False
        self._dropped[key] = now
        if len(self._dropped) > self.budget:
            self._dropped.popitem(last=False)
        return True

    def due_for_recheck(self, now: float, limit: int) -> list[HeldJoin]:
        """At most `limit` joins whose token is due to be asked for (each again later, at
        doubling intervals, while it waits)."""
        due, rechecks = [], self._rechecks
        while rechecks and len(due) < limit and rechecks[0][0] <= now:
            _, _, join = heapq.heappop(rechecks)
            if join.waiting:
                due.append(join)
                join.interval *= 2
                if now + join.interval < join.deadline:
                    heapq.heappush(rechecks, (now + join.interval, next(self._sequence), join))
        return due

    def next_deadline(self) -> float | None:
        """When something is next due (a recheck or an expiry); None when nothing is held."""
        while self._rechecks and not self._rechecks[0][2].waiting:
            heapq.heappop(self._rechecks)
        while self._order and not self._order[0].waiting:
            self._order.popleft()
        times = ([self._rechecks[0][0]] if self._rechecks else []) + ([self._order[0].deadline] if self._order else [])
        return min(times) if times else None

    def _oldest(self) -> HeldJoin:
        while not self._order[0].waiting:
            self._order.popleft()
        return self._order.popleft()

    def _take(self, join: HeldJoin) -> HeldJoin:
        join.waiting = False
        self._count -= 1
        same = self._by_token.get(join.token)
        if same is not None:
            same.remove(join)
            if not same:
                del self._by_token[join.token]
        return join
