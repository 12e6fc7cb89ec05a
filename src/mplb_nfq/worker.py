"""The worker: NFQUEUE packets -> core decision -> verdict; then, off the hot path, tokens to the
kernel map, health checks, conntrack counts, the control socket, reloads and metrics."""
from __future__ import annotations

import bisect
import errno
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from .balancer import BACKEND_MASK, JOIN, REJECT, Backend, Verdict
from .config import BackendConfig, Config, ConfigError, load
from .kernel import Dataplane
from .packet import parse_ip

log = logging.getLogger("mplb_nfq.worker")
LATENCY_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)
RESTART_ONLY = ("queue", "queue_mode", "workers", "table_name", "mark_base", "table_base", "max_backends",
                "rule_priority", "metrics_address", "control_socket")
LIVE_TCP_STATES = range(1, 7)  # SYN_SENT .. LAST_ACK: not TIME_WAIT, not CLOSE
BATCH = 256  # packets handled between two turns of the housekeeping (held joins, control, counts)
VERDICT_BATCH = 32  # packets decided in a row before their verdicts go out (the queue empty: at once)
WORKER_START_SECONDS = 30.0  # for a worker beyond the first to bind its queue, before the first says "ready"
ERROR_LOG_SECONDS = 10.0  # a fault that repeats per packet or per batch is logged once per interval, with a count


