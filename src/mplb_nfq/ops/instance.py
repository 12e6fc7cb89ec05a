"""One running instance per table and network namespace."""
from __future__ import annotations

import socket


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
