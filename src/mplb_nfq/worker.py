"""The worker: the loop and its wiring. Copies of handshakes -> tokens in the kernel map; NFQUEUE
packets (raced joins, SYNs the kernel does not decide) -> core decision -> verdict; then held
joins, the control socket, reloads, the scheduler tables and counts."""
from __future__ import annotations

import json
import logging
import math
import select
import time

from .core.marks import LEARNED, PROVISIONAL, REJECT
from .core.packet import parse_ip
from .core.held import Held, HeldJoin, HeldJoins
from .core.verdicts import Kind, Verdict
from .kernel.announce import Announcement
from .kernel.conntrack import Counts, Gone, HandedOver, Watch, start_reader
from .kernel.copies import CopyReader
from .kernel.dataplane import Dataplane
from .kernel.queue import QueueReader, set_fail_open
from .kernel.ruleset import COPY_SNAPLEN
from .ops.link import LinkHandle, LinkState, PeerNews
from .core.settings import Config
from .ops.controlplane import ControlPlane
from .ops.counters import Report
from .ops.fleet import Fleet, serve_other_worker
from .ops.instance import hold_instance, on_signals
from .ops.logs import ThrottledLog
from .ops.peers import Peers
from .ops.tokenstore import TokenStore

log = logging.getLogger("mplb_nfq.worker")
BATCH = 256  # packets handled between two turns of the housekeeping (held joins, control, counts)
# Tokens to watch go to the conntrack reader at most this often: a send per batch woke it just as
# clients set up their joins (joins done before a 20 KB connection ended: 98-99 without, 89-97 with)
WATCH_SECONDS = 1.0
# A join held where the token may come from another worker (workers > 1) asks the kernel map for
# its token this long after it came, then at doubling intervals, and when it expires; at most
# RECHECKS_PER_TURN lookups a loop turn, so that a flood of unknown tokens costs a bounded share
RECHECK_SECONDS = 0.002
RECHECKS_PER_TURN = 32


