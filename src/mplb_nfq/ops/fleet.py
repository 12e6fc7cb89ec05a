"""Several worker processes: the first one runs the kernel, the health checks, the control socket
and, in a cluster, the link to its peers; it passes state changes on to the others, which report
their counters back, and in a cluster the joins they steered."""
from __future__ import annotations

import multiprocessing
import signal
import threading
from dataclasses import dataclass
from typing import Callable

from ..kernel.conntrack import Counts, Ended
from ..kernel.process import die_with_parent
from .counters import Report

WORKER_START_SECONDS = 30.0  # for a worker beyond the first to bind its queue, before the first says "ready"


@dataclass(frozen=True)
class HealthChanged:
    backend: str
    up: bool
    error: str | None


@dataclass(frozen=True)
class Drained:
    backend: str
    drained: bool


@dataclass(frozen=True)
class Reloaded:
    path: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Steered:
    """From a cluster's worker beyond the first: a join it steered by its token (held: after
    waiting for it). The first worker publishes it, as it does its own."""
    flow: tuple
    token: int
    mark: int
    held: bool = False


@dataclass(frozen=True)
class GaveUp:
    """From a cluster's worker beyond the first: a join it held for this token took the
    unknown-join policy (the first counts the token if a peer brings it later)."""
    token: int


class ToFirstWorker:
    """What a cluster's worker beyond the first has of ops.peers.Peers: the joins it steers go to
    the first worker, which alone talks to the cluster's link."""

    def __init__(self, parent):
        self.parent = parent

    def steered(self, flow: tuple, token: int, mark: int, held: bool = False) -> None:
        self.parent.send(Steered(flow, token, mark, held))

    def gave_up_on(self, token: int) -> None:
        self.parent.send(GaveUp(token))


Message = HealthChanged | Drained | Reloaded | Counts | Ended | Stop


class Fleet:
    """The first worker's pipes to the others, and their last reports."""

    def __init__(self):
        self.pipes: list = []  # to workers 1.. ("peers" are other balancers: ops/peers.py)
        self.processes: list[multiprocessing.Process] = []
        self.reports: dict[int, Report] = {}
        self._lock = threading.Lock()  # the health thread sends too

    def start(self, count: int, target: Callable, args: tuple, queue: int) -> None:
        """Fork workers 1..count-1, each running target(*args, index, pipe), and wait until each
        has bound its queue: "ready" means every queue has its reader."""
        for index in range(1, count):
            mine, theirs = multiprocessing.Pipe()
            process = multiprocessing.Process(target=target, args=(*args, index, theirs), name=f"mplb-nfq worker {index}",
                                              daemon=True)
            process.start()
            theirs.close()  # the child's end: closed here, a child that dies gives EOF at once
            self.pipes.append(mine)
            self.processes.append(process)
        for index, pipe in enumerate(self.pipes, 1):
            if not pipe.poll(WORKER_START_SECONDS):
                raise RuntimeError(f"worker {index} did not bind queue {queue + index} "
                                   f"within {WORKER_START_SECONDS:.0f} s")
            try:
                self.reports[index] = pipe.recv()
            except EOFError:
                raise RuntimeError(f"worker {index} exited while starting (see its error above)") from None

    def broadcast(self, message: Message) -> None:
        with self._lock:
            for pipe in self.pipes:
                try:
                    pipe.send(message)
                except OSError:
                    pass

    def total(self, own: Report) -> Report:
        total = own
        for report in self.reports.values():
            total = total.plus(report)
        return total

    def stop(self) -> None:
        self.broadcast(Stop())
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def serve_other_worker(worker, index: int, parent) -> None:
    """A worker process beyond the first (a Worker of worker.py): its own queue, its own netlink sockets."""

    def stop(signum, frame):
        worker.plane.stopping = True

    die_with_parent(signal.SIGTERM, stop)  # the first worker decides, and tells it
    worker.dataplane.reopen()
    worker.plane.fleet = Fleet()
    worker.serve(ready=lambda: parent.send(worker.plane.own_report()), parent=parent, index=index)
