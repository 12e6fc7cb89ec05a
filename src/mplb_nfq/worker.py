"""The NFQUEUE worker: packet from the queue -> core decision -> verdict; tokens to the kernel map after."""
from __future__ import annotations

import json
import logging
import select
import signal
import time
from collections import Counter

from .balancer import BACKEND_MASK, Balancer
from .config import Config
from .kernel import Dataplane
from .packet import parse_ip

log = logging.getLogger("mplb_nfq.worker")


class Worker:
    def __init__(self, cfg: Config, balancer: Balancer, dataplane: Dataplane, clock=time.monotonic):
        self.cfg, self.balancer, self.dataplane, self.clock = cfg, balancer, dataplane, clock
        self.pending_tokens: list[tuple[int, int]] = []
        self.stats: Counter[str] = Counter()
        self.decide_ns = self.verdict_ns = 0
        self.stopping = False

    def handle(self, packet) -> None:
        """NetfilterQueue callback: the verdict goes first, whatever happens."""
        started = time.thread_time_ns()
        try:
            verdict = self.balancer.decide(parse_ip(packet.get_payload()), packet.get_mark(), self.clock())
        except Exception:  # a bug must not stall the queue: accept unchanged and count it
            log.exception("decision failed; packet accepted unchanged")
            self.stats["errors"] += 1
            packet.accept()
            return
        decided = time.thread_time_ns()
        if verdict.accept:
            packet.set_mark(verdict.mark)
            packet.accept()
            self.stats["accepted"] += 1
        else:
            packet.drop()
            self.stats["dropped"] += 1
        if verdict.token is not None:
            self.pending_tokens.append((verdict.token, verdict.mark & BACKEND_MASK))
        # The verdict's sendmsg also runs the rest of the packet's path in the kernel (the
        # remaining hooks, routing, the transmit): counted apart from our own work.
        self.decide_ns += decided - started
        self.verdict_ns += time.thread_time_ns() - decided

    def flush_tokens(self) -> None:
        if not self.pending_tokens:
            return
        batch, self.pending_tokens = self.pending_tokens, []
        try:
            self.dataplane.add_tokens(batch)
            self.stats["tokens_installed"] += len(batch)
        except Exception as e:  # the core still knows them; joins that miss the map get queued
            log.error("token install failed (%d tokens): %s", len(batch), e)
            self.stats["token_install_errors"] += len(batch)

    def serve(self) -> None:
        from netfilterqueue import NetfilterQueue

        queue = NetfilterQueue()
        queue.bind(self.cfg.queue, self.handle, max_len=4096)
        poller = select.poll()
        poller.register(queue.get_fd(), select.POLLIN)
        log.info("worker listening on queue %d", self.cfg.queue)
        try:
            while not self.stopping:
                if poller.poll(200):
                    queue.run(block=False)
                self.flush_tokens()
        finally:
            queue.unbind()
            self.flush_tokens()

    def report(self) -> dict:
        handled = self.stats["accepted"] + self.stats["dropped"] + self.stats["errors"]
        return {"packets": handled, **self.stats, "kinds": dict(self.balancer.counts),
                "tokens_tracked": len(self.balancer.tokens), "flows_tracked": len(self.balancer.flows),
                "decide_us_per_packet": round(self.decide_ns / 1000 / handled, 2) if handled else None,
                "verdict_us_per_packet": round(self.verdict_ns / 1000 / handled, 2) if handled else None,
                "queue_mode": self.dataplane.queue_mode}


def run(cfg: Config) -> int:
    dataplane = Dataplane(cfg)
    worker = Worker(cfg, cfg.balancer(), dataplane)

    def stop(signum, frame):
        worker.stopping = True

    def dump(signum, frame):
        print(json.dumps({"event": "stats", **worker.report()}), flush=True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, dump)
    try:
        dataplane.install()
        print(json.dumps({"event": "ready", "queue": cfg.queue, "queue_mode": dataplane.queue_mode}),
              flush=True)
        worker.serve()
    finally:
        dataplane.remove()
    print(json.dumps({"event": "stopped", **worker.report()}), flush=True)
    return 0
