"""The service's process: one instance per table, the kernel state adopted or installed, the other
workers forked, the cluster's link, metrics and health checks started, then the first worker's
loop until SIGTERM or SIGINT."""
from __future__ import annotations

import json
import logging

from .core.settings import Config
from .kernel.dataplane import Dataplane
from .kernel.conntrack import start_reader
from .kernel.routing import installed_backends
from .kernel.snapshot import place, read_tokens
from .ops.cluster_turn import ClusterTurn
from .ops.fleet import serve_other_worker
from .ops.instance import hold_instance, on_signals
from .ops.link import LinkHandle
from .worker import Worker

log = logging.getLogger("mplb_nfq.worker")


def run(cfg: Config) -> int:
    """Serve until SIGTERM or SIGINT. The kernel state (table, token map, routes, conntrack
    marks) outlives the process: the next one adopts it; `mplb-nfq cleanup` removes it."""
    instance = hold_instance(cfg.table_name)  # before anything is touched: a second run changes nothing
    installed = installed_backends(cfg)
    cfg = cfg.with_stable_marks(cfg.installed_marks(installed), reserved=installed)
    worker = Worker(cfg, Dataplane(cfg))
    dataplane, plane = worker.dataplane, worker.plane
    retired = plane.adopt_retired(installed)

    on_signals(stop=lambda: setattr(plane, "stopping", True),
               reload=lambda: setattr(worker, "reload_requested", True),
               dump=lambda: print(json.dumps({"event": "stats", **plane.report()}), flush=True))
    try:
        dataplane.install(worker.balancer.lookup_tables())
        if not cfg.cluster:  # (a cluster's tokens are also its peers': they are read back from the map)
            worker.snapshot = place(cfg.table_name, dataplane.ruleset.outline().handle)
        # forked while small: a fork shares the worker's pages, a million tokens among them, and
        # Python's reference counts copy them into the child one by one (190 MB at a million)
        worker.follower = start_reader(cfg.conntrack_interval)
        kept = read_tokens(*worker.snapshot) if worker.snapshot else None
        worker.restored = kept is not None
        adopted = worker.tokens.restore(kept) if worker.restored else worker.tokens.adopt()
        adopted_from = "snapshot" if worker.restored else "map"
        if adopted or retired:
            log.info("adopted %d tokens (from the %s); backends gone from the config, retired: %s",
                     adopted, adopted_from, ", ".join(retired) or "none")
        # forked before any thread or socket of the first worker
        plane.fleet.start(cfg.workers, serve_other_worker, (worker,), cfg.queue)
        cluster = ClusterTurn(LinkHandle(cfg.cluster, cfg.token_timeout, plane.fingerprint()), worker.peers, plane,
                              worker.held) if cfg.cluster else None
        if cfg.metrics_address:
            from .ops.metrics import serve_metrics

            serve_metrics(plane, cfg.metrics_address)
        plane.start_health()
        worker.serve(ready=lambda: print(json.dumps({
            "event": "ready", "queue": cfg.queue, "queue_mode": dataplane.queue_mode, "adopted": adopted,
            "adopted_from": adopted_from,
            "control_socket": cfg.control_socket, "metrics": cfg.metrics_address}), flush=True),
            cluster=cluster)
    finally:
        if plane.health:
            plane.health.stop()
        plane.fleet.stop()
        instance.close()
    print(json.dumps({"event": "stopped", **plane.report()}), flush=True)
    return 0
