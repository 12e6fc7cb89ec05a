"""The worker's loop: the file descriptors it waits on and what each one's input runs, then the
chores of every turn. A pipe to another worker that breaks is dropped, not fatal: that process
went away; any other failure ends the loop."""
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
        self.chores: list[Callable[[], None]] = []
        self.poller = select.poll()

    def watch(self, fd: int, handler: Callable[[], None], pipe: bool = False) -> None:
        self.handlers[fd] = handler
        self.poller.register(fd, select.POLLIN)
        if pipe:
            self.pipes.add(fd)

    def unwatch(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        self.pipes.discard(fd)
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

    def run(self, running: Callable[[], bool], wait_ms: Callable[[], int]) -> None:
        while running():
            for fd, _ in self.poller.poll(wait_ms()):
                try:
                    self.handlers.get(fd, lambda: None)()  # (a pipe dropped earlier in this round)
                except (EOFError, OSError) as e:
                    if fd not in self.pipes:
                        raise
                    log.warning("lost a peer: %s", e)
                    self.unwatch(fd)
            for chore in self.chores:
                chore()
