"""The lab topology in network namespaces, for the lab and the kernel tests.

    client ==(2 links, 50 Mbit/s each)== lb --- switch (bridge) --- backend1..N (VIP on lo)

Namespace names carry a per-run tag, so that runs never collide and cleanup removes only its own.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

VIP, VIP6 = "10.0.100.1", "fd00:100::1"
CLIENT = {4: ("10.0.1.2", "10.0.2.2"), 6: ("fd00:1::2", "fd00:2::4")}  # split by the `sh` hash
DUAL_STACK_V6 = "fd00:2::2"  # the client's IPv6 source on path 2 in dual stack; split from CLIENT[4][0] by `sh`
CLIENT_NETS = {4: ("10.0.1.0/24", "10.0.2.0/24"), 6: ("fd00:1::/64", "fd00:2::/64")}
LB_CLIENT_SIDE = {4: ("10.0.1.1", "10.0.2.1"), 6: ("fd00:1::1", "fd00:2::1")}
LB_BACKEND_SIDE = {4: "10.0.9.1", 6: "fd00:9::1"}
CLIENT_ON_SWITCH = {4: ("10.0.9.101", "10.0.9.102"), 6: ("fd00:9::101", "fd00:9::102")}  # direct return only
BACKEND_SETUP = Path(__file__).resolve().parent.parent / "backend-setup.sh"
# the LB sees one direction of each flow only: what deploy/sysctl.d/ sets for it, too
DIRECT_RETURN_SYSCTLS = {"net.netfilter.nf_conntrack_tcp_loose": 1,
                         "net.netfilter.nf_conntrack_tcp_timeout_max_retrans": 86400,
                         "net.netfilter.nf_conntrack_tcp_timeout_unacknowledged": 86400}


LB_UNDERLAY, ROUTER_UNDERLAY, BACKEND_UNDERLAY_NET = "10.0.8.1", "10.0.8.2", "10.0.64.0/18"


def underlay_address(i: int) -> str:
    """A tunnelled backend's own address, in a subnet of its own behind the router."""
    return f"10.0.{71 + i}.2"


def tunnel_address(i: int) -> str:
    """A tunnelled backend's address inside its tunnel: where the LB sends the VIP's packets."""
    return f"172.31.{1 + i}.2"


def tunnel_vni(i: int) -> int:
    return 100 + i


def backend_address(i: int, version: int = 4) -> str:
    return f"10.0.9.{11 + i}" if version == 4 else f"fd00:9::{11 + i}"


