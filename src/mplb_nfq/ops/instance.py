"""One running instance per table and network namespace, and what signals ask of it."""
from __future__ import annotations

import signal
import socket
from typing import Callable


def hold_instance(table: str) -> socket.socket:
    """One instance per table and network namespace: an abstract unix socket, which the kernel
    frees when the process ends, however it ends."""
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        holder.bind(f"\0mplb-nfq/{table}")
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
