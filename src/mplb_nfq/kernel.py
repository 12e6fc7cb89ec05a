"""Kernel adapters: the nftables ruleset and token map, the xtables queue rule, policy routing.

They translate the config and the core's decisions into kernel state and hold no policy.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from .balancer import BACKEND_MASK, JOIN, LEARNED, QUEUE, REJECT
from .config import BackendConfig, Config

log = logging.getLogger("mplb_nfq.kernel")
NFT_DIR = Path(__file__).resolve().parent / "nft"
XT_COMMENT = "mplb-nfq"
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
VXLAN_PORT = 4789


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

    def try_terse(self, commands: str) -> str | None:
        """The listing without set and map elements (the token map may be large); None on error."""
        self._nft.set_terse_output(True)
        try:
            rc, out, _ = self._nft.cmd(commands)
        finally:
            self._nft.set_terse_output(False)
        return out if rc == 0 else None


def nft_counters(nft: Nft, table: str) -> dict[str, int]:
    """The packet counts of the table's named counters."""
    data = nft.json(f"list counters table inet {table}")
    return {c["counter"]["name"]: c["counter"]["packets"] for c in data.get("nftables", []) if "counter" in c}


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
        queues = f"{cfg.queue}-{cfg.queue + cfg.workers - 1}" if cfg.workers > 1 else str(cfg.queue)
        return f"queue num {queues} bypass"  # several queues: a hash of the addresses picks one
    return f"meta mark set meta mark | 0x{QUEUE:08x}"


WORKER_COMMENT = "mplb-nfq: installed by the worker, removed when it stops"
OPERATOR_COMMENT = "mplb-nfq: installed by the operator, the worker only fills it"


def vip_elements(cfg: Config, version: int, direct_return_only: bool = False) -> list[str]:
    return [f"{vip} . {port}" for s in cfg.services for vip in s.vips for port in s.ports
            if ipaddress.ip_address(vip).version == version and (s.direct_return or not direct_return_only)]


def render_ruleset(cfg: Config, native: bool, by_worker: bool = False) -> str:
    template = Template((NFT_DIR / "mplb.nft").read_text())

    def elements(version: int, direct_return_only: bool = False) -> str:
        found = vip_elements(cfg, version, direct_return_only)
        return "elements = { " + ", ".join(found) + " }" if found else ""

    return template.substitute(
        table=cfg.table_name, comment=WORKER_COMMENT if by_worker else OPERATOR_COMMENT,
        vip4_elements=elements(4), vip6_elements=elements(6), dsr4_elements=elements(4, True),
        dsr6_elements=elements(6, True),
        token_capacity=cfg.token_capacity, learned=f"0x{LEARNED:08x}", settled=f"0x{LEARNED | JOIN:08x}",
        reject=f"0x{REJECT:08x}",
        queue_bit=f"0x{QUEUE:08x}", keep_mask=f"0x{0xFFFFFFFF & ~QUEUE:08x}",
        queue_statement=queue_statement(cfg, native))


def xtables_rule(cfg: Config) -> list[str]:
    """The NFQUEUE rule, for iptables and ip6tables alike."""
    return ["-t", "mangle", "PREROUTING", "-m", "mark", "--mark", f"0x{QUEUE:x}/0x{QUEUE:x}",
            "-m", "comment", "--comment", XT_COMMENT,
            "-j", "NFQUEUE", *(["--queue-balance", f"{cfg.queue}:{cfg.queue + cfg.workers - 1}"] if cfg.workers > 1
                               else ["--queue-num", str(cfg.queue)]), "--queue-bypass"]


def iptables_binary(version: int) -> str:
    name = "ip6tables" if version == 6 else "iptables"
    for candidate in (f"{name}-nft", name, f"{name}-legacy"):
        if shutil.which(candidate):
            return candidate
    raise KernelError(f"{name} not found: the xtables NFQUEUE fallback needs it (apt install iptables)")


NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, SOL_NETLINK, NETLINK_CAP_ACK = 12, 10, 1, 270, 10
NLMSG_ERROR, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFT_MSG_NEWSETELEM = 2, 16, 17, 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLA_F_NESTED = 1, 4, 0x400, 0x8000
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port


def _attribute(kind: int, *payload: bytes) -> bytes:
    data = b"".join(payload)
    return struct.pack("=HH", 4 + len(data), kind) + data + bytes(-len(data) % 4)