class Worker:
    def __init__(self, cfg: Config, dataplane: Dataplane):
        self.dataplane = dataplane
        self.balancer = cfg.balancer()
        self.counters = Report()
        self.stats = self.counters.stats
        self.plane = ControlPlane(cfg, self.balancer, dataplane, Fleet(), self.counters)
        self.held = HeldJoins(cfg.hold_max, cfg.hold_ms / 1000, RECHECK_SECONDS if cfg.workers > 1 else None)
        self.decided: list[tuple[object, Verdict]] = []  # their verdicts go out together
        self.errors = ThrottledLog(log)
        self.tokens = TokenStore(self.balancer, dataplane, self.stats, self.errors)
        self.peers = Peers(cfg.cluster.balancer, self.balancer, dataplane, self.tokens, self.errors) \
            if cfg.cluster else None
        self.tokens.peers = self.plane.peers = self.peers
        self.reload_requested = False

    # -- the hot path ------------------------------------------------------------------------
    def handle(self, packet) -> None:
        """NetfilterQueue callback: decide, and keep the packet for give_decided(). Each verdict carries
        the kernel's forwarding of its packet, which cools the caches: decisions made in a row, then
        verdicts in a row, handle a fifth more packets per CPU-second under load."""
        started = time.perf_counter()
        cfg = self.plane.cfg
        try:
            segment = parse_ip(packet.get_payload())
            # a join may wait where its token may yet come: from a copy of its connection's handshake,
            # from another worker, or from a peer balancer
            learned_elsewhere = cfg.workers > 1 or cfg.handshakes == "kernel" or cfg.cluster is not None
            verdict = self.balancer.decide(segment, packet.get_mark(), started, learned_elsewhere and cfg.hold_max > 0)
            if verdict.kind is Kind.JOIN_HELD:
                for join in self.held.make_room():  # (one past its deadline had its time: expired)
                    self.let_go(join, Held.EXPIRED if join.deadline <= started else Held.PUSHED_OUT, started)
                packet.retain()
                self.held.hold(packet, segment, segment.join.token, started)
                return
            if verdict.kind is Kind.JOIN_HIT and self.peers:
                self.peers.steered(segment.flow, segment.join.token, verdict.mark)
        except Exception:  # a bug must not stall the queue: accept unchanged and count it
            self.errors.error("decision", "decision failed; packet accepted unchanged", exc_info=True)
            self.stats["errors"] += 1
            packet.accept()
            return
        self.decided.append((packet, verdict))  # a later verdict needs no retain(): only the payload is reused
        self.counters.observe(time.perf_counter() - started)

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

    def release_held(self) -> None:
        """Held joins whose token is known now go to its backend; those held too long get the
        unknown-join policy. A worker that reads no copies looks its held joins' tokens up in the
        kernel map, where another worker puts them."""
        now = time.perf_counter()
        looks_up = self.held.recheck_after is not None
        if looks_up:
            for join in self.held.due_for_recheck(now, RECHECKS_PER_TURN):
                self.release_found(join.token, now)
        for token in self.balancer.take_newly_known():
            for join in self.held.release(token):
                self.let_go(join, Held.FOUND, now)
        for join in self.held.expired(now):
            if not (looks_up and self.release_found(join.token, now, join)):
                self.let_go(join, Held.EXPIRED, now)

    def release_found(self, token: int, now: float, expiring: HeldJoin | None = None) -> bool:
        """If the kernel map has this token, the joins held for it (and `expiring`, already out
        of the held ones) go where the map says."""
        mark = self.tokens.found_in_kernel(token)
        if mark is None:
            return False
        for join in self.held.release(token) + ([expiring] if expiring else []):
            self.stats[Held.FOUND] += 1
            self.give(join.packet, self.balancer.decide_join_by(join.segment, mark, now))
        return True

    def let_go(self, join: HeldJoin, outcome: Held, now: float) -> None:
        """A held join's verdict, by what the core knows now (its token, or the unknown-join policy)."""
        self.stats[outcome] += 1
        try:
            verdict = self.balancer.decide(join.segment, 0, now)
        except Exception:  # never a held packet without a verdict
            self.errors.error("decision", "deciding a held join failed; accepted unchanged", exc_info=True)
            self.stats["errors"] += 1
            join.packet.accept()
            return
        if verdict.kind is Kind.JOIN_HIT and self.peers:
            self.peers.held_found(join.token)
            self.peers.steered(join.segment.flow, join.token, verdict.mark)
        self.give(join.packet, verdict)

    def poll_ms(self) -> int:
        """The loop's wait: until the next held join is due, at most 200 ms."""
        due = self.held.next_deadline()
        return 200 if due is None else max(1, min(200, math.ceil((due - time.perf_counter()) * 1000)))

    def from_conntrack(self, message: Counts | Gone | HandedOver) -> None:
        if isinstance(message, Gone):
            self.tokens.gone(message.tokens)
            self.plane.fleet.broadcast(message)
        elif isinstance(message, HandedOver):  # (a cluster's balancer runs one worker)
            self.peers.handed_over_found(message.here, message.elsewhere)
        else:
            self.plane.apply_conntrack_counts(message)

    def from_first_worker(self, message) -> None:
        if isinstance(message, Gone):  # it took them out of the kernel map
            self.tokens.forgotten(message.tokens)
        else:
            self.plane.apply(message)

    def from_link(self, message: PeerNews | LinkState) -> None:
        if isinstance(message, LinkState):
            self.peers.state = message
        else:
            self.peers.news(message)
            self.release_held()  # a join may have waited for this peer's token

    def from_peer(self, index: int, message: Report | Watch) -> None:
        if isinstance(message, Watch):
            self.tokens.lifetimes += message.tokens
        else:
            self.plane.fleet.reports[index] = message

    # -- the loop ----------------------------------------------------------------------------
    def serve(self, ready=lambda: None, parent=None, index: int = 0, cluster_link=None) -> None:
        """The loop of worker `index` (queue cfg.queue + index). The first one (no parent) also
        serves the control socket and counts conntrack; the others hear from it through parent.
        cluster_link: the link to Redis (ops.link.LinkHandle), in a cluster."""
        from netfilterqueue import NetfilterQueue

        from .ops.control import ControlServer

        plane, cfg, first = self.plane, self.plane.cfg, parent is None
        handlers, poller = {}, select.poll()

        def watch(fd, handler):
            handlers[fd] = handler
            poller.register(fd, select.POLLIN)

        def unwatch(fd):
            handlers.pop(fd, None)
            poller.unregister(fd)

        if first:
            # The counter starts first: a child must not inherit the queue's socket, or a killed
            # worker would leave the queue bound to nobody reading, and no bypass.
            conntrack_reader, conntrack = start_reader(cfg.conntrack_interval)
            watch(conntrack.fileno(), lambda: self.from_conntrack(conntrack.recv()))
            for peer_index, peer in enumerate(plane.fleet.peers, 1):
                watch(peer.fileno(), lambda peer=peer, i=peer_index: self.from_peer(i, peer.recv()))
        else:
            watch(parent.fileno(), lambda: self.from_first_worker(parent.recv()))
        pipes = set(handlers)
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

        watch(nfq.get_fd(), read_queue)
        if copies:  # a held join goes as soon as the copy of its connection's handshake is read
            watch(copies.fileno(), lambda: (self.tokens.learn(copies, BATCH), self.release_held()))
        control = ControlServer(cfg.control_socket, plane.control, watch, unwatch) if first else None
        if control:
            watch(control.fileno(), control.accept_ready)
        link, announcement = cluster_link, None

        def watch_link():
            fd = link.pipe.fileno()

            def from_link():
                try:
                    self.from_link(link.recv())
                except EOFError:  # started again in a while; meanwhile this balancer balances alone
                    unwatch(fd)
                    self.peers.state = None

            watch(fd, from_link)

        if link:
            fingerprinted, self.peers.fingerprint = plane.cfg, plane.fingerprint()
            watch_link()
            # after every fork: a child holding the device would keep the route announced
            announcement = Announcement(cfg.cluster.announce_device) if cfg.cluster.announce_device else None
        log.info("worker %d listening on queue %d", index, cfg.queue + index)
        ready()
        next_report = next_watch = 0.0
        try:
            while not plane.stopping:
                for fd, _ in poller.poll(self.poll_ms()):
                    try:
                        handlers.get(fd, lambda: None)()  # (a peer lost earlier in this round)
                    except (EOFError, OSError) as e:
                        if fd not in pipes:
                            raise
                        log.warning("lost a peer: %s", e)  # a worker or the conntrack reader went away
                        unwatch(fd)
                if control:
                    control.expire()
                self.release_held()
                if self.tokens.lifetimes and time.monotonic() >= next_watch:  # to the conntrack reader
                    (conntrack if first else parent).send(Watch(self.tokens.lifetimes))
                    self.tokens.lifetimes, next_watch = [], time.monotonic() + WATCH_SECONDS
                if self.tokens.handed_over:
                    conntrack.send(Watch(self.tokens.handed_over, handed_over=True))
                    self.tokens.handed_over = []
                if self.reload_requested:
                    self.reload_requested = False
                    plane.reload()
                if link and plane.cfg is not fingerprinted:  # a reload: peers compare the new one
                    fingerprinted, self.peers.fingerprint = plane.cfg, plane.fingerprint()
                    link.send(self.peers.fingerprint)
                if first:
                    plane.sync_unavailable()
                if link:
                    self.peers.flush(link)
                    if link.restart_due():
                        link.restart(self.peers.fingerprint)
                        watch_link()
                if announcement:
                    announcement.set(plane.any_available() and self.peers.ready_to_announce())
                    self.peers.announced = announcement.up
                if not first and time.monotonic() >= next_report:
                    parent.send(plane.own_report())
                    next_report = time.monotonic() + 0.5
        finally:
            if announcement:  # first: the router moves this balancer's flows to its peers
                announcement.close()
            if link:
                link.stop()
            for join in list(self.held):  # never leave a packet without a verdict
                self.give(join.packet, self.balancer.decide(join.segment, 0, time.perf_counter()))
            nfq.unbind()
            if copies:
                copies.close()
            if control:
                control.close()
                conntrack_reader.kill()


