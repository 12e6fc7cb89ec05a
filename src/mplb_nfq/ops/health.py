"""Backend health checks: a TCP (or MPTCP) connect to each backend's real address, with rise/fall.

`Hysteresis` is the pure part; `probe` does one check; `HealthChecker` runs them in a thread.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("mplb_nfq.health")
SOL_MPTCP, MPTCP_INFO = 284, 1


class Hysteresis:
    """Up after `rise` successes in a row, down after `fall` failures in a row; starts up."""

    def __init__(self, rise: int, fall: int):
        self.rise, self.fall = rise, fall
        self.up = True
        self._streak = 0  # > 0: successes in a row, < 0: failures in a row

    def record(self, ok: bool) -> bool | None:
        """Record one result; returns the new state when it changed, else None."""
        self._streak = max(self._streak, 0) + 1 if ok else min(self._streak, 0) - 1
        if not self.up and self._streak >= self.rise:
            self.up = True
            return True
        if self.up and -self._streak >= self.fall:
            self.up = False
            return False
        return None


def probe(address: str, port: int, timeout: float, mptcp: bool) -> str | None:
    """One check; None when healthy, else why not."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    proto = socket.IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP
    try:
        with socket.socket(family, socket.SOCK_STREAM, proto) as s:
            s.settimeout(timeout)
            s.connect((address, port))
            if mptcp:
                try:
                    s.getsockopt(SOL_MPTCP, MPTCP_INFO, 256)
                except OSError as e:
                    if e.errno == errno.EOPNOTSUPP:
                        return "connected, but fell back to TCP (no MP_CAPABLE)"
                    raise
    except OSError as e:
        return e.strerror or str(e)
    return None


class HealthChecker:
    """Checks every target each interval in a thread; reports state changes through `on_change`."""

    def __init__(self, interval: float, timeout: float, rise: int, fall: int, mptcp: bool,
                 targets: Callable[[], list[tuple[str, str, int]]],
                 on_change: Callable[[str, bool, str | None], None], check=probe):
        self.interval, self.timeout, self.mptcp = interval, timeout, mptcp
        self.rise, self.fall = rise, fall
        self.targets, self.on_change, self.check = targets, on_change, check
        self.states: dict[str, Hysteresis] = {}
        self.last_error: dict[str, str | None] = {}
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + self.timeout + 1)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.run_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def run_once(self) -> None:
        threads, results = [], {}
        targets = self.targets()
        for name, address, port in targets:
            def one(name=name, address=address, port=port):
                results[name] = self.check(address, port, self.timeout, self.mptcp)
            threads.append(threading.Thread(target=one, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout + 1)
        for name, _, _ in targets:
            error = results.get(name, "check did not finish")
            state = self.states.setdefault(name, Hysteresis(self.rise, self.fall))
            self.last_error[name] = error
            changed = state.record(error is None)
            if changed is not None:
                log.warning("backend %s is now %s%s", name, "up" if changed else "down",
                            f" ({error})" if error else "")
                self.on_change(name, changed, error)
        self.rounds += 1

    @property
    def settled(self) -> bool:
        """Every backend checked `fall` times: one that is down is seen down by now (all start up)."""
        return self.rounds >= self.fall