def _nfnetlink(kind: int, flags: int, seq: int, family: int, body: bytes = b"", res_id: int = 0) -> bytes:
    header = NLMSG_HEADER.pack(20 + len(body), kind, flags, seq, 0)
    return header + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body


# One element of the token map as NFT_MSG_NEWSETELEM carries it, 40 bytes, packed in one go (the
# generic attribute helpers took 20 µs a token): a list element nesting the key (the token's four
# bytes, as on the wire), the data (the mark, host order) and the timeout (ms, big endian).
SET_ELEMENT = struct.Struct("=HHHHHH4sHHHHIHH8s")


def token_batch(table: str, tokens: list[tuple[int, int]], timeout: int, seq: int) -> bytes:
    """One nf_tables transaction (messages seq to seq + 2) adding token -> mark to the table's
    token map. The add message (seq + 1) asks for an acknowledgement."""
    expires = struct.pack("!Q", timeout * 1000)
    elements = b"".join([SET_ELEMENT.pack(40, 1 | NLA_F_NESTED, 12, 1 | NLA_F_NESTED, 8, 1, token.to_bytes(4, "big"),
                                          12, 2 | NLA_F_NESTED, 8, 1, mark, 12, 4, expires) for token, mark in tokens])
    body = (_attribute(1, table.encode(), b"\0") + _attribute(2, b"tokens\0")
            + struct.pack("=HH", 4 + len(elements), 3 | NLA_F_NESTED) + elements)
    return (_nfnetlink(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, res_id=NFNL_SUBSYS_NFTABLES)
            + _nfnetlink(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
                         seq + 1, NFPROTO_INET, body)
            + _nfnetlink(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 2, 0, res_id=NFNL_SUBSYS_NFTABLES))


class TokenMapSocket:
    """Adds tokens to the kernel map over nfnetlink: a batch of 1, 10 or 100 tokens costs 20-30,
    35 or 200 µs, against libnftables' 170, 240 or 1,000 µs (it parses text and fetches its cache
    for each call). Created in the process, and the network namespace, that uses it."""

    CHUNK = 1024  # tokens per transaction: one message stays far below the socket's buffer

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # an error quotes the header only, not the batch
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.seq = 0

    def add(self, table: str, tokens: list[tuple[int, int]], timeout: int) -> list[int]:
        """Add token -> mark; the tokens the map holds already with another mark are refused, and
        returned. Each chunk is one transaction, all of it added or none: when one is refused, the
        chunk's tokens are added again one by one, so that the others still go in."""
        refused = []
        for start in range(0, len(tokens), self.CHUNK):
            chunk = tokens[start:start + self.CHUNK]
            if self._transaction(table, chunk, timeout) == errno.EEXIST:
                refused += [token for token, mark in chunk
                            if self._transaction(table, [(token, mark)], timeout) == errno.EEXIST]
        return refused

    def _transaction(self, table: str, tokens: list[tuple[int, int]], timeout: int) -> int:
        """0, or EEXIST (a token held with another mark); any other error raises KernelError."""
        self.seq += 3
        self.sock.send(token_batch(table, tokens, timeout, self.seq))
        error = self._acknowledgement(self.seq + 1)
        if error not in (0, errno.EEXIST):
            raise KernelError(f"adding {len(tokens)} tokens to the map: {os.strerror(error)}")
        return error

    def _acknowledgement(self, seq: int) -> int:
        """The errno the kernel answered message seq with (0: done)."""
        while True:
            reply = self.sock.recv(4096)
            offset = 0
            while offset + NLMSG_HEADER.size <= len(reply):
                length, kind, _, answered, _ = NLMSG_HEADER.unpack_from(reply, offset)
                if kind == NLMSG_ERROR and answered == seq:
                    return -struct.unpack_from("=i", reply, offset + NLMSG_HEADER.size)[0]
                offset += max(length + (-length % 4), NLMSG_HEADER.size)

    def close(self) -> None:
        self.sock.close()


def families(cfg: Config) -> set[int]:
    return {ipaddress.ip_address(vip).version for vip in cfg.vips}


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


