"""The worker's loop: the file descriptors it waits on and what each one's input runs, then the
chores of every turn; a turn may gather (see run). A pipe to another worker that breaks is
dropped, not fatal: that process went away; any other failure ends the loop."""
from __future__ import annotations

import logging
import select
import time
from typing import Callable

log = logging.getLogger("mplb_nfq.worker")


class Loop:
    def __init__(self):
        self.handlers: dict[int, Callable[[], None]] = {}
        self.pipes: set[int] = set()
        self.at_once: set[int] = set()  # inputs a turn does not gather for (see run)
        self.chores: list[Callable[[], None]] = []
        self.poller = select.poll()

    def watch(self, fd: int, handler: Callable[[], None], pipe: bool = False, at_once: bool = False) -> None:
        self.handlers[fd] = handler
        self.poller.register(fd, select.POLLIN)
        if pipe:
            self.pipes.add(fd)
        if at_once:
            self.at_once.add(fd)

    def unwatch(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        self.pipes.discard(fd)
        self.at_once.discard(fd)
        self.poller.unregister(fd)

    def every_turn(self, chore: Callable[[], None]) -> None:
        self.chores.append(chore)

    def every(self, seconds: float, chore: Callable[[], None]) -> None:
        due = [0.0]

        def when_due():
            if time.monotonic() >= due[0]:
                due[0] = time.monotonic() + seconds
                chore()

        self.chores.append(when_due)

    def run(self, running: Callable[[], bool], wait_ms: Callable[[], int],
            gather: Callable[[], float] = lambda: 0.0) -> None:
        """Turns until running() is false. A turn that input wakes begins gather() seconds after
        it, and takes what came meanwhile too; one for an input watched at_once (an operator's
        command) or for time (wait_ms) begins at once."""
        while running():
            ready = self.poller.poll(wait_ms())
            pause = gather() if ready and not any(fd in self.at_once for fd, _ in ready) else 0.0
            if pause:
                time.sleep(min(pause, wait_ms() / 1000))  # not past a held join's deadline
                ready = self.poller.poll(0)
            for fd, _ in ready:
                try:
                    self.handlers.get(fd, lambda: None)()  # (a pipe dropped earlier in this round)
                except (EOFError, OSError) as e:
                    if fd not in self.pipes:
                        raise
                    log.warning("lost a peer: %s", e)
                    self.unwatch(fd)
            for chore in self.chores:
                chore()
