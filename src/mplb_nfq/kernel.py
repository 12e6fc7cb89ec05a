"""Kernel adapters: the nftables ruleset and token map, the xtables queue rule, policy routing.

They translate the config and the core's decisions into kernel state and hold no policy.
"""
from __future__ import annotations

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
    """What the worker installs, so that stopping removes exactly that."""

    cfg: Config
    nft: Nft = field(default_factory=Nft)
    native_queue: bool = False
    created_table: bool = False
    xt_rule: list[str] | None = None
    xt_created_mangle: bool = False
    installed_rules: list[dict] = field(default_factory=list)
    installed_routes: list[dict] = field(default_factory=list)

    @property
    def queue_mode(self) -> str:
        return "native nft queue" if self.native_queue else "xtables NFQUEUE on mark bit"

    def install(self) -> None:
        cfg = self.cfg
        native = {"auto": None, "native": True, "xtables": False}[cfg.queue_mode]
        self.native_queue = native_queue_supported(self.nft) if native is None else native
        table = f"inet {cfg.table_name}"
        if self.nft.try_run(f"list table {table}"):
            log.info("nft table %s exists: using it as it is", table)
        else:
            self.nft.run(render_ruleset(cfg, self.native_queue))
            self.created_table = True
        if not self.native_queue:
            self._install_xtables_rule()
        self._install_routing()
        log.info("queue %d, mode: %s", cfg.queue, self.queue_mode)

    def _install_xtables_rule(self) -> None:
        binary = iptables_binary(self.cfg)
        rule = xtables_rule(self.cfg)
        table, chain, spec = rule[:2], rule[2], rule[3:]
        family = "ip6" if self.cfg.family == 6 else "ip"
        had_mangle = self.nft.try_run(f"list table {family} mangle")
        if subprocess.run([binary, *table, "-C", chain, *spec], capture_output=True).returncode == 0:
            return  # already there (left by a killed worker): keep it, leave it on stop
        done = subprocess.run([binary, *table, "-A", chain, *spec], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelError(f"{binary}: {done.stderr.strip()}")
        self.xt_rule = [binary, *rule]
        self.xt_created_mangle = not had_mangle

    def _install_routing(self) -> None:
        from pyroute2 import IPRoute

        cfg = self.cfg
        family = socket.AF_INET6 if cfg.family == 6 else socket.AF_INET
        width = 128 if cfg.family == 6 else 32
        fallback = cfg.backends[0].table - 1
        with IPRoute() as ipr:
            for backend in cfg.backends:
                route = dict(dst=f"{cfg.vip}/{width}", gateway=backend.address, table=backend.table,
                             family=family)
                ipr.route("replace", **route)
                self.installed_routes.append(route)
                self._add_rule(ipr, dict(family=family, table=backend.table, priority=cfg.rule_priority,
                                         fwmark=backend.mark, fwmask=BACKEND_MASK))
            # Fail open: a packet the worker never marked still reaches a backend, by a
            # stateless hash of its addresses and ports, as a plain L4 balancer would.
            multipath = [{"gateway": b.address} for b in cfg.backends]
            route = dict(dst=f"{cfg.vip}/{width}", table=fallback, family=family, multipath=multipath)
            ipr.route("replace", **route)
            self.installed_routes.append(route)
            self._add_rule(ipr, dict(family=family, table=fallback, priority=cfg.rule_priority + 1,
                                     dst=cfg.vip, dst_len=width))

    def _add_rule(self, ipr, rule: dict) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.rule("add", **rule)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: left by an earlier worker
                raise
        self.installed_rules.append(rule)

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
            for rule in reversed(self.installed_rules):
                try:
                    ipr.rule("del", **rule)
                except NetlinkError:
                    pass
            for route in reversed(self.installed_routes):
                try:
                    ipr.route("del", **route)
                except NetlinkError:
                    pass
        self.installed_rules.clear()
        self.installed_routes.clear()
        if self.xt_rule:
            binary, table, chain, spec = self.xt_rule[0], self.xt_rule[1:3], self.xt_rule[3], self.xt_rule[4:]
            subprocess.run([binary, *table, "-D", chain, *spec], capture_output=True)
            if self.xt_created_mangle:
                family = "ip6" if self.cfg.family == 6 else "ip"
                self.nft.try_run(f"delete table {family} mangle")
            self.xt_rule = None
        if self.created_table:
            self.nft.run(f"delete table inet {self.cfg.table_name}")
            self.created_table = False
