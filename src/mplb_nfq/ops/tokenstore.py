"""The kernel token map and the core's token tables, written here and nowhere else: the tokens a
batch learned written in one transaction, a refusal or a failure turned into what the core
should know, tokens read back after a restart or found there by a held join, those a cluster's
peers taught or ended, and the tokens of closed connections taken out."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ..core.balancer import Balancer
from ..core.marks import BACKEND_MASK, DISPLACEABLE, JOIN, REJECT
from ..core.news import peer_comment
from ..core.packet import Segment, capable_copy, parse_ip
from ..core.tokens import (AMBIGUOUS, INSTALL_PENDING, PROVISIONAL_SECONDS, TokenWrites, flow_comment,
                           flow_of_comment, learned_at, plan_writes)
from ..core.verdicts import Kind, Verdict
from ..kernel.conntrack import Ended, FollowerLost, Save, Saved, Watch
from ..kernel.copies import CopyReader
from ..kernel.snapshot import write_tokens
from .logs import ThrottledLog


# Tokens to watch go to the conntrack follower at most this often: a send per batch woke it just as
# clients set up their joins (joins done before a 20 KB connection ended: 98-99 without, 89-97 with)
WATCH_SECONDS, WATCH_CHUNK = 1.0, 10_000
SAVE_SECONDS = 10.0  # the longest a stopping worker waits for the conntrack follower's snapshot


def peers_value(mark: int) -> int:
    """The kernel map's value for a token a cluster's balancer teaches: its backend's joins, and a
    connection here may displace it."""
    return (mark & BACKEND_MASK) | JOIN | DISPLACEABLE


class TokenStore:
    def __init__(self, balancer: Balancer, dataplane, stats: Counter[str], errors: ThrottledLog):
        self.balancer, self.dataplane, self.stats, self.errors = balancer, dataplane, stats, errors
        self.lifetimes: list[tuple[int, tuple]] = []  # tokens and their connections, for the conntrack reader
        self.handed_over: list[tuple[int, tuple]] = []  # a peer's ended tokens: is the connection here?
        self.peers = None  # in a cluster (ops.peers.Peers): what this balancer learns, it publishes
        self.next_watch = 0.0

    def send_watches(self, follower, handed_over: bool = False) -> None:
        """The connections whose tokens the conntrack follower watches (the first worker's, through it)."""
        tokens = self.handed_over if handed_over else self.lifetimes
        if tokens and (handed_over or time.monotonic() >= self.next_watch):
            self.next_watch = self.next_watch if handed_over else time.monotonic() + WATCH_SECONDS
            for start in range(0, len(tokens), WATCH_CHUNK):  # (a restart watches a million)
                follower.send(Watch(tokens[start:start + WATCH_CHUNK], handed_over))
            tokens.clear()

    def write(self, verdicts: list[Verdict]) -> set[int]:
        """One transaction of installs, then the replacements and rejections (rare, one by one);
        returns the tokens that did not get in."""
        flows = {v.token: v.flow for v in verdicts if v.token is not None and v.flow is not None}
        comments = {token: flow_comment(flow) for token, flow in flows.items()}
        writes, failed = plan_writes(verdicts), set()
        writes = self._delete_pushed_out(writes)
        refused = []
        for field, timeout in (("install", None), ("provisional", PROVISIONAL_SECONDS)):
            tokens = getattr(writes, field)
            if not tokens:
                continue
            try:
                refused += self.dataplane.add_tokens(tokens, comments, timeout)
            except Exception as e:  # the core still knows them: their joins get queued, and reach their backend
                self.errors.error("install", f"token install failed ({len(tokens)} tokens): {e}")
                self.stats["token_install_errors"] += len(tokens)
                failed |= {token for token, _ in tokens}
                writes = writes._replace(**{field: []})
        if refused:
            try:
                writes = writes.refused({t: self.dataplane.lookup_token(t) for t in refused})
            except Exception as e:  # whose they are is not known: not installed, for now
                self.errors.error("install", f"looking refused tokens up failed: {e}")
                failed |= set(refused)
                writes = writes._replace(install=[w for w in writes.install if w[0] not in failed],
                                         provisional=[w for w in writes.provisional if w[0] not in failed])
        self.stats["tokens_installed"] += len(writes.install)
        self.stats["tokens_provisional"] += len(writes.provisional)
        now = time.perf_counter()
        for token in writes.ignored:  # another worker's connection holds it: theirs, not ours
            self.balancer.forget(token)
            self.stats["tokens_refused"] += 1
        for token in set(writes.reject) - {v.token for v in verdicts if v.kind is Kind.TOKEN_COLLISION}:
            self.balancer.collide(token, now)  # the map held it for another worker's connection
        changes = writes.replace + [(token, REJECT) for token in writes.reject]
        if changes:
            try:
                self.dataplane.replace_tokens(changes, comments)
                self.stats["tokens_rejected"] += len(writes.reject)
                self.stats["tokens_installed"] += len(writes.replace)
            except Exception as e:  # the joins that reach this worker are still decided by the core
                self.errors.error("replace", f"replacing tokens in the kernel map failed: {e}")
                self.stats["token_install_errors"] += len(changes)
                failed |= {token for token, _ in writes.replace}
        if writes.renew:
            try:
                self.dataplane.renew_tokens(writes.renew, comments)
                self.stats["tokens_proven"] += len(writes.renew)
            except Exception as e:  # the map's provisional timeout takes them; the core tries again
                self.errors.error("renew", f"renewing {len(writes.renew)} proven tokens failed: {e}")
                self.stats["token_install_errors"] += len(writes.renew)
                failed |= {token for token, _ in writes.renew}
        for token in failed:
            self.balancer.install_failed(token, now)
        # a provisional token is neither watched nor published: one spoofed packet made it
        lasting = {t: m for t, m in writes.install + writes.replace + writes.renew if t not in failed}
        self.lifetimes.extend((t, flows[t]) for t in lasting if t in flows)
        if self.peers:
            self.peers.learned(lasting, flows)
        return failed

    def _delete_pushed_out(self, writes: TokenWrites) -> TokenWrites:
        """Provisional tokens pushed out of the core's pool for newer ones leave the map first;
        those learned and pushed out within this batch never go in."""
        pushed_out = self.balancer.provisional.take_pushed_out()
        if not pushed_out:
            return writes
        self.stats["tokens_pushed_out"] += len(pushed_out)
        learned_now = {token for token, _ in writes.provisional}
        installed = list({token for token in pushed_out if token not in learned_now})
        if installed:
            try:
                self.dataplane.delete_tokens(installed)
            except Exception as e:  # their short timeout takes them soon
                self.errors.error("delete", f"deleting {len(installed)} provisional tokens failed: {e}")
        now = time.perf_counter()
        return writes._replace(provisional=[(token, mark) for token, mark in writes.provisional
                                            if self.balancer.provisional.get(token, now) is not None])

    def learn(self, reader: CopyReader, limit: int) -> int:
        """Copies of MP_CAPABLE handshake packets, each with its connection's backend mark: their
        tokens go to the kernel map in one transaction. The packets went on long ago. In a
        cluster, copies of the joins the kernel steered too. Returns the count of copies read."""
        copies = reader.read(limit)
        now, verdicts = time.perf_counter(), []
        for payload, mark in copies:
            try:
                found = capable_copy(payload) if mark & BACKEND_MASK else None
                if found is not None:
                    verdict = self.balancer.learn_copy(found, mark, now)
                else:
                    segment = parse_ip(payload)
                    if self.peers and isinstance(segment, Segment) and segment.is_syn and segment.join is not None:
                        # a cluster's: a join the kernel steered; its peers keep its backend if the router moves it
                        self.peers.steered(segment.flow, segment.join.token, mark)
                        continue
                    verdict = self.balancer.decide(segment, mark, now)
            except Exception:  # a bug must not stop the learning of the others
                self.errors.error("copy", "learning from a copy failed", exc_info=True)
                self.stats["errors"] += 1
                continue
            if verdict.token is not None:
                verdicts.append(verdict)
        self.stats["copies"] += len(copies)
        self.stats["copies_lost"] = reader.lost
        if verdicts:
            self.write(verdicts)
        return len(copies)

    def lasting(self, now: float):
        """(token, value as the kernel map holds it, seconds left) of the tokens the core holds
        and the map has (a collision is REJECT there; a failed install is not there)."""
        for token, value, left in self.balancer.tokens.items(now):
            if value == AMBIGUOUS:
                yield token, REJECT, left
            elif not value & INSTALL_PENDING:
                yield token, value, left

    def save(self, place: tuple[Path, str], follower) -> int:
        """At a graceful stop: the conntrack follower writes the connections it watches, then this
        worker the tokens it holds (kernel.snapshot); ends told meanwhile are applied first. The
        count of tokens saved (0: the follower did not answer, nothing is left to read back)."""
        try:
            self.next_watch = 0.0
            self.send_watches(follower)  # those not sent yet are saved with the rest
            follower.send(Save(*place))
            deadline = time.monotonic() + SAVE_SECONDS
            while follower.poll(max(0.0, deadline - time.monotonic())):
                told = follower.recv()
                if isinstance(told, Ended):
                    self.ended(told.tokens)
                elif isinstance(told, Saved):
                    return write_tokens(*place, self.lasting(time.perf_counter()))
        except FollowerLost:  # the next worker reads the map back
            pass
        return 0

    def restore(self, kept: tuple) -> int:
        """A restarted worker's token table from the snapshot the one before left (kernel.snapshot:
        tokens, values, seconds left, oldest first as the core held them): as `adopt`, without
        reading the map (its connections are the conntrack follower's to load)."""
        now, ttl = time.perf_counter(), self.balancer.tokens.ttl
        for token, mark, left in zip(*kept):
            self.balancer.learn_token(token, mark, learned_at(now, ttl, left))
        return len(kept[0])

    def adopt(self) -> int:
        """A restarted worker rebuilds its token table from the kernel map it finds, and watches
        the connections the elements' comments name."""
        now, ttl = time.perf_counter(), self.balancer.tokens.ttl
        adopted = 0
        for token, mark, left, comment in sorted(self.dataplane.read_tokens(), key=lambda t: t[2]):
            if mark & REJECT or self.balancer.backend_of(mark) is not None:
                flow = flow_of_comment(comment or "")
                if flow is not None and mark & DISPLACEABLE and left <= PROVISIONAL_SECONDS:
                    self.balancer.learn_provisional(token, mark, flow, learned_at(now, PROVISIONAL_SECONDS, left))
                    adopted += 1
                    continue
                self.balancer.learn_token(token, mark, learned_at(now, ttl, left))
                if flow is not None:
                    self.lifetimes.append((token, flow))
                elif self.peers:
                    self.peers.adopted(token, comment)
                adopted += 1
        return adopted

    def from_peer(self, tokens: list[tuple[int, int]], origin: str, connections: dict[int, tuple]) -> list[int]:
        """Tokens a peer balancer taught (token -> backend mark; connections: token -> its first
        flow, where known), unless this balancer knows them already (its own connection's keeps
        what it is); returns those that went in."""
        now = time.perf_counter()
        fresh = [(token, peers_value(mark)) for token, mark in tokens if self.balancer.known_token(token, now) is None]
        if not fresh:
            return []
        comments = {token: peer_comment(origin, connections.get(token)) for token, _ in fresh}
        try:  # a token the map holds already (another connection here) stays as it is
            refused = set(self.dataplane.add_tokens(fresh, comments))
        except Exception as e:  # the core still has them: joins that reach this worker are steered
            self.errors.error("peer-install", f"installing {len(fresh)} tokens from {origin} failed: {e}")
            refused = set()
        for token, mark in fresh:
            if token not in refused:
                self.balancer.learn_token(token, mark, now)
        return [token for token, _ in fresh if token not in refused]

    def ended_by_peer(self, tokens: list[int], origin: str) -> None:
        try:
            self.dataplane.delete_tokens(tokens)
        except Exception as e:  # the map's timeout takes them later
            self.errors.error("peer-delete", f"deleting {len(tokens)} tokens {origin} ended failed: {e}")
        for token in tokens:
            self.balancer.forget(token)

    def hand_over(self, tokens: list[tuple[int, tuple]]) -> None:
        """A peer ended tokens it taught (its conntrack entry is gone): kept until this balancer's
        conntrack reader says whether their connections (token, first flow) moved here."""
        self.handed_over += tokens

    def take_over(self, tokens: dict[int, tuple]) -> dict[int, int]:
        """Tokens whose connection (token -> first flow) moved here: now this balancer's, named
        by their connection in the kernel map (a restarted worker watches them); returns their marks."""
        now = time.perf_counter()
        marks = {token: peers_value(mark) for token in tokens  # as a peer's was
                 if (mark := self.balancer.known_token(token, now)) is not None and self.balancer.backend_of(mark)}
        if marks:
            try:
                self.dataplane.replace_tokens(list(marks.items()), {t: flow_comment(tokens[t]) for t in marks})
            except Exception as e:  # the map's element still steers; a restart would not watch it
                self.errors.error("take-over", f"renaming {len(marks)} tokens taken over failed: {e}")
        self.stats["tokens_taken_over"] += len(marks)
        return marks

    def found_in_kernel(self, token: int) -> int | None:
        """A held join's token, looked up in the kernel map (another worker put it there): its
        mark. The core keeps it for as long as the map does, unless it is provisional there
        (only the worker that reads copies can see it proven, or it goes in 30 s)."""
        try:
            found = self.dataplane.token_element(token)
        except Exception as e:  # the join gets what the core knows
            self.errors.error("lookup", f"looking a held join's token up failed: {e}")
            return None
        if found is None:
            return None
        mark, left = found
        if not (mark & DISPLACEABLE and left <= PROVISIONAL_SECONDS):
            self.balancer.learn_token(token, mark, learned_at(time.perf_counter(), self.balancer.tokens.ttl, left))
        return mark

    def forgotten(self, tokens: list[int]) -> None:
        """Another worker took them out of the kernel map: this worker's core forgets them too."""
        for token in tokens:
            self.balancer.forget(token)

    def ended(self, tokens: list[int]) -> None:
        """Their connections have left conntrack: the tokens go from the map and the core (those a
        peer teaches now, which it took over, are the peer's to end)."""
        if self.peers:
            tokens = [token for token in tokens if token not in self.peers.taught]
        if not tokens:
            return
        try:
            self.dataplane.delete_tokens(tokens)
        except Exception as e:  # the map's own timeout takes them later
            self.errors.error("delete", f"deleting {len(tokens)} tokens of closed connections failed: {e}")
            return
        for token in tokens:
            self.balancer.forget(token)
        self.stats["tokens_removed"] += len(tokens)
        if self.peers:
            self.peers.ended(tokens)