def routing_plan(cfg: Config, retired: list[tuple[BackendConfig, list[str]]] = ()) -> tuple[list[dict], list[dict]]:
    """The routes and rules of a config: per backend a table routing each of its VIPs to it and a
    fwmark rule (a tunnelled backend also gets a host route to its inner address, for its health
    checks); per VIP a fail-open multipath route. Retired backends (gone from the config,
    connections still open) keep theirs."""
    members = [(b, [vip for s in cfg.services if b.name in s.backends for vip in s.vips]) for b in cfg.backends]
    routes, rules = [], []
    for b, vips in members + list(retired):
        for version in sorted({ipaddress.ip_address(v).version for v in vips}):
            routes += [dict(dst=_host(v), table=b.table, family=_af(version), **_hop(b, version))
                       for v in vips if ipaddress.ip_address(v).version == version]
            rules.append(dict(family=_af(version), table=b.table, priority=cfg.rule_priority, fwmark=b.mark,
                              fwmask=BACKEND_MASK))
        if b.device:
            routes += [dict(dst=_host(a), table=MAIN_TABLE, family=_af(ipaddress.ip_address(a).version), dev=b.device)
                       for a in b.addresses]
    by_name = {b.name: b for b in cfg.backends}
    for s in cfg.services:
        for vip in s.vips:
            version = ipaddress.ip_address(vip).version
            # Fail open: a packet the worker never marked still reaches a backend, by a stateless
            # hash of its addresses and ports, as a plain L4 balancer would.
            routes.append(dict(dst=_host(vip), table=cfg.fallback_table, family=_af(version),
                               multipath=[_hop(by_name[n], version) for n in s.backends]))
            rules.append(dict(family=_af(version), table=cfg.fallback_table, priority=cfg.rule_priority + 1,
                              dst=vip, dst_len=128 if version == 6 else 32))
    return routes, rules


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


