"""The worker: the hot path and the wiring of its loop. Copies of handshakes -> tokens in the kernel
map; NFQUEUE packets (raced joins, SYNs the kernel does not decide) -> core decision -> verdict;
each turn: held joins, the control socket, reloads, scheduler tables, counts, the cluster's turn."""
from __future__ import annotations

import logging
import time

from .core.marks import LEARNED, PROVISIONAL, REJECT
from .core.packet import parse_ip
from .core.schedulers import Index
from .core.settings import Config
from .core.verdicts import Kind, Verdict
from .kernel.conntrack import Counts, Ended, HandedOver, Load, Watch, start_reader
from .kernel.copies import CopyReader
from .kernel.dataplane import Dataplane
from .kernel.queue import QueueReader, set_fail_open
from .kernel.ruleset import COPY_SNAPLEN
from .ops.cluster_turn import ClusterTurn
from .ops.controlplane import ControlPlane
from .ops.counters import Report
from .ops.fleet import Fleet, GaveUp, Steered, ToFirstWorker
from .ops.holding import Holding
from .ops.logs import ThrottledLog
from .ops.loop import Loop
from .ops.peers import Peers
from .ops.tokenstore import TokenStore

log = logging.getLogger("mplb_nfq.worker")
BATCH = 256  # packets handled between two turns of the housekeeping (held joins, control, counts)
# While the kernel decides every SYN, what reaches the worker is copies and the joins that raced
# them (rarely an established flow's first packet here: a flow a router moved), nothing a client
# waits on to connect: what wakes the worker then waits this long for what follows it, and all of
# it is taken in one turn; not when an operator's command woke it, nor after a turn that stopped
# at BATCH (a worker that is behind goes on at once). A turn per packet (a copy, then its raced
# joins), each at the moment its connection was in its handshake, cost more CPU than the
# learning, on the cores the connections use (1 KB MPTCP fetches at 1,000/s: the worker's CPU
# 42 -> 19 ticks of 10 ms per 3,000, the fetches' p99 650-701 -> 581 µs, plain forwarding
# 488-535; a turn at once when the last was 5 ms ago did not help: 694; 10 ms made bursts: 885).
# Every join races its token's copy then, and waits up to this long in the queue (twice under
# direct server return, where its first ACK is queued too).
GATHER_SECONDS = 0.005
REPORT_SECONDS = 0.5  # a worker beyond the first reports its counts to the first this often