@dataclass
class Topology:
    backends: int = 2
    rate_mbit: int | None = 50
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    direct_return: bool = False
    tunnel: str | None = None  # vxlan or ipip: the backends sit behind a router, reached through tunnels
    client_addresses: tuple[str, str] = CLIENT[4]
    built: bool = False

    def ns(self, role: str) -> str:
        return f"mplb{self.tag}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns("client"), self.ns("lb"), self.ns("switch")] + [
            self.ns(f"b{i + 1}") for i in range(self.backends)] + ([self.ns("router")] if self.tunnel else [])

    @property
    def backend_names(self) -> list[str]:
        return [f"b{i + 1}" for i in range(self.backends)]

    def __enter__(self) -> "Topology":
        self.build()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def build(self) -> None:
        self.built = True  # from here on, destroy() has something to remove
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        client, lb, switch = self.ns("client"), self.ns("lb"), self.ns("switch")
        cmds = [f"netns add {n}" for n in self.namespaces]
        cmds += [
            f"link add c1 netns {client} type veth peer name l1 netns {lb}",
            f"link add c2 netns {client} type veth peer name l2 netns {lb}",
            f"link add s0 netns {lb} type veth peer name lb netns {switch}",
            f"-n {switch} link add br0 type bridge",
            f"-n {switch} link set lb master br0",
        ]
        if self.direct_return:  # the backends' answers reach the client through the switch, one port per path
            for k in (1, 2):
                cmds += [f"link add cr{k} netns {client} type veth peer name cr{k} netns {switch}",
                         f"-n {switch} link set cr{k} master br0", f"-n {switch} link set cr{k} up",
                         f"-n {client} addr add {CLIENT_ON_SWITCH[4][k - 1]}/24 dev cr{k}",
                         f"-n {client} addr add {CLIENT_ON_SWITCH[6][k - 1]}/64 dev cr{k} nodad",
                         f"-n {client} link set cr{k} up"]
        cmds += self._tunnelled_backends() if self.tunnel else self._bridged_backends()
        cmds += [f"-n {switch} link set br0 up", f"-n {switch} link set lb up",
                 f"-n {client} link set c1 up", f"-n {client} link set c2 up", f"-n {client} link set lo up",
                 f"-n {client} mptcp limits set subflows 4 add_addr_accepted 4",
                 f"-n {lb} link set l1 up", f"-n {lb} link set l2 up", f"-n {lb} link set s0 up",
                 f"-n {lb} link set lo up"]
        for version, prefix in ((4, "/24"), (6, "/64")):
            six = " nodad" if version == 6 else ""  # no duplicate address detection: usable at once
            (c1, c2), (l1, l2) = CLIENT[version], LB_CLIENT_SIDE[version]
            cmds += [f"-n {client} addr add {c1}{prefix} dev c1{six}", f"-n {client} addr add {c2}{prefix} dev c2{six}",
                     f"-n {client} route add default via {l1} dev c1",
                     f"-n {client} route add default via {l2} dev c2 table 102",
                     f"-n {lb} addr add {l1}{prefix} dev l1{six}", f"-n {lb} addr add {l2}{prefix} dev l2{six}",
                     f"-n {lb} addr add {LB_BACKEND_SIDE[version]}{prefix} dev s0{six}"]
        cmds.append(f"-n {client} mptcp endpoint add {CLIENT[4][1]} subflow")  # no dev: answers may come elsewhere
        run_batched(cmds)
        for version in (4, 6):  # `ip rule` takes its family from -4/-6 only, which a batch cannot set
            run(["ip", f"-{version}", "-n", client, "rule", "add", "from", CLIENT[version][1], "table", "102",
                 "priority", "100"])
        for n in self.namespaces:
            self.sysctl(n, "net.mptcp.enabled", 1)
        self.sysctl(lb, "net.ipv4.ip_forward", 1)
        if self.tunnel:
            self.sysctl(self.ns("router"), "net.ipv4.ip_forward", 1)
        self.sysctl(lb, "net.ipv6.conf.all.forwarding", 1)
        if self.direct_return:
            for key, value in DIRECT_RETURN_SYSCTLS.items():
                self.sysctl(lb, key, value)
        self.sysctl(client, "net.ipv4.conf.all.arp_ignore", 1)  # each return port answers for its own address
        for n in [lb, client]:
            self.sysctl(n, "net.ipv4.conf.all.rp_filter", 0)
            self.sysctl(n, "net.ipv4.conf.default.rp_filter", 0)
        for i in range(self.backends):  # as an operator prepares a backend
            run(["ip", "netns", "exec", self.ns(f"b{i + 1}"), "sh", str(BACKEND_SETUP), VIP, VIP6], capture_output=True)
        if self.rate_mbit:
            shaped = [(lb, "l1"), (lb, "l2"), (client, "c1"), (client, "c2")]
            if self.direct_return:
                shaped += [(switch, "cr1"), (switch, "cr2")]
            for ns, dev in shaped:
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{self.rate_mbit}mbit", "burst", "64kb", "latency", "50ms"])

    def _bridged_backends(self) -> list[str]:
        """Backends on the LB's segment (the switch), holding the VIPs (IPVS direct routing)."""
        switch = self.ns("switch")
        cmds = []
        for i in range(self.backends):
            b = self.ns(f"b{i + 1}")
            cmds += [f"link add eth0 netns {b} type veth peer name b{i + 1} netns {switch}",
                     f"-n {switch} link set b{i + 1} master br0", f"-n {switch} link set b{i + 1} up",
                     f"-n {b} addr add {backend_address(i)}/24 dev eth0",
                     f"-n {b} addr add {backend_address(i, 6)}/64 dev eth0 nodad", f"-n {b} link set eth0 up",
                     f"-n {b} link set lo up", f"-n {b} route add default via {LB_BACKEND_SIDE[4]}",
                     f"-n {b} route add default via {LB_BACKEND_SIDE[6]}"]
            if self.direct_return:
                for version in (4, 6):
                    for net, gateway in zip(CLIENT_NETS[version], CLIENT_ON_SWITCH[version]):
                        cmds.append(f"-n {b} route add {net} via {gateway}")
        return cmds

    def _tunnelled_backends(self) -> list[str]:
        """Backends behind a router, each in a subnet of its own, reached through a tunnel whose
        inner address is tunnel_address(i)."""
        lb, router = self.ns("lb"), self.ns("router")
        cmds = [f"link add r0 netns {lb} mtu 1600 type veth peer name rl netns {router} mtu 1600",
                f"-n {lb} addr add {LB_UNDERLAY}/24 dev r0", f"-n {lb} link set r0 up",
                f"-n {lb} route add {BACKEND_UNDERLAY_NET} via {ROUTER_UNDERLAY}",
                f"-n {router} addr add {ROUTER_UNDERLAY}/24 dev rl", f"-n {router} link set rl up",
                f"-n {router} link set lo up"]
        cmds += [f"-n {router} route add {net} via {LB_UNDERLAY}" for net in CLIENT_NETS[4]]
        for i in range(self.backends):
            b, underlay = self.ns(f"b{i + 1}"), underlay_address(i)
            gateway = underlay.rsplit(".", 1)[0] + ".1"
            device = ("type vxlan id {} remote {} dstport 4789".format(tunnel_vni(i), LB_UNDERLAY)
                      if self.tunnel == "vxlan" else f"type ipip remote {LB_UNDERLAY}")
            cmds += [f"link add eth0 netns {b} mtu 1600 type veth peer name b{i + 1} netns {router} mtu 1600",
                     f"-n {router} addr add {gateway}/24 dev b{i + 1}", f"-n {router} link set b{i + 1} up",
                     f"-n {b} addr add {underlay}/24 dev eth0", f"-n {b} link set eth0 up", f"-n {b} link set lo up",
                     f"-n {b} route add default via {gateway}",
                     f"-n {b} link add tun0 {device}", f"-n {b} addr add {tunnel_address(i)}/24 dev tun0",
                     f"-n {b} link set tun0 up"]
        return cmds

    @staticmethod
    def sysctl(ns: str, key: str, value) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"])

    def destroy(self) -> None:
        if not self.built:
            return
        for n in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        self.built = False

    def exec(self, role: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.ns(role), *cmd], **kwargs)

    def popen(self, role: str, *cmd: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(role), *cmd], **kwargs)

    def python(self, role: str, module: str, *args: str, **kwargs) -> subprocess.Popen:
        return self.popen(role, sys.executable, "-m", module, *args, **kwargs)

    def dual_stack_paths(self, on: bool = True) -> None:
        """Dual stack: no subflow endpoint of the client's own; the backends announce the IPv6 VIP
        (ADD_ADDR), and the client reaches it over path 2 from an IPv6 address. on=False undoes it."""
        self.subflow_endpoint(not on)
        for name in self.backend_names:
            self.exec(name, "ip", "mptcp", "endpoint", *(("add", VIP6, "signal") if on else ("flush",)))
        if on:
            self.exec("client", "ip", "addr", "add", f"{DUAL_STACK_V6}/64", "dev", "c2", "nodad")
            self.exec("client", "ip", "route", "add", VIP6, "via", LB_CLIENT_SIDE[6][1], "dev", "c2",
                      "src", DUAL_STACK_V6)
        else:
            self.exec("client", "ip", "route", "del", VIP6)
            self.exec("client", "ip", "addr", "del", f"{DUAL_STACK_V6}/64", "dev", "c2")

    def subflow_endpoint(self, present: bool, version: int = 4) -> None:
        """Add or remove the client's second address as a subflow endpoint: adding it makes the
        client's path manager open a subflow on every MPTCP connection, the open ones included."""
        self.exec("client", "ip", "mptcp", "endpoint", "flush")
        if present:
            self.exec("client", "ip", "mptcp", "endpoint", "add", CLIENT[version][1], "subflow")

    def announce_join_ports(self, base: int, client_accepts: int = 4) -> None:
        """joins = "announced-port": backend i announces VIP:base + i (deploy/backend-setup.sh
        --join-port, the C flag set); the client accepts that many ADD_ADDRs and opens its joins
        there from its second address (fullmesh: from every address it has)."""
        for i in range(self.backends):
            run(["ip", "netns", "exec", self.ns(f"b{i + 1}"), "sh", str(BACKEND_SETUP), "--join-port",
                 str(base + i), VIP, VIP6], capture_output=True)
        self.exec("client", "ip", "mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", str(client_accepts))
        self.exec("client", "ip", "mptcp", "endpoint", "flush")
        self.exec("client", "ip", "mptcp", "endpoint", "add", self.client_addresses[1], "subflow", "fullmesh")

    def nstat(self, role: str) -> dict[str, int]:
        """The MPTCP counters of one namespace (absolute values, no shared history file)."""
        out = self.exec(role, "nstat", "-asz", env={**os.environ, "NSTAT_HISTORY": "/dev/null"},
                        capture_output=True, text=True).stdout
        return {m[0]: int(m[1]) for m in re.findall(r"^(MPTcpExt\w+)\s+(\d+)", out, re.M)}


def until(condition, seconds: float, failure: str) -> None:
    """Until condition() holds; RuntimeError after `seconds` ("<failure> within N s")."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{failure} within {seconds:g} s")
        time.sleep(0.05)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    if "input" in kwargs or "capture_output" in kwargs:
        kwargs.setdefault("text", True)
    try:
        return subprocess.run(cmd, **kwargs)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(e.stderr or '').strip()}") from None


def run_batched(cmds: list[str]) -> None:
    """`ip` commands, those prefixed `-n NS` in that namespace: one `ip -batch` per namespace, the
    root namespace's first (it creates the others)."""
    batches: dict[str | None, list[str]] = {}
    for cmd in cmds:
        ns, _, rest = cmd[3:].partition(" ") if cmd.startswith("-n ") else (None, "", cmd)
        batches.setdefault(ns, []).append(rest)
    for ns, lines in batches.items():
        run(["ip", *(["-n", ns] if ns else []), "-batch", "-"], input="\n".join(lines) + "\n")


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("mplb")]
