"""Joins that raced their token, held in the queue (core.held.HeldJoins keeps them): each goes to
its connection's backend as soon as the token is known, is dropped once when held too long (the
client sends it again), or gets the unknown-join policy when held too long again or pushed out
for a newer one. Every held packet gets a verdict, whatever happens."""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable

from ..core.balancer import Balancer
from ..core.held import Held, HeldJoin, HeldJoins
from ..core.verdicts import Kind, Verdict
from .logs import ThrottledLog
from .tokenstore import TokenStore

# A join held where the token may come from another worker (workers > 1) asks the kernel map for
# its token this long after it came, then at doubling intervals, and when it expires; at most
# RECHECKS_PER_TURN lookups a loop turn, so that a flood of unknown tokens costs a bounded share
RECHECK_SECONDS = 0.002
RECHECKS_PER_TURN = 32
LONGEST_WAIT_MS = 200  # the loop's wait when no held join is due sooner


class Holding:
    def __init__(self, budget: int, seconds: float, other_workers: bool, balancer: Balancer, tokens: TokenStore,
                 give: Callable[[object, Verdict], None], stats: Counter[str], errors: ThrottledLog, peers=None):
        self.joins = HeldJoins(budget, seconds, RECHECK_SECONDS if other_workers else None)
        self.balancer, self.tokens, self.give, self.stats, self.errors = balancer, tokens, give, stats, errors
        self.peers = peers  # in a cluster: the joins it steered are published (ops.peers.Peers, or fleet.ToFirstWorker)

    def __len__(self) -> int:
        return len(self.joins)

    def hold(self, packet, segment, now: float) -> None:
        for join in self.joins.make_room():  # (one past its deadline had its time: expired)
            self.let_go(join, Held.EXPIRED if join.deadline <= now else Held.PUSHED_OUT, now)
        packet.retain()
        self.joins.hold(packet, segment, segment.join.token, now)

    def release(self) -> None:
        """Held joins whose token is known now go to its backend; those held too long get the
        unknown-join policy. A worker that reads no copies looks its held joins' tokens up in the
        kernel map, where another worker puts them."""
        if not self.joins:  # (the loop's every turn)
            self.balancer.take_newly_known()
            return
        now = time.perf_counter()
        looks_up = self.joins.recheck_after is not None
        if looks_up:
            for join in self.joins.due_for_recheck(now, RECHECKS_PER_TURN):
                self.found(join.token, now)
        for token in self.balancer.take_newly_known():
            for join in self.joins.release(token):
                self.let_go(join, Held.FOUND, now)
        for join in self.joins.expired(now):
            if not (looks_up and self.found(join.token, now, join)):
                self.let_go(join, Held.EXPIRED, now)

    def found(self, token: int, now: float, expiring: HeldJoin | None = None) -> bool:
        """If the kernel map has this token, the joins held for it (and `expiring`, already out
        of the held ones) go where the map says."""
        mark = self.tokens.found_in_kernel(token)
        if mark is None:
            return False
        for join in self.joins.release(token) + ([expiring] if expiring else []):
            self.stats[Held.FOUND] += 1
            verdict = self.balancer.decide_join_by(join.segment, mark, now)
            self.tell_peers(join, verdict, Held.FOUND)
            self.give(join.packet, verdict)
        return True

    def let_go(self, join: HeldJoin, outcome: Held, now: float) -> None:
        """A held join's verdict, by what the core knows now (its token, or the unknown-join
        policy); one that waited in vain the first time is dropped (core.held)."""
        if outcome is Held.EXPIRED and self.joins.drop_first_expiry(join.segment.flow, join.token, now):
            self.stats[Held.DROPPED_ONCE] += 1
            self.give(join.packet, Verdict(False, 0, Kind.JOIN_HELD))
            return
        self.stats[outcome] += 1
        try:
            verdict = self.balancer.decide(join.segment, 0, now)
        except Exception:  # never a held packet without a verdict
            self.errors.error("decision", "deciding a held join failed; accepted unchanged", exc_info=True)
            self.stats["errors"] += 1
            join.packet.accept()
            return
        self.tell_peers(join, verdict, outcome)
        self.give(join.packet, verdict)

    def tell_peers(self, join: HeldJoin, verdict: Verdict, outcome: Held) -> None:
        """In a cluster: a held join steered by its token is published; one that gave up is
        remembered, should its token come later."""
        if not self.peers:
            return
        if verdict.kind is Kind.JOIN_HIT:
            self.peers.steered(join.segment.flow, join.token, verdict.mark, held=True)
        elif outcome is not Held.FOUND:
            self.peers.gave_up_on(join.token)

    def wait_ms(self) -> int:
        """The loop's wait: until the next held join is due, LONGEST_WAIT_MS at most."""
        due = self.joins.next_deadline()
        return LONGEST_WAIT_MS if due is None else \
            max(1, min(LONGEST_WAIT_MS, math.ceil((due - time.perf_counter()) * 1000)))

    def let_all_go(self) -> None:
        """On the way out: never leave a packet without a verdict."""
        for join in list(self.joins):
            self.give(join.packet, self.balancer.decide(join.segment, 0, time.perf_counter()))
