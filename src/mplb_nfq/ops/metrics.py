"""Prometheus metrics, read from the worker's state at scrape time (nothing is added to the hot path
but a histogram bucket). Names `mplb_*`, base units, `_total` counters; labels are bounded
(kinds, backends, services), never client addresses or tokens."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from ..core.held import Held

from ..kernel.queue import queue_drops

log = logging.getLogger("mplb_nfq.metrics")
JOIN_RESULTS = {"join_hit": "hit", "join_miss": "miss", "join_collision": "collision"}
REJECTED = ("malformed", "unknown_backend", "unknown_service")  # core.news's reasons


class WorkerCollector:
    """Reads the control plane's state: its counters summed over all workers, and the backends."""

    def __init__(self, plane, ruleset_counters: Callable[[], dict[str, int]] | None = None):
        self.plane = plane
        self._counters = None
        self._counters_lock = threading.Lock()
        self.ruleset_counters = ruleset_counters or self._nft_counters

    def _nft_counters(self) -> dict[str, int]:
        from ..kernel.tokenmap import Counters

        with self._counters_lock:  # the HTTP server answers scrapes in threads; one socket is not shared
            if self._counters is None:
                self._counters = Counters(self.plane.cfg.table_name)  # its own: the worker's is its thread's
            return self._counters.read()

    def collect(self):
        w = self.plane
        total = w.total()
        kinds, stats = dict(total.kinds), total.stats

        queued = CounterMetricFamily("mplb_queued_packets", "Packets the worker took from the queue, by kind",
                                     labels=["kind"])
        for kind, n in sorted(kinds.items()):
            queued.add_metric([kind], n)
        yield queued

        verdicts = CounterMetricFamily("mplb_verdicts", "Verdicts given, by verdict", labels=["verdict"])
        for verdict in ("accept", "reject", "drop"):
            verdicts.add_metric([verdict], stats[verdict])
        yield verdicts

        errors = CounterMetricFamily("mplb_worker_errors", "Packets accepted unchanged after a decision failed")
        errors.add_metric([], stats["errors"])
        yield errors

        try:
            nft = self.ruleset_counters()
        except Exception as e:  # a scrape still answers with what the worker knows
            log.warning("reading the ruleset's counters failed: %s", e)
            nft = {}
        lookups = CounterMetricFamily("mplb_join_lookups", "MP_JOIN token lookups, by result and where",
                                      labels=["result", "path"])
        for kind, result in JOIN_RESULTS.items():
            lookups.add_metric([result, "worker"], kinds.get(kind, 0))
        lookups.add_metric(["hit", "kernel"], nft.get("join_kernel_hit", 0))
        lookups.add_metric(["announced_port", "kernel"], nft.get("join_port", 0))
        yield lookups
        first_acks = CounterMetricFamily("mplb_nft_join_first_acks", "First ACKs of joins the token map steered "
                                         "under direct server return, sent to their backend in the kernel")
        first_acks.add_metric([], nft.get("join_first_ack", 0))
        yield first_acks
        limited = CounterMetricFamily("mplb_nft_joins_rate_limited", "MP_JOIN SYNs dropped in the kernel: their "
                                      "token (a live one) came in more than 16 joins a second (a replay)")
        limited.add_metric([], nft.get("join_rate_limited", 0))
        yield limited

        diverted = CounterMetricFamily("mplb_nft_queued_packets", "Packets the nft ruleset sent to the queue",
                                       labels=["rule"])
        for name in ("queued_syn", "queued_join", "queued_synack", "queued_capable", "queued_first",
                     "queued_join_unavailable", "queued_proof"):
            diverted.add_metric([name.removeprefix("queued_")], nft.get(name, 0))
        yield diverted

        decided = CounterMetricFamily("mplb_nft_decided_syns", "SYNs a service's scheduler table decided in the kernel")
        decided.add_metric([], nft.get("decided", 0))
        yield decided
        copied = CounterMetricFamily("mplb_nft_copied_packets", "Handshake packets copied to the worker (nflog), "
                                     "by the packet that carried the key", labels=["packet"])
        for name in ("copied_synack", "copied_capable", "copied_proof", "copied_join"):
            copied.add_metric([name.removeprefix("copied_")], nft.get(name, 0))
        yield copied
        copies = CounterMetricFamily("mplb_copies", "Copies the worker read, or lost (its socket overrun: "
                                     "those tokens are unknown, their joins are held, then take the unknown-join "
                                     "policy)", labels=["result"])
        copies.add_metric(["read"], stats["copies"])
        copies.add_metric(["lost"], stats["copies_lost"])
        yield copies
        raced = CounterMetricFamily("mplb_held_joins", "Joins held in the queue until their token was learned "
                                    "(found: they raced its copy), dropped for the client to send again (dropped_once) "
                                    "or given up on (expired: in vain twice; pushed_out: held joins were at "
                                    "hold_max, a flood of unknown tokens)", labels=["outcome"])
        for outcome in Held:
            raced.add_metric([outcome.removeprefix("held_")], stats[outcome])
        yield raced

        tokens = GaugeMetricFamily("mplb_tokens_tracked", "MPTCP tokens the worker holds (provisional ones too)")
        tokens.add_metric([], total.tokens)
        yield tokens
        capacity = GaugeMetricFamily("mplb_token_capacity", "Tokens the worker and the kernel map hold at most "
                                     "([limits] token_capacity): beyond, new connections' joins are not steered")
        capacity.add_metric([], w.cfg.token_capacity)
        yield capacity
        provisional = GaugeMetricFamily("mplb_tokens_provisional", "Tokens clients taught whose connections have "
                                        "not proven themselves yet (direct server return)")
        provisional.add_metric([], len(w.balancer.provisional))
        yield provisional
        writes = CounterMetricFamily("mplb_token_writes", "Tokens written to the kernel map: installed, marked "
                                     "colliding (their joins are reset), refused (a client's claim on another "
                                     "connection's token), removed (their connection closed), lost to an error; "
                                     "a client's: provisional, proven by its connection, or pushed out unproven; "
                                     "a cluster peer's, taken over when its connection moved here",
                                     labels=["result"])
        for result, key in (("installed", "tokens_installed"), ("rejected", "tokens_rejected"),
                            ("refused", "tokens_refused"), ("removed", "tokens_removed"),
                            ("error", "token_install_errors"), ("provisional", "tokens_provisional"),
                            ("proven", "tokens_proven"), ("pushed_out", "tokens_pushed_out"),
                            ("taken_over", "tokens_taken_over")):
            writes.add_metric([result], stats[key])
        yield writes
        evicted = CounterMetricFamily("mplb_table_evictions", "Entries pushed out of a full table (flood sign)",
                                      labels=["table"])
        evicted.add_metric(["flows"], w.balancer.flows.evicted)
        evicted.add_metric(["tokens"], w.balancer.tokens.evicted)
        yield evicted

        connections = GaugeMetricFamily("mplb_backend_connections", "Active MPTCP/TCP connections per backend",
                                        labels=["service", "backend"])
        subflows = GaugeMetricFamily("mplb_backend_subflows", "Active added subflows (MP_JOIN) per backend",
                                     labels=["service", "backend"])
        up = GaugeMetricFamily("mplb_backend_up", "1 when the backend is healthy as the balancer uses it: its "
                               "health check passes, in a cluster the cluster's view of the checks",
                               labels=["service", "backend"])
        checked = GaugeMetricFamily("mplb_backend_check_up", "1 when this balancer's own health check passes",
                                    labels=["service", "backend"])
        weight = GaugeMetricFamily("mplb_backend_weight", "The backend's weight", labels=["service", "backend"])
        draining = GaugeMetricFamily("mplb_backend_draining", "1 when the backend takes no new connections",
                                     labels=["service", "backend"])
        for service in w.balancer.services:
            for b in service.backends:
                labels = [service.name, b.name]
                connections.add_metric(labels, b.active)
                subflows.add_metric(labels, b.subflows)
                up.add_metric(labels, int(b.healthy))
                checked.add_metric(labels, int(w.checked.get(b.name, True)))
                weight.add_metric(labels, b.weight)
                draining.add_metric(labels, int(not b.available and b.healthy))
        yield from (connections, subflows, up, checked, weight, draining)

        drops = CounterMetricFamily("mplb_nfqueue_dropped_packets", "Packets the kernel dropped at the queue",
                                    labels=["reason"])
        found = queue_drops(w.cfg.queue, w.cfg.workers)
        drops.add_metric(["queue_full"], found["queue_full"])
        drops.add_metric(["socket_full"], found["socket_full"])
        yield drops

        latency = HistogramMetricFamily("mplb_packet_processing_seconds",
                                        "CPU time to parse and decide one queued packet")
        latency.add_metric([], total.latency.cumulative(), total.latency.sum)
        yield latency
        if w.peers:
            yield from _cluster_metrics(w.peers, nft)
            shared = GaugeMetricFamily("mplb_cluster_backend_view_shared", "1 while backends' health is the "
                                       "cluster's view, 0 while this balancer goes by its own checks (cut off)")
            shared.add_metric([], int(w.peer_votes is not None))
            yield shared