def run(cfg: Config) -> int:
    """Serve until SIGTERM or SIGINT. The kernel state (table, token map, routes, conntrack
    marks) outlives the process: the next one adopts it; `mplb-nfq cleanup` removes it."""
    instance = hold_instance(cfg.table_name)  # before anything is touched: a second run changes nothing
    dataplane = Dataplane(cfg)
    installed = dataplane.installed_backends()
    cfg = cfg.with_stable_marks(cfg.installed_marks(installed), reserved=installed)
    dataplane.cfg = cfg
    worker = Worker(cfg, dataplane)
    plane = worker.plane
    retired = plane.adopt_retired(installed)
    dataplane.retired = plane.retired_routes()

    on_signals(stop=lambda: setattr(plane, "stopping", True),
               reload=lambda: setattr(worker, "reload_requested", True),
               dump=lambda: print(json.dumps({"event": "stats", **plane.report()}), flush=True))
    try:
        dataplane.install(worker.balancer.lookup_tables())
        adopted = worker.tokens.adopt()
        if adopted or retired:
            log.info("adopted %d tokens from the kernel map; backends gone from the config, retired: %s",
                     adopted, ", ".join(retired) or "none")
        # forked before any thread or socket of the first worker
        plane.fleet.start(cfg.workers, serve_other_worker, (worker,), cfg.queue)
        cluster_link = LinkHandle(cfg.cluster, cfg.token_timeout, plane.fingerprint()) if cfg.cluster else None
        if cfg.metrics_address:
            from .ops.metrics import serve_metrics

            serve_metrics(plane, cfg.metrics_address)
        plane.start_health()
        worker.serve(ready=lambda: print(json.dumps({
            "event": "ready", "queue": cfg.queue, "queue_mode": dataplane.queue_mode, "adopted": adopted,
            "control_socket": cfg.control_socket, "metrics": cfg.metrics_address}), flush=True),
            cluster_link=cluster_link)
    finally:
        if plane.health:
            plane.health.stop()
        plane.fleet.stop()
        instance.close()
    print(json.dumps({"event": "stopped", **plane.report()}), flush=True)
    return 0
