"""Logging a fault that repeats per packet or per batch without flooding the log."""
from __future__ import annotations

import logging
import time

ERROR_LOG_SECONDS = 10.0


class ThrottledLog:
    """Logs a fault at most once per ERROR_LOG_SECONDS for each kind, saying how many were left
    out; the counters count them all."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.last: dict[str, tuple[float, int]] = {}  # per kind: when last logged, how many since

    def error(self, kind: str, message: str, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, left_out = self.last.get(kind, (-ERROR_LOG_SECONDS, 0))
        if now - last < ERROR_LOG_SECONDS:
            self.last[kind] = (last, left_out + 1)
            return
        self.last[kind] = (now, 0)
        self.log.error("%s%s", message, f" ({left_out} more like it in the last {now - last:.0f} s)" if left_out else "",
                       exc_info=exc_info)
