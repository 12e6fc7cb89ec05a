"""One running instance per table and network namespace, and what signals ask of it."""
from __future__ import annotations

import fcntl
import os
import signal
from typing import Callable, IO

from ..kernel.snapshot import DIRECTORY

LOCK_DIRECTORY = str(DIRECTORY)


def hold_instance(table: str, directory: str = LOCK_DIRECTORY) -> IO:
    """One instance per table and network namespace: an exclusive lock on a file in a directory
    only root may write, which the kernel releases when the process ends, however it ends. (An
    abstract unix socket does that too, but any local user may bind its name first.) A POSIX
    record lock, not flock: it belongs to this process alone, so a child forked from it and
    still dying after a SIGKILL does not keep the next worker from starting."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    namespace = os.stat("/proc/self/ns/net").st_ino
    holder = open(os.path.join(directory, f"{namespace}-{table}.lock"), "a")
    try:
        fcntl.lockf(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder.close()
        raise AlreadyRunning(f"another mplb-nfq runs with table {table!r} in this network namespace; "
                             "it is left as it is") from None
    return holder


class AlreadyRunning(RuntimeError):
    pass


def on_signals(stop: Callable[[], None], reload: Callable[[], None], dump: Callable[[], None]) -> None:
    """SIGTERM and SIGINT stop (the kernel state stays), SIGHUP reloads, SIGUSR1 prints the counters."""
    for number, action in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload),
                           (signal.SIGUSR1, dump)):
        signal.signal(number, lambda signum, frame, action=action: action())
