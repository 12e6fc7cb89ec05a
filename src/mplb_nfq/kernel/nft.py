"""libnftables through its Python binding, for the ruleset (its counters are read over nfnetlink: kernel/tokenmap.py)."""
from __future__ import annotations

import json


class KernelError(RuntimeError):
    pass


class Nft:
    """libnftables through its Python binding, raising on any error."""

    def __init__(self):
        import nftables  # the binding loads libnftables.so.1: import only where it is used

        self._nft = nftables.Nftables()
        self._nft.set_json_output(False)
        self._nft.set_handle_output(False)

    def run(self, commands: str) -> str:
        rc, out, err = self._nft.cmd(commands)
        if rc != 0:
            raise KernelError(f"nft: {err.strip() or 'error ' + str(rc)}")
        return out

    def try_run(self, commands: str) -> bool:
        return self._nft.cmd(commands)[0] == 0

    def json(self, commands: str) -> dict:
        self._nft.set_json_output(True)
        try:
            return json.loads(self.run(commands) or "{}")
        finally:
            self._nft.set_json_output(False)


def native_queue_supported(nft: Nft) -> bool:
    """Probe for nft_queue: a rule with `queue` in a throw-away table with no hook."""
    probe = "mplb_probe_queue"
    try:
        return nft.try_run(f"add table inet {probe}; add chain inet {probe} c; "
                           f"add rule inet {probe} c queue num 0 bypass")
    finally:
        nft.try_run(f"delete table inet {probe}")
