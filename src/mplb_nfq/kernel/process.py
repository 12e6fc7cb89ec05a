"""The set-up every helper process of the worker's shares: it ends with its parent, and leaves the
signals the parent acts on (SIGINT, SIGHUP, SIGUSR1) to the parent."""
from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sent: int = signal.SIGKILL, on_sigterm=signal.SIG_DFL) -> None:
    """`sent` reaches this process when its parent dies; SIGTERM runs `on_sigterm`."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, sent)
    signal.signal(signal.SIGTERM, on_sigterm)
    for ignored in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(ignored, signal.SIG_IGN)