@dataclass
class Dataplane:
    """The kernel objects of one config: the nft table, the xtables queue rule, routes and rules.

    All of them are named by the config (table name, queue number, marks, tables, rule priority),
    so `remove` takes away exactly mplb-nfq's own objects, also those a killed worker left behind.
    A table that the operator installed (from `render-nft`) is filled, never deleted.
    """

    cfg: Config
    nft: Nft = field(default_factory=Nft)
    token_map: TokenMapSocket = field(default_factory=TokenMapSocket)
    native_queue: bool = False
    table_owner: str = "worker"
    routes: list[dict] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)
    tunnels: set[str] = field(default_factory=set)  # device names

    @property
    def queue_mode(self) -> str:
        return "native nft queue" if self.native_queue else "xtables NFQUEUE on mark bit"

    def install(self) -> None:
        cfg = self.cfg
        native = {"auto": None, "native": True, "xtables": False}[cfg.queue_mode]
        self.native_queue = native_queue_supported(self.nft) if native is None else native
        listing = self._table_listing()
        if listing is None:
            self.nft.run(render_ruleset(cfg, self.native_queue, by_worker=True))
        else:
            self.table_owner = "worker" if WORKER_COMMENT in listing else "operator"
            log.info("nft table inet %s exists (%s's): adopting it with its token map", cfg.table_name,
                     self.table_owner)
            self.sync_vips(cfg)
        if not self.native_queue:
            for version in families(cfg):
                self._xtables(version, "-C") or self._xtables(version, "-A", check=True)
        self.sync_tunnels(cfg)
        self.sync_routing(cfg)
        log.info("queue %d, mode: %s", cfg.queue, self.queue_mode)

    def _table_listing(self) -> str | None:
        return self.nft.try_terse(f"list table inet {self.cfg.table_name}")

    def _xtables(self, version: int, action: str, check: bool = False) -> bool:
        binary = iptables_binary(version)
        rule = xtables_rule(self.cfg)
        done = subprocess.run([binary, *rule[:2], action, *rule[2:]], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise KernelError(f"{binary} {action}: {done.stderr.strip()}")
        return done.returncode == 0

    def sync_vips(self, cfg: Config) -> None:
        """Make the VIP sets hold exactly the config's VIP . port pairs (add first, then delete)."""
        table = cfg.table_name
        for version, name, direct_only in ((4, "vip4", False), (6, "vip6", False), (4, "dsr4", True),
                                           (6, "dsr6", True)):
            wanted = set(vip_elements(cfg, version, direct_only))
            current = set()
            for item in self.nft.json(f"list set inet {table} {name}").get("nftables", []):
                for element in item.get("set", {}).get("elem", []):
                    addr, port = element["concat"]
                    current.add(f"{addr} . {port}")
            if wanted - current:
                self.nft.run(f"add element inet {table} {name} {{ {', '.join(sorted(wanted - current))} }}")
            if current - wanted:
                self.nft.run(f"delete element inet {table} {name} {{ {', '.join(sorted(current - wanted))} }}")
        self.cfg = cfg

    def sync_tunnels(self, cfg: Config, retired: list[tuple[BackendConfig, list[str]]] = ()) -> None:
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

    def sync_routing(self, cfg: Config, retired: list[tuple[BackendConfig, list[str]]] = ()) -> None:
        """Install the routes and rules of `cfg` (and of retired backends), remove those no longer wanted."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        routes, rules = routing_plan(cfg, retired)
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
        self.routes, self.rules, self.cfg = routes, rules, cfg

    def reopen(self) -> None:
        """In a forked worker: netlink sockets of its own (a shared one mixes up the answers)."""
        self.nft, self.token_map = Nft(), TokenMapSocket()

    def add_tokens(self, tokens: list[tuple[int, int]]) -> list[int]:
        """Install token -> backend mark in the kernel map, in one transaction; the tokens the map
        holds already with another mark (another worker's connection) are refused, and returned."""
        return self.token_map.add(self.cfg.table_name, tokens, self.cfg.token_timeout)

    def lookup_token(self, token: int) -> int | None:
        """The mark the kernel map holds for a token, if it holds it (another worker learned it)."""
        try:  # nft 1.0.6 answers `get element` in its text form only, JSON or not
            listing = self.nft.run(f"get element inet {self.cfg.table_name} tokens {{ 0x{token:08x} }}")
        except KernelError:
            return None  # not (yet) there
        found = re.search(r"elements = \{[^}]*:\s*(0x[0-9a-f]+)", listing)
        return int(found.group(1), 16) if found else None

    def reject_tokens(self, tokens: list[int]) -> None:
        """Colliding tokens: the kernel map answers their joins with a TCP reset, whichever worker
        learned what (the rare case, through libnftables, one by one)."""
        table, timeout = self.cfg.table_name, self.cfg.token_timeout
        for t in tokens:
            self.nft.try_run(f"delete element inet {table} tokens {{ 0x{t:08x} }}")  # absent: learned in this batch
            self.nft.run(f"add element inet {table} tokens {{ 0x{t:08x} timeout {timeout}s : 0x{REJECT:08x} }}")

    def read_tokens(self) -> list[tuple[int, int, float]]:
        """(token, mark, seconds left) of every element of the kernel token map."""
        data = self.nft.json(f"list map inet {self.cfg.table_name} tokens")
        found = []
        for item in data.get("nftables", []):
            for key, mark in item.get("map", {}).get("elem", []):
                element = key["elem"] if isinstance(key, dict) else {"val": key}
                found.append((int(element["val"]), int(mark), float(element.get("expires", self.cfg.token_timeout))))
        return found

    def remove(self) -> None:
        from pyroute2 import IPRoute

        routes, rules = routing_plan(self.cfg)
        with IPRoute() as ipr:
            for rule in self.rules + rules:
                while _quietly(ipr.rule, "del", **rule):  # a rule added twice would leave a copy behind
                    pass
            for route in self.routes + routes:
                _quietly(ipr.route, "del", **_identity(route))
            for name in self.tunnels | {b.device for b in self.cfg.backends if b.device}:
                for index in ipr.link_lookup(ifname=name):
                    _quietly(ipr.link, "del", index=index)
        self.routes, self.rules, self.tunnels = [], [], set()
        for version in (4, 6):
            try:
                while self._xtables(version, "-D"):
                    pass
            except KernelError:
                continue  # no iptables binary: no rule of ours either
            family = "ip6" if version == 6 else "ip"
            if self.nft.try_run(f"list table {family} mangle"):
                mangle = self.nft.json(f"list table {family} mangle")
                if not any("rule" in item for item in mangle.get("nftables", [])):
                    self.nft.try_run(f"delete table {family} mangle")  # iptables-nft made it for our rule alone
        listing = self._table_listing()
        if listing is not None and WORKER_COMMENT in listing:  # never the one an operator installed
            self.nft.try_run(f"delete table inet {self.cfg.table_name}")


def _quietly(call, *args, **kwargs) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call(*args, **kwargs)
        return True
    except NetlinkError:
        return False