class Worker:
    def __init__(self, cfg: Config, dataplane: Dataplane):
        self.dataplane = dataplane
        self.balancer = cfg.balancer()
        self.counters = Report()
        self.stats = self.counters.stats
        self.plane = ControlPlane(cfg, self.balancer, dataplane, Fleet(), self.counters)
        self.decided: list[tuple[object, Verdict]] = []  # their verdicts go out together
        self.errors = ThrottledLog(log)
        self.tokens = TokenStore(self.balancer, dataplane, self.stats, self.errors)
        self.peers = Peers(cfg.cluster.balancer, self.balancer, dataplane, self.tokens, self.errors) \
            if cfg.cluster else None
        self.tokens.peers = self.plane.peers = self.peers
        self.held = Holding(cfg.hold_max, cfg.hold_ms / 1000, cfg.workers > 1, self.balancer, self.tokens, self.give,
                            self.stats, self.errors, self.peers)
        self.reload_requested = False
        # kernel.snapshot's (path, identity), for a graceful stop; restored: the tokens came from one
        self.snapshot, self.restored = None, False
        self.follower = None  # kernel.conntrack.Follower, started before the tokens are adopted: see service.run
        self.gathers_for, self.gathering = None, 0.0  # the services gather_seconds() last looked at, its answer
        self.behind = False  # the last turn left packets waiting (a read stopped at BATCH)

    # -- the hot path ------------------------------------------------------------------------
    def handle(self, packet) -> None:
        """NetfilterQueue callback: decide, keep the packet for give_decided(). A verdict carries its packet's
        forwarding, which cools the caches: decisions, then verdicts, in a row: a fifth more packets/CPU-s."""
        started = time.perf_counter()
        cfg = self.plane.cfg
        try:
            segment = parse_ip(packet.get_payload())
            # a join may wait where its token may yet come: from a copy of its connection's handshake,
            # from another worker, or from a peer balancer
            learned_elsewhere = cfg.workers > 1 or cfg.handshakes == "kernel" or cfg.cluster is not None
            verdict = self.balancer.decide(segment, packet.get_mark(), started, learned_elsewhere and cfg.hold_max > 0)
            if verdict.kind is Kind.JOIN_HELD:
                self.held.hold(packet, segment, started)
                return
            if verdict.kind is Kind.JOIN_HIT and self.peers:
                self.peers.steered(segment.flow, segment.join.token, verdict.mark)
        except Exception:  # a bug must not stall the queue: accept unchanged and count it
            self.errors.error("decision", "decision failed; packet accepted unchanged", exc_info=True)
            self.stats["errors"] += 1
            packet.accept()
            return
        self.decided.append((packet, verdict))  # a later verdict needs no retain(): only the payload is reused
        self.counters.latency.observe(time.perf_counter() - started)

    def gather_seconds(self) -> float:
        """GATHER_SECONDS while no SYN needs the worker (handshakes in the kernel, no `lc` service)
        and the last turn took all there was; 0 otherwise (a worker that is behind never waits)."""
        if self.behind:
            self.behind = False
            return 0.0
        services = self.balancer.services
        if services is not self.gathers_for:  # a reload's
            self.gathers_for = services
            self.gathering = GATHER_SECONDS if self.plane.cfg.handshakes == "kernel" and \
                all(s.index is not Index.WORKER for s in services) else 0.0
        return self.gathering

    def learn(self, copies: CopyReader) -> None:
        """A turn's copies; a held join goes as soon as the copy of its connection's handshake is read."""
        self.behind |= self.tokens.learn(copies, BATCH) >= BATCH
        self.held.release()

    def give_decided(self) -> None:
        """The tokens learned go to the kernel map before any verdict: a SYN-ACK's verdict lets the
        handshake finish, and the client's first join follows within a round trip; it must find
        its token there, or be queued. A verdict whose token did not get in keeps its flow
        unsettled, so that the connection's next MP_CAPABLE packet tries again."""
        failed = self.tokens.write([verdict for _, verdict in self.decided]) \
            if any(verdict.token is not None for _, verdict in self.decided) else ()
        for packet, verdict in self.decided:
            if verdict.token in failed:
                verdict = verdict._replace(mark=verdict.mark & ~(LEARNED | PROVISIONAL))
            self.give(packet, verdict)
        self.decided.clear()

    def give(self, packet, verdict: Verdict) -> None:
        if verdict.accept:
            packet.set_mark(verdict.mark)
            packet.accept()
            self.stats["reject" if verdict.mark & REJECT else "accept"] += 1
        else:
            packet.drop()
            self.stats["drop"] += 1

    # -- messages from the other processes ---------------------------------------------------
    def from_conntrack(self, message: Counts | Ended | HandedOver) -> None:
        if isinstance(message, Ended):
            self.tokens.ended(message.tokens)
            self.plane.fleet.broadcast(message)
        elif isinstance(message, HandedOver):  # (in a cluster)
            self.peers.handed_over_found(message.here, message.elsewhere)
        else:
            self.plane.apply_conntrack_counts(message)

    def beyond_the_first(self, parent) -> None:
        """In a worker beyond the first: in a cluster, the joins it steers go to the first
        worker, which publishes them; its own copy of the peers' state is not used."""
        if self.peers:
            self.peers = self.held.peers = ToFirstWorker(parent)
            self.tokens.peers = self.plane.peers = None

    def from_first_worker(self, message) -> None:
        if isinstance(message, Ended):  # it took them out of the kernel map
            self.tokens.forgotten(message.tokens)
        else:
            self.plane.apply(message)

    def from_other_worker(self, index: int, message: Report | Watch | Steered | GaveUp) -> None:
        if isinstance(message, Watch):
            self.tokens.lifetimes += message.tokens
        elif isinstance(message, Steered):
            self.peers.steered(message.flow, message.token, message.mark, message.held)
        elif isinstance(message, GaveUp):
            self.peers.gave_up_on(message.token)
        else:
            self.plane.fleet.reports[index] = message

    # -- the loop ----------------------------------------------------------------------------
    def serve(self, ready=lambda: None, parent=None, index: int = 0, cluster: ClusterTurn | None = None) -> None:
        """The loop of worker `index` (queue cfg.queue + index). The first one (no parent) also
        serves the control socket, counts conntrack and reads the copies; the others hear from it
        through parent."""
        from netfilterqueue import NetfilterQueue

        from .ops.control import ControlServer

        plane, cfg, first, loop = self.plane, self.plane.cfg, parent is None, Loop()
        if first:
            # The follower starts first: a child must not inherit the queue's socket, or a killed
            # worker would leave the queue bound to nobody reading, and no bypass.
            conntrack = self.follower or start_reader(cfg.conntrack_interval)
            if self.restored:  # the connections the snapshot keeps are the follower's to read
                conntrack.send(Load(*self.snapshot))
            loop.watch(conntrack.fileno(), lambda: self.from_conntrack(conntrack.recv()))
            for i, other in enumerate(plane.fleet.pipes, 1):
                loop.watch(other.fileno(), lambda other=other, i=i: self.from_other_worker(i, other.recv()), pipe=True)
        else:
            loop.watch(parent.fileno(), lambda: self.from_first_worker(parent.recv()), pipe=True)
            self.beyond_the_first(parent)
        copies = CopyReader(cfg.queue, COPY_SNAPLEN) if first and (cfg.handshakes == "kernel" or cfg.cluster) else None
        nfq = NetfilterQueue()
        nfq.bind(cfg.queue + index, self.handle, max_len=4096)
        set_fail_open(nfq.get_fd(), cfg.queue + index)
        queue_reader = QueueReader(nfq.get_fd(), BATCH, self.decided, self.give_decided)

        def read_queue():
            queue_reader.left = BATCH
            try:
                nfq.run_socket(queue_reader)
            finally:
                self.give_decided()
            self.behind |= queue_reader.left <= 0

        if copies:  # watched first: poll answers in this order, and a join that raced a copy of the
            # same turn then finds its token known
            loop.watch(copies.fileno(), lambda: self.learn(copies))
        loop.watch(nfq.get_fd(), read_queue)
        control = ControlServer(cfg.control_socket, plane.control, lambda fd, read: loop.watch(fd, read, at_once=True),
                                loop.unwatch) if first else None
        if control:
            loop.watch(control.fileno(), control.accept_ready, at_once=True)
            loop.every_turn(control.expire)
        loop.every_turn(self.held.release)
        loop.every_turn(lambda: self.tokens.send_watches(conntrack if first else parent))
        loop.every_turn(self.reload_if_requested)
        if first:
            loop.every_turn(plane.sync_unavailable)
            if self.peers:
                loop.every_turn(lambda: self.tokens.send_watches(conntrack, handed_over=True))
        if cluster:
            cluster.start(loop)
            loop.every_turn(cluster.turn)
        if not first:
            loop.every(REPORT_SECONDS, lambda: parent.send(plane.own_report()))
        log.info("worker %d listening on queue %d", index, cfg.queue + index)
        ready()
        try:
            loop.run(lambda: not plane.stopping, self.held.wait_ms, self.gather_seconds)
        finally:
            if cluster:
                cluster.close()
            self.held.let_all_go()
            nfq.unbind()
            if copies:
                copies.close()
            if control:
                control.close()
                if self.snapshot and plane.stopping:
                    log.info("saved %d tokens for the next worker", self.tokens.save(self.snapshot, conntrack))
                conntrack.kill()

    def reload_if_requested(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            self.plane.reload()