class Worker:
    def __init__(self, cfg: Config, dataplane: Dataplane):
        self.cfg, self.dataplane = cfg, dataplane
        self.balancer = cfg.balancer()
        self.retired: dict[str, tuple[Backend, BackendConfig, list[str]]] = {}  # gone from the config
        # every key there from the start: the metrics thread reads them while this one counts
        self.stats: Counter[str] = Counter(tokens_installed=0, tokens_rejected=0, token_install_errors=0)
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.stopping = False
        self.reload_requested = False
        self.health = None
        self.started = time.time()
        self.held: list[tuple[object, object, float]] = []  # (packet, segment, deadline)
        self.decided: list[tuple[object, Verdict]] = []  # their verdicts go out together
        self.peers: list = []  # the first worker's pipes to the others
        self.broadcast_lock = threading.Lock()
        self.peer_reports: dict[int, dict] = {}
        self.logged: dict[str, tuple[float, int]] = {}  # per fault: when last logged, how many since

    # -- the hot path ------------------------------------------------------------------------
    def handle(self, packet) -> None:
        """NetfilterQueue callback: decide, and keep the packet for give_decided(). Each verdict
        carries the kernel's forwarding of its packet, which cools the caches: decisions made in
        a row, then verdicts given in a row, handle a fifth more packets per CPU-second under load."""
        started = time.perf_counter()
        try:
            segment = parse_ip(packet.get_payload())
            hold = self.cfg.workers > 1 and len(self.held) < self.cfg.hold_max
            verdict = self.balancer.decide(segment, packet.get_mark(), started, hold)
            if verdict.kind == "join_held":  # another worker may know its token (if its install to the map failed)
                packet.retain()
                self.held.append((packet, segment, started + self.cfg.hold_ms / 1000))
                return
        except Exception:  # a bug must not stall the queue: accept unchanged and count it
            self.log_error("decision", "decision failed; packet accepted unchanged", exc_info=True)
            self.stats["errors"] += 1
            packet.accept()
            return
        self.decided.append((packet, verdict))  # a later verdict needs no retain(): only the payload is reused
        seconds = time.perf_counter() - started
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def give_decided(self) -> None:
        """The tokens learned go to the kernel map before any verdict: a SYN-ACK's verdict lets the
        handshake finish, and the client's first join follows within a round trip; it must find
        its token there, or be queued."""
        learned = [verdict for _, verdict in self.decided if verdict.token is not None]
        if learned:
            self.write_tokens(learned)
        for packet, verdict in self.decided:
            self.give(packet, verdict)
        self.decided.clear()

    def give(self, packet, verdict) -> None:
        if verdict.accept:
            packet.set_mark(verdict.mark)
            packet.accept()
            self.stats["reject" if verdict.mark & REJECT else "accept"] += 1
        else:
            packet.drop()
            self.stats["drop"] += 1

    def write_tokens(self, learned: list[Verdict]) -> None:
        """Install the tokens learned, in one transaction. A collision (two live connections on
        different backends with one token) makes the kernel map reset the token's joins, for every
        worker: one this worker found, and one the map refused because another worker's
        connection holds the token already."""
        final = {v.token: None if v.kind == "token_collision" else (v.mark & BACKEND_MASK) | JOIN for v in learned}
        colliding = [token for token, mark in final.items() if mark is None]
        install = [(token, mark) for token, mark in final.items() if mark is not None]
        if install:
            try:
                refused = self.dataplane.add_tokens(install)
            except Exception as e:  # the core still knows them: their joins get queued, and reach their backend
                self.log_error("install", f"token install failed ({len(install)} tokens): {e}")
                self.stats["token_install_errors"] += len(install)
            else:
                self.stats["tokens_installed"] += len(install) - len(refused)
                now = time.perf_counter()
                for token in refused:
                    self.balancer.collide(token, now)
                colliding += refused
        if colliding:
            try:
                self.dataplane.reject_tokens(colliding)
                self.stats["tokens_rejected"] += len(colliding)
            except Exception as e:  # the joins that reach this worker are still reset
                self.log_error("reject", f"marking colliding tokens in the kernel map failed: {e}")
                self.stats["token_install_errors"] += len(colliding)

    def log_error(self, kind: str, message: str, exc_info: bool = False) -> None:
        """Log a fault at most once per ERROR_LOG_SECONDS for each kind, saying how many were left
        out; the counters count them all."""
        now = time.monotonic()
        last, left_out = self.logged.get(kind, (-ERROR_LOG_SECONDS, 0))
        if now - last < ERROR_LOG_SECONDS:
            self.logged[kind] = (last, left_out + 1)
            return
        self.logged[kind] = (now, 0)
        log.error("%s%s", message, f" ({left_out} more like it in the last {now - last:.0f} s)" if left_out else "",
                  exc_info=exc_info)

    def release_held(self) -> None:
        """Held joins: those whose token reached the kernel map go to its backend; those held
        too long get the unknown-join policy."""
        now = time.perf_counter()
        still = []
        for packet, segment, deadline in self.held:
            token = segment.join.token
            mark = self.dataplane.lookup_token(token)
            if mark is not None:
                self.balancer.learn_token(token, mark, now)
            if mark is not None or now >= deadline:
                self.stats["held_found" if mark is not None else "held_expired"] += 1
                self.give(packet, self.balancer.decide(segment, 0, now))
            else:
                still.append((packet, segment, deadline))
        self.held = still

    def adopt_tokens(self) -> int:
        """A restarted worker rebuilds its token table from the kernel map it finds."""
        now, ttl = time.perf_counter(), self.balancer.tokens.ttl
        adopted = 0
        for token, mark, left in sorted(self.dataplane.read_tokens(), key=lambda t: t[2]):
            if mark & REJECT or self.balancer.backend_of(mark) is not None:
                self.balancer.learn_token(token, mark, now - max(0.0, ttl - left))
                adopted += 1
        return adopted

    # -- operations --------------------------------------------------------------------------
    def backends(self) -> dict[str, Backend]:
        return {b.name: b for s in self.balancer.services for b in s.backends}

    def set_health(self, name: str, up: bool, error: str | None) -> None:
        backend = self.backends().get(name)
        if backend is not None:
            backend.healthy = up
        self.broadcast(("health", name, up, error))

    def health_targets(self) -> list[tuple[str, str, int]]:
        port = self.cfg.health.port
        targets = []
        for b in self.cfg.backends:
            first = next(s for s in self.cfg.services if b.name in s.backends)
            targets.append((b.name, b.addresses[0], port or first.ports[0]))
        return targets

    def drain(self, name: str, drained: bool) -> dict:
        backend = self.backends().get(name)
        if backend is None:
            return {"ok": False, "error": f"no backend {name!r} (known: {', '.join(self.backends())})"}
        backend.drained = drained
        self.broadcast(("drain", name, drained))
        log.info("backend %s %s", name, "drained" if drained else "undrained")
        return {"ok": True, "backend": name, "state": backend.state}

    def reload(self, path: str | None = None, kernel: bool = True) -> dict:
        """Re-read the config. kernel=False: the first worker has already changed the kernel."""
        path = path or self.cfg.path
        try:
            new = load(path)
        except ConfigError as e:
            log.error("reload refused, the running config stays: %s", e)
            return {"ok": False, "error": str(e)}
        changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
        if changed:
            error = f"{path}: {', '.join(changed)}: cannot change on reload (restart the worker)"
            log.error("reload refused, the running config stays: %s", error)
            return {"ok": False, "error": error}
        running = self.backends()
        running_marks = {n: b.mark for n, b in running.items()}
        running_marks.update({n: b.mark for n, (b, _, _) in self.retired.items()})
        new = new.with_stable_marks(running_marks)
        old = {b.name: (b, [vip for s in self.cfg.services if b.name in s.backends for vip in s.vips])
               for b in self.cfg.backends}
        services = new.build_services({**running, **{n: b for n, (b, _, _) in self.retired.items()}})
        kept = {b.name for b in new.backends}
        for name, backend in running.items():
            if name not in kept:
                backend.retired = True
                self.retired[name] = (backend, *old[name])
                log.info("backend %s retired: no new connections, kept until its connections end", name)
        for name in kept:
            self.retired.pop(name, None)
        self.balancer.update(services, [b for b, _, _ in self.retired.values()])
        if kernel:
            self.dataplane.sync_vips(new)
            self.dataplane.sync_tunnels(new, self.retired_routes())
            self.dataplane.sync_routing(new, self.retired_routes())
            self.broadcast(("reload", path))
        self.cfg = new
        log.info("reloaded %s: %d services, %d backends, %d retired", path, len(new.services), len(new.backends),
                 len(self.retired))
        return {"ok": True, "services": len(new.services), "backends": len(new.backends),
                "retired": sorted(self.retired)}

    def apply_conntrack_counts(self, connections: dict[int, int], subflows: dict[int, int],
                               kernel: bool = True) -> None:
        """Active connections and subflows per backend mark, as conntrack counted them."""
        if kernel:
            self.broadcast(("counts", connections, subflows))
        for mark, backend in self.balancer.by_mark.items():
            backend.active, backend.subflows = connections.get(mark, 0), subflows.get(mark, 0)
        done = [n for n, (b, _, _) in self.retired.items() if b.active == 0 and b.subflows == 0]
        if done:
            for name in done:
                log.info("backend %s: no connections left, its routes are removed", name)
                del self.retired[name]
            self.balancer.update(self.balancer.services, [b for b, _, _ in self.retired.values()])
            if kernel:
                self.dataplane.sync_routing(self.cfg, self.retired_routes())
                self.dataplane.sync_tunnels(self.cfg, self.retired_routes())

    # -- several workers: the first one runs the kernel, the health checks and the control socket;
    # -- it passes state changes on to the others, which report their counters back
    def broadcast(self, message: tuple) -> None:
        with self.broadcast_lock:  # the health thread sends too
            for peer in self.peers:
                try:
                    peer.send(message)
                except OSError:
                    pass

    def apply_message(self, message: tuple) -> None:
        kind, *args = message
        if kind == "health":
            self.set_health(*args)
        elif kind == "drain":
            self.drain(*args)
        elif kind == "reload":
            self.reload(args[0], kernel=False)
        elif kind == "counts":
            self.apply_conntrack_counts(*args, kernel=False)
        elif kind == "stop":
            self.stopping = True

    def own_counters(self) -> dict:
        return {"stats": dict(self.stats), "kinds": dict(self.balancer.counts),
                "tokens": len(self.balancer.tokens), "flows": len(self.balancer.flows),
                "latency_counts": list(self.latency_counts), "latency_sum": self.latency_sum}

    def totals(self) -> dict:
        """The counters of all workers (the first one's and the others' last reports)."""
        total = {"stats": Counter(self.stats), "kinds": Counter(self.balancer.counts),
                 "tokens": len(self.balancer.tokens), "flows": len(self.balancer.flows),
                 "latency_counts": list(self.latency_counts), "latency_sum": self.latency_sum}
        for report in self.peer_reports.values():
            total["stats"].update(report["stats"])
            total["kinds"].update(report["kinds"])
            total["tokens"] = max(total["tokens"], report["tokens"])  # each worker holds what it saw
            total["flows"] += report["flows"]
            total["latency_counts"] = [a + b for a, b in zip(total["latency_counts"], report["latency_counts"])]
            total["latency_sum"] += report["latency_sum"]
        return total

    def retired_routes(self) -> list[tuple[BackendConfig, list[str]]]:
        return [(config, vips) for _, config, vips in self.retired.values()]

    def status(self) -> dict:
        drops = queue_drops(self.cfg.queue)
        services, running = [], self.backends()
        for s in self.cfg.services:
            services.append({
                "name": s.name, "vips": list(s.vips), "ports": list(s.ports), "scheduler": s.scheduler,
                "persistence": s.persistence, "unknown_join": s.unknown_join, "mptcp_aware": s.mptcp_aware,
                "backends": [backend_status(running[n]) for n in s.backends]})
        report = self.report()
        return {"ok": True, "services": services,
                "retired": [backend_status(b) for b, _, _ in self.retired.values()],
                "tokens_tracked": report["tokens_tracked"], "flows_tracked": report["flows_tracked"],
                "queue": self.cfg.queue, "queue_mode": self.dataplane.queue_mode, "queue_drops": drops,
                "table_owner": self.dataplane.table_owner, "uptime_s": round(time.time() - self.started, 1),
                "health_errors": {n: e for n, e in (self.health.last_error if self.health else {}).items() if e},
                "packets": report}

    def control(self, request: dict) -> dict:
        command = request["command"]
        if command == "status":
            return self.status()
        if command in ("drain", "undrain"):
            return self.drain(str(request.get("backend")), command == "drain")
        if command == "reload":
            return self.reload(request.get("path"))
        return {"ok": False, "error": f"unknown command {command!r} (status, drain, undrain, reload)"}

    def report(self) -> dict:
        total = self.totals()
        stats = total["stats"]
        handled = sum(stats[k] for k in ("accept", "reject", "drop", "errors"))
        return {"packets": handled, **stats, "kinds": dict(total["kinds"]), "tokens_tracked": total["tokens"],
                "flows_tracked": total["flows"], "workers": self.cfg.workers,
                "decide_us_per_packet": round(total["latency_sum"] * 1e6 / handled, 2) if handled else None,
                "queue_mode": self.dataplane.queue_mode}

    # -- the loop ----------------------------------------------------------------------------
    def serve(self, ready=lambda: None, parent=None, index: int = 0) -> None:
        """The loop of worker `index` (queue cfg.queue + index). The first one (no parent) also
        serves the control socket and counts conntrack; the others hear from it through parent."""
        from netfilterqueue import NetfilterQueue

        from .control import ControlServer

        first = parent is None
        handlers = {}
        if first:
            # The counter starts first: a child must not inherit the queue's socket, or a killed
            # worker would leave the queue bound to nobody reading, and no bypass.
            counts, counter_end = multiprocessing.Pipe(duplex=False)
            counter = multiprocessing.Process(target=count_conntrack, args=(counter_end, self.cfg.conntrack_interval),
                                              name="mplb-nfq conntrack counter", daemon=True)
            counter.start()
            handlers[counts.fileno()] = lambda: self.apply_conntrack_counts(*counts.recv())
            for peer_index, peer in enumerate(self.peers, 1):
                handlers[peer.fileno()] = lambda peer=peer, i=peer_index: self.peer_reports.__setitem__(i, peer.recv())
        else:
            handlers[parent.fileno()] = lambda: self.apply_message(parent.recv())
        nfq = NetfilterQueue()
        nfq.bind(self.cfg.queue + index, self.handle, max_len=4096)
        batch = QueueReader(nfq.get_fd(), BATCH, self)

        def read_queue():
            batch.left = BATCH
            try:
                nfq.run_socket(batch)
            finally:
                self.give_decided()

        handlers[nfq.get_fd()] = read_queue
        control = ControlServer(self.cfg.control_socket, self.control) if first else None
        if control:
            handlers[control.fileno()] = control.serve_ready
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        log.info("worker %d listening on queue %d", index, self.cfg.queue + index)
        ready()
        next_report = 0.0
        try:
            while not self.stopping:
                for fd, _ in poller.poll(2 if self.held else 200):
                    try:
                        handlers[fd]()
                    except (EOFError, OSError) as e:  # a worker or the counter went away
                        if fd == nfq.get_fd():
                            raise
                        log.warning("lost a peer: %s", e)
                        poller.unregister(fd)
                if self.held:
                    self.release_held()
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload()
                if not first and time.monotonic() >= next_report:
                    parent.send(self.own_counters())
                    next_report = time.monotonic() + 0.5
        finally:
            for packet, segment, _ in self.held:  # never leave a packet without a verdict
                self.give(packet, self.balancer.decide(segment, 0, time.perf_counter()))
            nfq.unbind()
            if control:
                control.close()
                counter.kill()