def _cluster_metrics(peers, nft: dict[str, int]):
    report = peers.report()
    redis = GaugeMetricFamily("mplb_cluster_redis_up", "1 when the link to Redis publishes and follows")
    redis.add_metric([], int(report["redis"] == "connected"))
    announced = GaugeMetricFamily("mplb_cluster_announced", "1 while BIRD may announce this balancer's VIPs")
    announced.add_metric([], int(bool(report["announced"])))
    outages = CounterMetricFamily("mplb_cluster_redis_outages", "Times the link lost Redis")
    outages.add_metric([], report["outages"])
    published = CounterMetricFamily("mplb_cluster_published", "Tokens and join subflows this balancer published")
    published.add_metric([], report["published"])
    received = CounterMetricFamily("mplb_cluster_received", "Tokens from each peer installed here", labels=["peer"])
    for peer, n in sorted(report["received"].items()):
        received.add_metric([peer], n)
    rejected = CounterMetricFamily("mplb_cluster_rejected", "Entries read from Redis and ignored, by reason",
                                   labels=["reason"])
    for reason in REJECTED:
        rejected.add_metric([reason], report["rejected"].get(reason, 0))
    joins = CounterMetricFamily("mplb_cluster_joins", "Joins steered by a token a peer taught (crossed: their "
                                "connection came through another balancer; held: they waited for it); "
                                "token_late: tokens a peer brought after a join held for them took the "
                                "unknown-join policy", labels=["kind"])
    joins.add_metric(["crossed"], report["joins_crossed"])
    joins.add_metric(["held_for_peer"], report["held_for_peer"])
    joins.add_metric(["token_late"], report["tokens_after_held_joins_gave_up"])
    moved = CounterMetricFamily("mplb_cluster_moved_subflows", "First packets of join subflows a peer steered, "
                                "picked up here mid-stream (the router moved them)")
    moved.add_metric([], nft.get("subflow_shared", 0))
    same = GaugeMetricFamily("mplb_cluster_peer_config_same", "1 when a peer's config decides as this one's",
                             labels=["peer"])
    heard = GaugeMetricFamily("mplb_cluster_peers", "Peers whose heartbeat is in Redis (a silent one's expires)")
    age = GaugeMetricFamily("mplb_cluster_peer_heartbeat_age_seconds", "Since a peer's last heartbeat",
                            labels=["peer"])
    heard.add_metric([], len(report["peers"]))
    for peer, beat in sorted(report["peers"].items()):
        same.add_metric([peer], int(beat["fingerprint"] == report["fingerprint"]))
        age.add_metric([peer], beat["age_s"])
    delay = HistogramMetricFamily("mplb_cluster_propagation_seconds",
                                  "From a peer's learning to this balancer's kernel map")
    delay.add_metric([], peers.delays.cumulative(), peers.delays.sum)
    yield from (redis, announced, outages, published, received, rejected, joins, moved, same, heard, age, delay)


def serve_metrics(plane, address: str) -> None:
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(WorkerCollector(plane))
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)
