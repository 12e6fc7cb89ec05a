"""What an operator does to a running balancer, and what it shows: health, drain, reload,
conntrack's counts, status. The first worker applies each change to the kernel and passes it on
to the others (`kernel=False` there)."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..core.backend_view import shared_view
from ..core.balancer import Backend, Balancer
from ..core.news import fingerprint
from ..core.schedulers import Index
from ..kernel.conntrack import Counts
from ..kernel.queue import queue_drops
from ..core.settings import BackendConfig, Config, ConfigError
from .config import load
from .counters import Report
from .fleet import Drained, Fleet, HealthChanged, Message, Reloaded, Stop

log = logging.getLogger("mplb_nfq.worker")
RESTART_ONLY = ("queue", "queue_mode", "handshakes", "workers", "table_name", "mark_base", "table_base", "max_backends",
                "rule_priority", "metrics_address", "control_socket", "conntrack_interval", "hold_ms", "hold_max",
                "flow_capacity", "flow_timeout", "token_capacity", "token_timeout", "cluster")


@dataclass
class RetiredBackend:
    """A backend gone from the config, kept (drained) until conntrack counts none of its connections."""
    backend: Backend
    config: BackendConfig
    vips: list[str]


class ControlPlane:
    def __init__(self, cfg: Config, balancer: Balancer, dataplane, fleet: Fleet, counters: Report):
        self.cfg, self.balancer, self.dataplane, self.fleet, self.counters = cfg, balancer, dataplane, fleet, counters
        self.retired: dict[str, RetiredBackend] = {}
        self.unavailable_in_kernel: set[int] | None = None  # the kernel's set, as last written
        self.synced: int | None = None  # Backend.changes when sync_unavailable last wrote the tables
        self.health = None
        self.stopping = False
        self.started = time.time()
        self.follower: dict = {}  # what the conntrack follower says of itself (Counts)
        self.peers = None  # in a cluster: ops.peers.Peers
        self.checked: dict[str, bool] = {}  # this balancer's own health checks: backend -> up
        # in a cluster, while Redis is reachable: the backends each voting peer sees down
        # (core.backend_view); None: this balancer goes by its own checks
        self.peer_votes: list[frozenset[str]] | None = None
        self.view_lock = threading.RLock()  # the health thread and the loop both refresh the view

    def fingerprint(self) -> str:
        """What must be the same on every balancer of a cluster for them to decide alike."""
        return fingerprint([[s.name, s.vips, s.ports, s.scheduler, s.maglev_size, s.unknown_join,
                             [(b.name, b.weight) for b in self.cfg.backends if b.name in s.backends]]
                            for s in self.cfg.services])

    def any_available(self) -> bool:
        """Some backend takes new connections: the balancer's route stays announced."""
        return any(b.available for s in self.balancer.services for b in s.backends)

    def adopt_retired(self, installed: dict[int, tuple[int, set[str], set[str]]]) -> list[str]:
        """Backends a process before this one installed that this config no longer has: retired,
        as if a reload had removed them, until conntrack counts none of their connections."""
        known = {b.mark for b in self.cfg.backends}
        adopted = []
        for mark, (table, hops, vips) in sorted(installed.items()):
            if mark in known or not hops:
                continue
            name = f"retired-0x{mark:x}"
            config = BackendConfig(name, tuple(sorted(hops)), 0, mark, table)
            backend = Backend(name, config.addresses, mark, table, weight=0, retired=True)
            self.retired[name] = RetiredBackend(backend, config, sorted(vips))
            adopted.append(name)
        if adopted:
            self.balancer.update(self.balancer.services, [r.backend for r in self.retired.values()])
            self.dataplane.retired = self.retired_routes()
        return adopted

    def backends(self) -> dict[str, Backend]:
        return {b.name: b for s in self.balancer.services for b in s.backends}

    def retired_routes(self) -> list[tuple[BackendConfig, list[str]]]:
        return [(r.config, r.vips) for r in self.retired.values()]

    def sync_unavailable(self) -> None:
        """Backends that take no new connections: the services' tables leave them out, and the
        ruleset sends their joins to the worker, which reads them as Linux will before they reach
        such a backend. Called from the loop on every turn (the health thread only changes the
        backends' state); it writes only after a change of the backends or the services."""
        changes = Backend.changes  # read before the states: a change after this is written next turn
        if changes == self.synced:
            return
        try:
            self.dataplane.sync_tables(self.balancer.lookup_tables())
            self.synced = changes
        except Exception as e:  # the tables in the kernel stay as they were; tried again next turn
            log.error("updating the scheduler tables failed: %s", e)
        unavailable = [b for b in self.balancer.backends if not b.available]
        marks = {b.mark for b in unavailable}
        if marks == self.unavailable_in_kernel:
            return
        try:
            self.dataplane.sync_unavailable(marks, {b.name for b in unavailable})
            self.unavailable_in_kernel = marks
        except Exception as e:  # the table may be an operator's of an older version
            log.error("updating the set of unavailable backends failed: %s", e)
            self.unavailable_in_kernel = marks

    def set_health(self, name: str, up: bool, error: str | None) -> None:
        """This balancer's own check of a backend changed (in a worker beyond the first: the
        backend's health as the first worker uses it)."""
        with self.view_lock:
            self.checked[name] = up
            self.refresh_view(error)

    def set_peer_votes(self, votes: list[frozenset[str]] | None) -> None:
        """The cluster's votes as the link last heard them; None: cut off, own checks only."""
        if votes != self.peer_votes:
            if (votes is None) != (self.peer_votes is None):
                log.warning("backends' health: %s", "the cluster's view" if votes is not None else
                            "this balancer's own checks (cut off from the cluster)")
            self.peer_votes = votes
            self.refresh_view()

    def refresh_view(self, error: str | None = None) -> None:
        """Each backend's health as the balancer uses it: its own checks, or in a cluster the
        shared view of them (core.backend_view); passed on to the other workers."""
        with self.view_lock:
            running, votes = self.backends(), self.votes()
            view = {name: self.checked.get(name, True) for name in running} if votes is None else \
                shared_view(running, votes)
            for name, up in view.items():
                if running[name].healthy != up:
                    running[name].healthy = up
                    self.fleet.broadcast(HealthChanged(name, up, error if not up else None))
                    if votes is not None:
                        log.warning("backend %s is now %s in the cluster's view (%d of %d balancers see it down)",
                                    name, "up" if up else "down", sum(name in down for down in votes), len(votes))

    def votes(self) -> list[frozenset[str]] | None:
        """The votes of the cluster's view: this balancer's (unless it abstains) and its peers';
        None while cut off from the cluster or while no balancer votes: its own checks then."""
        if self.peer_votes is None:
            return None
        own = self.own_vote()
        votes = self.peer_votes + ([own] if own is not None else [])
        return votes or None

    def own_vote(self) -> frozenset[str] | None:
        """The backends this balancer's own checks see down; None (it abstains) while they have
        not run `fall` rounds, or do not run."""
        if self.health is None or not self.health.settled:
            return None
        with self.view_lock:  # the health thread writes `checked`
            running = self.backends()
            return frozenset(name for name, up in self.checked.items() if not up and name in running)

    def backend_view(self) -> dict:
        if self.peers is None:
            return {"source": "own checks"}
        if self.peer_votes is None:
            return {"source": "own checks", "why": "cut off from the cluster's Redis"}
        votes = self.votes()
        if votes is None:
            return {"source": "own checks", "why": "no balancer's checks have settled yet"}
        return {"source": "cluster", "voters": len(votes), "votes_here": self.own_vote() is not None}

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
        self.fleet.broadcast(Drained(name, drained))
        log.info("backend %s %s", name, "drained" if drained else "undrained")
        return {"ok": True, "backend": name, "state": backend.state}

    def reload(self, path: str | None = None, kernel: bool = True) -> dict:
        """Re-read the config. kernel=False: the first worker has already changed the kernel. The
        kernel is changed first; should that fail, it is put back and nothing else changes."""
        path = path or self.cfg.path
        try:
            new = load(path)
            changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
            if changed:
                raise ConfigError(path, ", ".join(changed), "cannot change on reload (restart the worker)")
            running = self.backends()
            known = {**running, **{n: r.backend for n, r in self.retired.items()}}
            new = new.with_stable_marks({n: b.mark for n, b in known.items()})
        except ConfigError as e:
            log.error("reload refused, the running config stays: %s", e)
            return {"ok": False, "error": str(e)}
        kept = {b.name for b in new.backends}
        gone = {name: RetiredBackend(backend, next(b for b in self.cfg.backends if b.name == name),
                                     [vip for s in self.cfg.services if name in s.backends for vip in s.vips])
                for name, backend in running.items() if name not in kept}
        retired = {**{n: r for n, r in self.retired.items() if n not in kept}, **gone}
        if kernel:
            try:
                self.dataplane.apply(new, [(r.config, r.vips) for r in retired.values()])
            except Exception as e:
                log.error("reload failed in the kernel, putting back the running config: %s", e)
                try:
                    self.dataplane.apply(self.cfg, self.retired_routes())
                except Exception as again:
                    log.error("putting back the running config in the kernel failed too: %s", again)
                return {"ok": False, "error": f"{path}: the kernel refused it ({e}); the running config stays"}
        services = new.build_services(known)
        for name, r in gone.items():
            r.backend.retired = True
            log.info("backend %s retired: no new connections, kept until its connections end", name)
        self.retired = retired
        self.balancer.update(services, [r.backend for r in self.retired.values()])
        health_changed = new.health != self.cfg.health
        self.cfg = new
        self.refresh_view()
        if health_changed and kernel:  # the first worker runs the checks
            self.start_health()
        if kernel:
            self.fleet.broadcast(Reloaded(path))
        log.info("reloaded %s: %d services, %d backends, %d retired", path, len(new.services), len(new.backends),
                 len(self.retired))
        return {"ok": True, "services": len(new.services), "backends": len(new.backends),
                "retired": sorted(self.retired)}

    def start_health(self) -> None:
        """Health checks as the config says (again, after a reload that changed them)."""
        from .health import HealthChecker

        if self.health is not None:
            self.health.stop()
            self.health = None
            self.checked.clear()  # the new checks start from up, and tell only of changes
        h = self.cfg.health
        if h.enabled:
            self.health = HealthChecker(h.interval, h.timeout, h.rise, h.fall, h.mptcp, self.health_targets,
                                        self.set_health)
            self.health.start()
        self.refresh_view()

    def apply_conntrack_counts(self, counted: Counts, kernel: bool = True) -> None:
        if kernel:
            self.fleet.broadcast(counted)
        for mark, backend in self.balancer.by_mark.items():
            backend.active, backend.subflows = counted.connections.get(mark, 0), counted.subflows.get(mark, 0)
        self.follower = {"watched": counted.watched, "full_readings": counted.readings,
                         "last_reading_s": counted.reading_s}
        done = [n for n, r in self.retired.items() if r.backend.idle]
        if done:
            for name in done:
                log.info("backend %s: no connections left, its routes are removed", name)
                del self.retired[name]
            self.balancer.update(self.balancer.services, [r.backend for r in self.retired.values()])
            if kernel:
                self.dataplane.retire(self.retired_routes())

    def apply(self, message: Message) -> None:
        """A change the first worker made, in another worker."""
        match message:
            case HealthChanged(backend, up, error):
                self.set_health(backend, up, error)
            case Drained(backend, drained):
                self.drain(backend, drained)
            case Reloaded(path):
                self.reload(path, kernel=False)
            case Counts():
                self.apply_conntrack_counts(message, kernel=False)
            case Stop():
                self.stopping = True

    def own_report(self) -> Report:
        c = self.counters
        return Report(c.stats, self.balancer.counts, len(self.balancer.tokens) + len(self.balancer.provisional),
                      len(self.balancer.flows), c.latency)

    def total(self) -> Report:
        return self.fleet.total(self.own_report())

    def report(self) -> dict:
        total = self.total()
        handled = total.handled
        return {"packets": handled, **total.stats, "kinds": dict(total.kinds), "tokens_tracked": total.tokens,
                "flows_tracked": total.flows, "workers": self.cfg.workers,
                "decide_us_per_packet": round(total.latency.sum * 1e6 / handled, 2) if handled else None,
                "queue_mode": self.dataplane.queue_mode, **({"cluster": self.peers.report()} if self.peers else {})}

    def status(self) -> dict:
        services, running, tables = [], self.backends(), self.balancer.lookup_tables()
        for s in self.cfg.services:
            table = tables[s.name]
            decided_by = "worker" if self.cfg.handshakes == "queue" or table.index is Index.WORKER else \
                f"kernel {table.index}/{len(table.slots)}"
            services.append({
                "name": s.name, "vips": list(s.vips), "ports": list(s.ports), "scheduler": s.scheduler,
                "persistence": s.persistence, "unknown_join": s.unknown_join, "mptcp_aware": s.mptcp_aware,
                "syns_decided_by": decided_by, "joins": s.joins, "join_ports": self.cfg.join_ports(s),
                "backends": [backend_status(running[n], self.checked.get(n, True)) for n in s.backends]})
        report = self.report()
        return {"ok": True, "services": services,
                "retired": [backend_status(r.backend, self.checked.get(n, True)) for n, r in self.retired.items()],
                "tokens_tracked": report["tokens_tracked"], "flows_tracked": report["flows_tracked"],
                "queue": self.cfg.queue, "queue_mode": self.dataplane.queue_mode, "handshakes": self.cfg.handshakes,
                "queue_drops": queue_drops(self.cfg.queue, self.cfg.workers), "table_owner": self.dataplane.table_owner,
                "uptime_s": round(time.time() - self.started, 1), "conntrack": self.follower,
                "backend_view": self.backend_view(),
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


def backend_status(b: Backend, checked: bool) -> dict:
    """healthy: as the balancer uses it (in a cluster, the shared view); checked: its own check."""
    return {"name": b.name, "addresses": list(b.addresses), "state": b.state, "healthy": b.healthy, "checked": checked,
            "weight": b.weight, "drained": b.drained, "mark": f"0x{b.mark:x}", "table": b.table,
            "connections": b.active, "subflows": b.subflows}