def serve_other_worker(worker: Worker, index: int, parent) -> None:
    """A worker process beyond the first: its own queue, its own libnftables context."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop with the first worker

    def stop(signum, frame):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first worker decides, and tells us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    worker.dataplane.reopen()
    worker.peers, worker.peer_reports = [], {}
    worker.serve(ready=lambda: parent.send(worker.own_counters()), parent=parent, index=index)


class QueueReader:
    """The queue's socket as NetfilterQueue.run_socket reads it, but ending a read loop after
    `left` packets (under a flood, held joins, reloads and the control socket still get their turn).
    Before each read it gives the worker's decided packets their verdicts: the first packet read
    after the queue was found empty at once, so that a lone packet waits for nothing; in a burst,
    VERDICT_BATCH at a time, or what is left when the queue is empty again."""

    def __init__(self, fd: int, left: int, worker: Worker):
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.left, self.worker = left, worker
        self.in_a_row = 0  # packets read since the queue was last found empty

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        decided = self.worker.decided
        if decided and (self.in_a_row < 2 or len(decided) >= VERDICT_BATCH):
            self.worker.give_decided()
        self.left -= 1
        try:
            packet = self.sock.recv(size)
        except BlockingIOError:
            self.in_a_row = 0
            self.worker.give_decided()
            raise
        self.in_a_row += 1
        return packet


def count_conntrack(out, interval: float) -> None:
    """In a process of its own, so that a large conntrack table never stalls the queue: count the
    live entries per backend mark, connections and added subflows apart, every interval."""
    import ctypes

    from pyroute2 import NFCTSocket

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    while True:
        started = time.monotonic()
        connections: Counter[int] = Counter()
        subflows: Counter[int] = Counter()
        try:
            with NFCTSocket() as ct:
                for entry in ct.dump():
                    mark = entry.get_attr("CTA_MARK") or 0
                    if not mark & BACKEND_MASK:
                        continue
                    state = entry.get_nested("CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE")
                    if state in LIVE_TCP_STATES:
                        (subflows if mark & JOIN else connections)[mark & BACKEND_MASK] += 1
            out.send((dict(connections), dict(subflows)))
        except (BrokenPipeError, EOFError):
            return
        except Exception as e:
            log.warning("conntrack count failed: %s", e)
        # A large table takes long to read: wait at least 4 times as long as the reading took,
        # so that counting never takes more than a fifth of a core.
        time.sleep(max(interval, 4 * (time.monotonic() - started)))


def backend_status(b: Backend) -> dict:
    return {"name": b.name, "addresses": list(b.addresses), "state": b.state, "healthy": b.healthy,
            "weight": b.weight, "drained": b.drained, "mark": f"0x{b.mark:x}", "table": b.table,
            "connections": b.active, "subflows": b.subflows}


def queue_drops(queue: int) -> dict:
    """From /proc/net/netfilter/nfnetlink_queue: packets dropped because the queue was full, or
    because the worker's socket buffer was."""
    try:
        for line in Path("/proc/net/netfilter/nfnetlink_queue").read_text().splitlines():
            fields = line.split()
            if int(fields[0]) == queue:
                return {"queue_full": int(fields[5]), "socket_full": int(fields[6]), "waiting": int(fields[2])}
    except (OSError, ValueError, IndexError):
        pass
    return {"queue_full": 0, "socket_full": 0, "waiting": 0}


