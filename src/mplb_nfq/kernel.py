"""Kernel adapters: the nftables ruleset and token map, the xtables queue rule, policy routing.

They translate the config and the core's decisions into kernel state and hold no policy.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from .balancer import BACKEND_MASK, LEARNED, QUEUE, REJECT
from .config import Config

log = logging.getLogger("mplb_nfq.kernel")
NFT_DIR = Path(__file__).resolve().parent / "nft"
XT_COMMENT = "mplb-nfq"


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
        import json

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


def queue_statement(cfg: Config, native: bool) -> str:
    if native:
        return f"queue num {cfg.queue} bypass"
    return f"meta mark set meta mark | 0x{QUEUE:08x}"


def render_ruleset(cfg: Config, native: bool) -> str:
    template = Template((NFT_DIR / "mplb.nft").read_text())

    def elements(version: int) -> str:
        if ipaddress.ip_address(cfg.vip).version != version:
            return ""
        return "elements = { " + ", ".join(f"{cfg.vip} . {p}" for p in cfg.ports) + " }"

    return template.substitute(
        table=cfg.table_name, vip4_elements=elements(4), vip6_elements=elements(6),
        token_capacity=cfg.token_capacity, learned=f"0x{LEARNED:08x}", reject=f"0x{REJECT:08x}",
        queue_bit=f"0x{QUEUE:08x}", keep_mask=f"0x{0xFFFFFFFF & ~QUEUE:08x}",
        queue_statement=queue_statement(cfg, native))


def xtables_rule(cfg: Config) -> list[str]:
    return ["-t", "mangle", "PREROUTING", "-m", "mark", "--mark", f"0x{QUEUE:x}/0x{QUEUE:x}",
            "-m", "comment", "--comment", XT_COMMENT,
            "-j", "NFQUEUE", "--queue-num", str(cfg.queue), "--queue-bypass"]


def iptables_binary(cfg: Config) -> str:
    name = "ip6tables" if cfg.family == 6 else "iptables"
    for candidate in (f"{name}-nft", name, f"{name}-legacy"):
        if shutil.which(candidate):
            return candidate
    raise KernelError(f"{name} not found: the xtables NFQUEUE fallback needs it (apt install iptables)")


def token_element(token: int, mark: int, timeout: int) -> str:
    return f"0x{token:08x} timeout {timeout}s : 0x{mark:x}"


@dataclass
class Dataplane:
    """The kernel objects of one config: the nft table, the xtables queue rule, routes and rules.

    All of them are named by the config (table name, queue number, marks, tables, rule priority),
    so `remove` takes away exactly mplb-nfq's own objects, also those a killed worker left behind.
    """

    cfg: Config
    nft: Nft = field(default_factory=Nft)
    native_queue: bool = False

    @property
    def queue_mode(self) -> str:
        return "native nft queue" if self.native_queue else "xtables NFQUEUE on mark bit"

    @property
    def _family(self) -> int:
        return socket.AF_INET6 if self.cfg.family == 6 else socket.AF_INET

    def install(self) -> None:
        cfg = self.cfg
        native = {"auto": None, "native": True, "xtables": False}[cfg.queue_mode]
        self.native_queue = native_queue_supported(self.nft) if native is None else native
        if self.nft.try_run(f"list table inet {cfg.table_name}"):
            log.info("nft table inet %s exists: adopting it with its token map", cfg.table_name)
        else:
            self.nft.run(render_ruleset(cfg, self.native_queue))
        if not self.native_queue:
            self._xtables("-C") or self._xtables("-A", check=True)
        self._install_routing()
        log.info("queue %d, mode: %s", cfg.queue, self.queue_mode)

    def _xtables(self, action: str, check: bool = False) -> bool:
        rule = xtables_rule(self.cfg)
        done = subprocess.run([iptables_binary(self.cfg), *rule[:2], action, *rule[2:]],
                              capture_output=True, text=True)
        if check and done.returncode != 0:
            raise KernelError(f"{iptables_binary(self.cfg)} {action}: {done.stderr.strip()}")
        return done.returncode == 0

    def _routes(self) -> list[dict]:
        cfg = self.cfg
        dst = f"{cfg.vip}/{128 if cfg.family == 6 else 32}"
        routes = [dict(dst=dst, gateway=b.address, table=b.table, family=self._family) for b in cfg.backends]
        # Fail open: a packet the worker never marked still reaches a backend, by a stateless
        # hash of its addresses and ports, as a plain L4 balancer would.
        multipath = [{"gateway": b.address} for b in cfg.backends]
        routes.append(dict(dst=dst, table=self.fallback_table, family=self._family, multipath=multipath))
        return routes

    @property
    def fallback_table(self) -> int:
        return self.cfg.backends[0].table - 1

    def _rules(self) -> list[dict]:
        cfg = self.cfg
        rules = [dict(family=self._family, table=b.table, priority=cfg.rule_priority, fwmark=b.mark,
                      fwmask=BACKEND_MASK) for b in cfg.backends]
        rules.append(dict(family=self._family, table=self.fallback_table, priority=cfg.rule_priority + 1,
                          dst=cfg.vip, dst_len=128 if cfg.family == 6 else 32))
        return rules

    def _install_routing(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            for route in self._routes():
                ipr.route("replace", **route)
            for rule in self._rules():
                try:
                    ipr.rule("add", **rule)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise

    def add_tokens(self, tokens: list[tuple[int, int]]) -> None:
        """Install token -> backend mark in the kernel map, in one batch."""
        elements = ", ".join(token_element(t, m, self.cfg.token_timeout) for t, m in tokens)
        self.nft.run(f"add element inet {self.cfg.table_name} tokens {{ {elements} }}")

    def counters(self) -> dict[str, int]:
        data = self.nft.json(f"list counters table inet {self.cfg.table_name}")
        return {c["counter"]["name"]: c["counter"]["packets"]
                for c in data.get("nftables", []) if "counter" in c}

    def remove(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            for rule in self._rules():
                while True:  # a rule added twice by hand would leave a copy behind
                    try:
                        ipr.rule("del", **rule)
                    except NetlinkError:
                        break
            for route in self._routes():
                try:
                    ipr.route("del", **route)
                except NetlinkError:
                    pass
        try:
            while self._xtables("-D"):
                pass
        except KernelError:
            pass  # no iptables binary: no rule of ours either
        family = "ip6" if self.cfg.family == 6 else "ip"
        mangle = self.nft.json(f"list table {family} mangle") if self.nft.try_run(
            f"list table {family} mangle") else {}
        if mangle and not any("rule" in item for item in mangle.get("nftables", [])):
            self.nft.try_run(f"delete table {family} mangle")  # iptables-nft made it for our rule alone
        self.nft.try_run(f"delete table inet {self.cfg.table_name}")
