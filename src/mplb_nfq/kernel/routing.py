"""Policy routing: per backend a table and a fwmark rule, per VIP a fail-open multipath route,
tunnel devices for tunnelled backends. The plan is pure; the adapter applies it over rtnetlink."""
from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Collection

from ..core.marks import BACKEND_MASK, JOIN
from ..core.settings import BackendConfig, Config
from .nft import KernelError

RetiredRoutes = list[tuple[BackendConfig, list[str]]]  # backends gone from the config, with their VIPs

MAIN_TABLE = 254
RTNH_F_ONLINK = 4
VXLAN_PORT = 4789


def _af(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _host(address: str) -> str:
    return f"{address}/{128 if ipaddress.ip_address(address).version == 6 else 32}"


def _hop(b: BackendConfig, version: int) -> dict:
    """How the LB reaches backend b in one address family: a gateway on a shared segment, or
    through its tunnel device (VXLAN: to its inner address, on link; IPIP: the device alone)."""
    address = next(a for a in b.addresses if ipaddress.ip_address(a).version == version)
    if b.tunnel == "ipip":
        return {"dev": b.device}
    if b.tunnel == "vxlan":
        return {"gateway": address, "dev": b.device, "onlink": True}
    return {"gateway": address}


def routing_plan(cfg: Config, retired: RetiredRoutes = (), unavailable: Collection[str] = ()) -> tuple[list[dict], list[dict]]:
    """The routes and rules of a config: per backend a table routing each of its VIPs to it and a
    fwmark rule (a tunnelled backend also gets a host route to its inner address, for its health
    checks); per VIP a fail-open multipath route over the backends that take new connections
    (over all of them when none does). Retired backends (gone from the config, connections
    still open) keep theirs."""
    members = [(b, [vip for s in cfg.services if b.name in s.backends for vip in s.vips]) for b in cfg.backends]
    routes, rules = [], []
    for b, vips in members + list(retired):
        for version in sorted({ipaddress.ip_address(v).version for v in vips}):
            routes += [dict(dst=_host(v), table=b.table, family=_af(version), **_hop(b, version))
                       for v in vips if ipaddress.ip_address(v).version == version]
            rules.append(_fwmark_rule(cfg, b.table, b.mark, version))
        if b.device:
            routes += [dict(dst=_host(a), table=MAIN_TABLE, family=_af(ipaddress.ip_address(a).version), dev=b.device)
                       for a in b.addresses]
    by_name = {b.name: b for b in cfg.backends}
    for s in cfg.services:
        for vip in s.vips:
            version = ipaddress.ip_address(vip).version
            # Fail open: a packet the worker never marked still reaches a backend, by a stateless
            # hash of its addresses and ports, as a plain L4 balancer would.
            available = [n for n in s.backends if n not in unavailable] or s.backends
            routes.append(dict(dst=_host(vip), table=cfg.fallback_table, family=_af(version),
                               multipath=[_hop(by_name[n], version) for n in available]))
            rules.append(dict(family=_af(version), table=cfg.fallback_table, priority=cfg.rule_priority + 1,
                              dst=vip, dst_len=128 if version == 6 else 32))
    # A join queued because it missed the token map carries JOIN and no backend; should no worker
    # take it (the queue bypassed), it is dropped, not sent down the fail-open route to a guess:
    # the client sends its SYN again, by when a worker may know its token.
    for version in sorted({ipaddress.ip_address(vip).version for s in cfg.services for vip in s.vips}):
        rules.append(dict(family=_af(version), priority=cfg.rule_priority, fwmark=JOIN, fwmask=JOIN | BACKEND_MASK,
                          action="FR_ACT_BLACKHOLE"))
    return routes, rules


def _fwmark_rule(cfg: Config, table: int, mark: int, version: int) -> dict:
    return dict(family=_af(version), table=table, priority=cfg.rule_priority, fwmark=mark, fwmask=BACKEND_MASK)


def _identity(route: dict) -> dict:
    """What names a route of the plan for deletion: its destination in its table."""
    return {k: route[k] for k in ("dst", "table", "family")}


def _netlink(ipr, route: dict) -> dict:
    """A route of the plan as pyroute2 takes it: device names to indexes, on-link to its flag."""
    def convert(hop: dict) -> dict:
        hop = dict(hop)
        if "dev" in hop:
            hop["oif"] = ipr.link_lookup(ifname=hop.pop("dev"))[0]
        if hop.pop("onlink", False):
            hop["flags"] = RTNH_F_ONLINK
        return hop

    converted = convert(route)
    if "multipath" in converted:
        converted["multipath"] = [convert(h) for h in converted["multipath"]]
    return converted


def _same(a: dict, b: dict) -> bool:
    return sorted(a.items(), key=str) == sorted(b.items(), key=str)


def _quietly(call, *args, **kwargs) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call(*args, **kwargs)
        return True
    except NetlinkError:
        return False


class Routing:
    """The routes, rules and tunnel devices of the config in force; it remembers what it installed,
    so that a reload removes what is no longer wanted."""

    def __init__(self):
        self.routes: list[dict] = []
        self.rules: list[dict] = []
        self.tunnels: set[str] = set()  # device names

    def sync_tunnels(self, cfg: Config, retired: RetiredRoutes = ()) -> None:
        """One tunnel device per tunnelled backend (VXLAN: VNI vni, UDP 4789; IPIP), up; the
        devices of backends gone are deleted, with the routes through them."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        wanted = {b.device: b for b in [*cfg.backends, *(b for b, _ in retired)] if b.device}
        with IPRoute() as ipr:
            for name, b in wanted.items():
                if ipr.link_lookup(ifname=name):
                    continue
                try:
                    if b.tunnel == "vxlan":  # pyroute2 calls the unicast remote "group", as the kernel does
                        ipr.link("add", ifname=name, kind="vxlan", vxlan_id=b.vni, vxlan_group=b.remote,
                                 vxlan_port=VXLAN_PORT)
                    else:
                        ipr.link("add", ifname=name, kind="ipip", ipip_remote=b.remote)
                except NetlinkError as e:
                    raise KernelError(f"backend {b.name}: cannot create its {b.tunnel} device {name}: "
                                      f"{e.args[1] if len(e.args) > 1 else e} (see `mplb-nfq check`)") from None
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            for name in self.tunnels - set(wanted):
                _quietly(ipr.link, "del", index=(ipr.link_lookup(ifname=name) or [0])[0])
        self.tunnels = set(wanted)

    def sync_routes(self, cfg: Config, retired: RetiredRoutes = (), unavailable: Collection[str] = ()) -> None:
        """Install the routes and rules of `cfg` (and of retired backends), remove those no longer wanted."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        routes, rules = routing_plan(cfg, retired, unavailable)
        with IPRoute() as ipr:
            for route in routes:
                ipr.route("replace", **_netlink(ipr, route))
            for rule in rules:
                if not any(_same(rule, old) for old in self.rules):
                    try:
                        ipr.rule("add", **rule)
                    except NetlinkError as e:
                        if e.code != errno.EEXIST:
                            raise
            for rule in self.rules:
                if not any(_same(rule, new) for new in rules):
                    _quietly(ipr.rule, "del", **rule)
            for route in self.routes:
                if not any(route["dst"] == new["dst"] and route["table"] == new["table"] for new in routes):
                    _quietly(ipr.route, "del", **_identity(route))
        self.routes, self.rules = routes, rules

    def remove(self, cfg: Config) -> None:
        """What this process installed, what `cfg` names, and every backend rule and table that
        a process before it installed (also those of backends gone from the config since)."""
        from pyroute2 import IPRoute

        routes, rules = routing_plan(cfg)
        for mark, (table, _, vips) in installed_backends(cfg).items():
            for vip in vips:
                version = ipaddress.ip_address(vip).version
                routes.append(dict(dst=_host(vip), table=table, family=_af(version)))
                rules.append(_fwmark_rule(cfg, table, mark, version))
        with IPRoute() as ipr:
            for rule in self.rules + rules:
                while _quietly(ipr.rule, "del", **rule):  # a rule added twice would leave a copy behind
                    pass
            for route in self.routes + routes:
                _quietly(ipr.route, "del", **_identity(route))
            for name in self.tunnels | {b.device for b in cfg.backends if b.device}:
                for index in ipr.link_lookup(ifname=name):
                    _quietly(ipr.link, "del", index=index)
        self.routes, self.rules, self.tunnels = [], [], set()


def installed_backends(cfg: Config) -> dict[int, tuple[int, set[str], set[str]]]:
    """What a process before this one installed, read back from the kernel: per backend mark, its
    routing table, the addresses its routes go through and the VIPs they route. The kernel
    holds it across restarts, as it holds the conntrack marks that name those backends."""
    from pyroute2 import IPRoute

    found: dict[int, tuple[int, set[str], set[str]]] = {}
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in ipr.get_rules(family=family):
                mark, mask = rule.get_attr("FRA_FWMARK"), rule.get_attr("FRA_FWMASK")
                if rule.get_attr("FRA_PRIORITY") != cfg.rule_priority or mark is None or mask != BACKEND_MASK:
                    continue
                table = rule.get_attr("FRA_TABLE") or rule["table"]
                hops, vips = found.setdefault(mark, (table, set(), set()))[1:]
                for route in ipr.get_routes(family=family, table=table):
                    gateway, dst = route.get_attr("RTA_GATEWAY"), route.get_attr("RTA_DST")
                    if gateway:
                        hops.add(gateway)
                    if dst:
                        vips.add(dst)
    return found