def run(cfg: Config) -> int:
    from .health import HealthChecker

    dataplane = Dataplane(cfg)
    worker = Worker(cfg, dataplane)

    def stop(signum, frame):
        worker.stopping = True

    def reload(signum, frame):
        worker.reload_requested = True

    def dump(signum, frame):
        print(json.dumps({"event": "stats", **worker.report()}), flush=True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGUSR1, dump)
    others = []
    try:
        dataplane.install()
        adopted = worker.adopt_tokens()
        if adopted:
            log.info("adopted %d tokens from the kernel map", adopted)
        for index in range(1, cfg.workers):  # forked before any thread or socket of the first worker
            mine, theirs = multiprocessing.Pipe()
            process = multiprocessing.Process(target=serve_other_worker, args=(worker, index, theirs),
                                              name=f"mplb-nfq worker {index}", daemon=True)
            process.start()
            theirs.close()  # the child's end: closed here, a child that dies gives EOF at once
            worker.peers.append(mine)
            others.append(process)
        for index, peer in enumerate(worker.peers, 1):  # "ready" means every queue has its reader
            if not peer.poll(WORKER_START_SECONDS):
                raise RuntimeError(f"worker {index} did not bind queue {cfg.queue + index} "
                                   f"within {WORKER_START_SECONDS:.0f} s")
            try:
                worker.peer_reports[index] = peer.recv()
            except EOFError:
                raise RuntimeError(f"worker {index} exited while starting (see its error above)") from None
        if cfg.metrics_address:
            from .metrics import serve_metrics

            serve_metrics(worker, cfg.metrics_address)
        if cfg.health.enabled:
            h = cfg.health
            worker.health = HealthChecker(h.interval, h.timeout, h.rise, h.fall, h.mptcp, worker.health_targets,
                                          worker.set_health)
            worker.health.start()
        worker.serve(ready=lambda: print(json.dumps({
            "event": "ready", "queue": cfg.queue, "queue_mode": dataplane.queue_mode, "adopted": adopted,
            "control_socket": cfg.control_socket, "metrics": cfg.metrics_address}), flush=True))
    finally:
        if worker.health:
            worker.health.stop()
        worker.broadcast(("stop",))
        for process in others:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        dataplane.remove()
    print(json.dumps({"event": "stopped", **worker.report()}), flush=True)
    return 0
