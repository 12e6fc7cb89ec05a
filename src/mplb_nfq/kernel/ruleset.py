"""The nftables ruleset: rendered from nft/mplb.nft and the config (pure), loaded, adopted,
kept in step with the config's VIPs, removed; and the xtables NFQUEUE rule where the kernel has
no nft queue statement."""
from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import subprocess
from pathlib import Path
from string import Template
from typing import Container, Mapping, NamedTuple

from ..core.balancer import VIRTUAL, LookupTable
from ..core.jhash import SEED, flow_key, slot
from ..core.marks import BACKEND_MASK, CLOSING_LABEL, JOIN, LEARNED, PROVISIONAL, QUEUE, REJECT
from ..core.packet import TCP_ACK, TCP_SYN, Segment
from ..core.schedulers import Index
from ..core.settings import Config
from .nft import KernelError, Nft, native_queue_supported
from .tokenmap import Outline, SchedulerMaps, TableReader

log = logging.getLogger("mplb_nfq.kernel")
NFT_DIR = Path(__file__).resolve().parent.parent / "nft"
XT_COMMENT = "mplb-nfq"
JOIN_RATE = 16  # joins a second, and as many at once, the token map steers with one token
COPY_SNAPLEN = 256  # an IPv6 header, extension headers, and a TCP header with 40 bytes of options
AFFINITY_SIZE = 1_000_000  # clients remembered per service and family (persistence)


def queue_statement(cfg: Config, native: bool) -> str:
    if native:
        queues = f"{cfg.queue}-{cfg.queue + cfg.workers - 1}" if cfg.workers > 1 else str(cfg.queue)
        return f"queue num {queues} bypass"  # several queues: a hash of the addresses picks one
    return f"meta mark set meta mark | 0x{QUEUE:08x}"


WORKER_COMMENT = "mplb-nfq: installed by the worker, removed when it stops"
OPERATOR_COMMENT = "mplb-nfq: installed by the operator, the worker only fills it"


def vip_elements(cfg: Config, version: int, direct_return_only: bool = False) -> list[str]:
    """The VIP . port pairs the ruleset handles: the services' ports and their backends' join ports."""
    return [f"{vip} . {port}" for s in cfg.services for vip in s.vips
            for port in (*s.ports, *cfg.join_ports(s).values())
            if ipaddress.ip_address(vip).version == version and (s.direct_return or not direct_return_only)]


def join_port_elements(cfg: Config) -> list[tuple[int, str]]:
    """(IP version, `VIP . join port : mark`) of each backend's join port (joins = "announced-port"):
    a join there is the backend's, settled at once, in the kernel."""
    marks = {b.name: b.mark for b in cfg.backends}
    return [(ipaddress.ip_address(vip).version, f"{vip} . {port} : 0x{marks[name] | JOIN | LEARNED:08x}")
            for s in cfg.services for vip in s.vips for name, port in cfg.join_ports(s).items()]


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
        closing_label=CLOSING_LABEL,
        join=f"0x{JOIN:08x}", join_rate=JOIN_RATE,
        backend_mask=f"0x{BACKEND_MASK:08x}",
        reject=f"0x{REJECT:08x}",
        queue_bit=f"0x{QUEUE:08x}", keep_mask=f"0x{0xFFFFFFFF & ~QUEUE:08x}",
        queue_statement=queue_statement(cfg, native), join_flow_timeout=cfg.flow_timeout,
        join_flow_key6=f"jhash ip6 saddr . tcp sport . ip6 daddr . tcp dport mod 4294967291 seed 0x{SEED:08x}",
        join_copy=f"tcp flags & (syn | ack) == syn meta mark & 0x{JOIN:08x} != 0 tcp option mptcp subtype 1 "
                  f"{copy_statement(cfg)} counter name copied_join" if cfg.cluster else "",
        **handshake_rules(cfg))


def copy_statement(cfg: Config) -> str:
    return f"log group {cfg.queue} snaplen {COPY_SNAPLEN}"


def handshake_rules(cfg: Config) -> dict[str, str]:
    """The classify rules that differ between the two ways of taking a handshake."""
    learned = f"0x{LEARNED:08x}"
    capable = "tcp flags & (syn | ack) == ack"
    # a provisional token's proof, once: queued where its third ACK was (the same worker), else copied
    proof = f"ct mark & 0x{PROVISIONAL:08x} != 0 tcp option mptcp subtype 2 ct mark set ct mark & " \
            f"0x{0xFFFFFFFF & ~PROVISIONAL:08x} "
    if cfg.handshakes == "queue":
        return dict(
            proof=f"{proof}counter name queued_proof goto to_queue",
            decide="",
            capable=f"{capable} ct mark & {learned} == 0 tcp option mptcp subtype 0 counter name queued_capable "
                    "goto to_queue",
            synack=f"tcp flags & (syn | ack) == syn | ack ct mark & {learned} == 0 tcp option mptcp subtype 0 "
                   "meta mark set ct mark counter name queued_synack goto to_queue")
    decide = "\n\t\t".join(f"meta mark == 0 tcp flags & (syn | ack) == {flags} meta nfproto {family} "
                             f"{address} daddr . tcp dport vmap @decide{version}"
                             for flags in ("syn", "ack ct state new")
                             for family, address, version in (("ipv4", "ip", 4), ("ipv6", "ip6", 6)))
    return dict(
        proof=f"{proof}{copy_statement(cfg)} counter name copied_proof",
        decide=decide,
        capable=f"{capable} meta mark & {learned} == 0 meta mark & 0x{BACKEND_MASK:08x} != 0 tcp option mptcp "
                f"subtype 0 {copy_statement(cfg)} counter name copied_capable "
                f"meta mark set meta mark | 0x{LEARNED | PROVISIONAL:08x}",
        synack=f"tcp flags & (syn | ack) == syn | ack ct mark & {learned} == 0 tcp option mptcp subtype 0 "
               f"meta mark set ct mark {copy_statement(cfg)} counter name copied_synack "
               f"ct mark set ct mark | {learned} meta mark set 0\n\t\t"
               # a server that answers an MP_CAPABLE SYN in plain TCP: nothing to learn, settled
               f"tcp flags & (syn | ack) == syn | ack ct mark & {learned} == 0 ct mark & 0x{BACKEND_MASK:08x} != 0 "
               f"ct mark set ct mark | {learned}")


def _index(table: LookupTable, version: int) -> str:
    address = "ip6" if version == 6 else "ip"
    size = len(table.slots)
    if table.index is Index.COUNTER:
        return f"numgen inc mod {size}"
    key = f"{address} saddr" if table.index is Index.SOURCE else \
        f"{address} saddr . tcp sport . {address} daddr . tcp dport"
    return f"jhash {key} mod {size} seed 0x{SEED:08x}"


def service_rules(service, table: LookupTable) -> list[str]:
    """The rules of a service's chain: its SYN's backend from its table, in the kernel. With
    affinity, a client's last backend comes first: a set of clients per backend, whose entries
    time out, consulted only for the backends in the table (those that take new connections)."""
    syn, ack = "tcp flags & (syn | ack) == syn", "tcp flags & (syn | ack) == ack"
    # a raced join is queued with JOIN and no backend: should the queue be bypassed, routing drops it
    rules = [f"{syn} tcp option mptcp subtype 1 meta mark set 0x{JOIN:08x} counter name queued_join goto to_queue"] \
        if service.mptcp_aware else []
    if table.index is Index.WORKER:
        return rules  # back in classify, the SYN is queued
    rules.append(f"{ack} tcp option mptcp subtype 1 return")  # a join's first ACK (direct return): the worker's
    if table.index is Index.COUNTER:
        rules.append(f"{ack} return")  # mid-stream: no counter can tell what the SYN got
    unset = ""
    members = sorted({mark for mark in table.marks() if mark & BACKEND_MASK}) if table.affinity else []
    for mark in members:  # a client's last backend first, from its set (only those available have one here)
        rules += [f"{address} saddr @{affinity_set(service.name, version, mark)} meta mark set 0x{mark:x}"
                  for address, version in (("ip", 4), ("ip6", 6))]
    if members:
        unset = "meta mark == 0 "
    indexes = [_index(table, 4)] if table.index is Index.COUNTER else [_index(table, 4), _index(table, 6)]
    via = f" meta mark set meta mark map @via_{service.name}" if table.via else ""
    rules += [f"{unset}meta mark set {index} map @sched_{service.name}{via} counter name decided" for index in indexes]
    for mark in members:
        rules += [f"meta mark & 0x{BACKEND_MASK:08x} == 0x{mark:x} update @{affinity_set(service.name, version, mark)} "
                  f"{{ {address} saddr timeout {table.affinity}s }}" for address, version in (("ip", 4), ("ip6", 6))]
    if service.mptcp_aware:
        rules.append("tcp option mptcp subtype 0 return")  # its token is yet to learn
    rules.append(f"meta mark set meta mark | 0x{LEARNED:08x}")
    return rules


def affinity_set(service: str, version: int, mark: int) -> str:
    """The clients a backend (by its mark) took last, per service and family. A set per backend,
    not one map: an element's backend cannot be changed by a rule (an update keeps the old
    value), and a backend that goes is forgotten by flushing its sets, with nothing listed."""
    return f"affinity{version}_{mark:x}_{service}"


def affinity_sets(cfg: Config, tables: Mapping[str, LookupTable]) -> dict[str, str]:
    """set name -> its element type, for every persistent service's backends in `tables`."""
    marks = {b.name: b.mark for b in cfg.backends}
    return {affinity_set(s.name, version, marks[b]): kind for s in cfg.services
            if s.name in tables and tables[s.name].affinity
            for b in s.backends for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr"))}


def scheduler_maps(table: str, name: str) -> list[str]:
    """A service's table (slot -> mark, or to a virtual backend's number) and its virtual
    backends' (number -> mark; empty but for Maglev)."""
    return [f"add map {table} sched_{name} {{ typeof numgen inc mod 2 : meta mark ; }}",
            f"add map {table} via_{name} {{ typeof meta mark : meta mark ; }}"]


def render_decide(cfg: Config, tables: Mapping[str, LookupTable], gone: Container[str] = (),
                  gone_affinity: Mapping[str, str] | None = None) -> str:
    """nft commands, one transaction, that (re)write the chains and tables of the services in
    `tables`, point each VIP . port at its service's chain, and delete the services `gone` and
    the affinity sets (or maps) in `gone_affinity` (name -> "set" or "map")."""
    table = f"inet {cfg.table_name}"
    commands = []
    by_name = {s.name: s for s in cfg.services}
    for name, lookup in tables.items():
        commands += scheduler_maps(table, name)
        for kind, values, first in (("sched", lookup.slots, 0), ("via", lookup.via, VIRTUAL)):
            commands.append(f"flush map {table} {kind}_{name}")
            if values:
                elements = ", ".join(f"0x{first | i:x} : 0x{mark:x}" for i, mark in enumerate(values))
                commands.append(f"add element {table} {kind}_{name} {{ {elements} }}")
        # kept across rewrites: clients keep their backends
        commands += [f"add set {table} {s} {{ type {kind} ; flags dynamic, timeout ; size {AFFINITY_SIZE} ; }}"
                     for s, kind in affinity_sets(cfg, {name: lookup}).items()]
        commands += [f"add chain {table} svc_{name}", f"flush chain {table} svc_{name}"]
        commands += [f"add rule {table} svc_{name} {rule}" for rule in service_rules(by_name[name], lookup)]
    for version in (4, 6):
        for name, found in ((f"decide{version}", decide_elements(cfg)), (f"joinports{version}", join_port_elements(cfg))):
            commands.append(f"flush map {table} {name}")
            elements = [e for v, e in found if v == version]
            if elements:
                commands.append(f"add element {table} {name} {{ {', '.join(elements)} }}")
    for name in gone:  # (added first: a table of a version before has no via map)
        commands += [f"delete chain {table} svc_{name}"] + scheduler_maps(table, name) + \
            [f"delete map {table} sched_{name}", f"delete map {table} via_{name}"]
    for name, kind in (gone_affinity or {}).items():
        commands.append(f"delete {kind} {table} {name}")
    return "\n".join(commands) + "\n"


def decide_elements(cfg: Config) -> list[tuple[int, str]]:
    """(IP version, `VIP . port : jump svc_NAME`) of every service the kernel decides for."""
    if cfg.handshakes != "kernel":
        return []
    return [(ipaddress.ip_address(vip).version, f"{vip} . {port} : jump svc_{s.name}")
            for s in cfg.services for vip in s.vips for port in s.ports]


def named(outline: Outline, prefix: str) -> set[str]:
    """The services that have a chain `prefix` + NAME in a table (svc_)."""
    return {name[len(prefix):] for name in outline.chains if name.startswith(prefix)}


def unwanted_affinity(outline: Outline, cfg: Config, tables: Mapping[str, LookupTable]) -> dict[str, str]:
    """The affinity sets a table holds that the config has no use for (a service gone or
    persistent no more, a backend gone), and the one maps of versions before: name -> kind."""
    wanted = affinity_sets(cfg, tables)
    return {name: kind for name, kind in outline.sets.items()
            if re.fullmatch(r"affinity[46]_\S+", name) and name not in wanted}


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


class Classified(NamedTuple):
    mark: int  # the packet's mark when it leaves the classify chain
    queued: str | None  # the counter of the rule that sends it to the worker; None: it stays in the kernel
    kernel_hit: bool = False  # a MP_JOIN SYN the token map steered
    copied: str | None = None  # the counter of the rule that copies it to the worker (it goes on)
    decided: bool = False  # its service's table gave it a backend (counter `decided`)
    # the first packet of a join's flow, found in a map of flows: subflow_shared (a cluster peer
    # steered it) or join_first_ack (its SYN, steered by the token map under DSR, left it there)
    flow_map: str | None = None


class Decider(NamedTuple):
    """A service as its chain decides a SYN in the kernel (handshakes = "kernel")."""
    table: LookupTable
    mptcp_aware: bool


def nft_mptcp_option(options: bytes) -> tuple[int | None, int | None]:
    """(subtype, bytes 4-7) of the first MPTCP option as nftables finds it: it steps over EOL and
    NOP one byte at a time and goes on scanning (Linux's stack stops at EOL), and reads a field
    only where the option is long enough to hold it."""
    i = 0
    while i < len(options) - 1:
        kind, length = options[i], options[i + 1]
        step = 1 if kind <= 1 or length == 0 else length
        if kind == 30:
            if i + step > len(options):
                return None, None
            subtype = options[i + 2] >> 4 if step >= 3 else None
            token = int.from_bytes(options[i + 4:i + 8], "big") if step >= 8 else None
            return subtype, token
        i += step
    return None, None


def classify(segment: Segment, ct_mark: int, original: bool, new: bool, vips: Container[tuple[bytes, int]],
             token_map: Mapping[int, int], unavailable: Container[int] = (),
             deciders: Mapping[tuple[bytes, int], Decider] | None = None, turn: int = 0,
             join_ports: Mapping[tuple[bytes, int], int] | None = None,
             subflows: Mapping[tuple, int] | None = None, join_flows: Mapping[tuple, int] | None = None) -> Classified:
    """What nft/mplb.nft's classify chain, its handshake chains and the services' chains do to one
    TCP segment, given its flow's conntrack state: the model `inspect` replays. deciders: each
    VIP . port's service (handshakes = "kernel"; None: "queue"); turn: the next number of a
    service's counter; join_ports: VIP . join port -> its backend's mark; subflows: join subflows a
    cluster peer steered (client, port, VIP, port) -> their mark; join_flows: those the token map
    steered while untracked (direct server return: a join's SYN leaves its flow there for its
    first ACK, which carries no token). A kernel test sends
    packets through the real ruleset and holds this function to its counters, rule by rule."""
    handshake = segment.flags & (TCP_SYN | TCP_ACK)
    subtype, token = nft_mptcp_option(segment.options)
    if (segment.dst, segment.dport) in vips:
        mark = ct_mark if original and ct_mark else 0
        if ct_mark & PROVISIONAL and subtype == 2:  # the connection's next MPTCP packet: its token is proven
            return Classified(mark, "queued_proof") if deciders is None else \
                Classified(mark, None, copied="copied_proof")
        if ct_mark & (LEARNED | JOIN):
            return Classified(mark, None)
        if join_ports and (segment.dst, segment.dport) in join_ports:
            return Classified(join_ports[segment.dst, segment.dport], None)
        if subflows and handshake == TCP_ACK and new and segment.flow in subflows:
            return Classified(subflows[segment.flow], None, flow_map="subflow_shared")
        if join_flows and handshake == TCP_ACK and new and subtype == 1 and segment.flow in join_flows:
            return Classified(join_flows[segment.flow], None, flow_map="join_first_ack")
        hit = False
        if handshake == TCP_SYN and not mark and subtype == 1 and token is not None:
            found = token_map.get(token)
            if found is not None:
                mark, hit = found, True
        if handshake == TCP_SYN and mark & BACKEND_MASK in unavailable and mark & BACKEND_MASK:
            return Classified(0, "queued_join_unavailable")
        decider = None if deciders is None else deciders.get((segment.dst, segment.dport))
        if decider and not mark and (handshake == TCP_SYN or handshake == TCP_ACK and new):
            if handshake == TCP_SYN and decider.mptcp_aware and subtype == 1:
                return Classified(JOIN, "queued_join")
            mark = _decide(segment, decider, subtype, turn)
            decided = bool(mark)
        else:
            decided = False
        if handshake == TCP_SYN and not mark:
            return Classified(mark, "queued_syn")
        if handshake == TCP_ACK and subtype == 0 and deciders is None and not ct_mark & LEARNED:
            return Classified(mark, "queued_capable")
        if handshake == TCP_ACK and subtype == 0 and deciders is not None and not mark & LEARNED \
                and mark & BACKEND_MASK:
            return Classified(mark | LEARNED | PROVISIONAL, None, hit, "copied_capable", decided)
        if handshake == TCP_ACK and new and not mark:
            return Classified(mark, "queued_first")
        return Classified(mark, None, hit, None, decided)
    if (segment.src, segment.sport) in vips and handshake == TCP_SYN | TCP_ACK and not ct_mark & LEARNED \
            and subtype == 0:
        return Classified(ct_mark, "queued_synack") if deciders is None else Classified(0, None, copied="copied_synack")
    return Classified(0, None)


def _decide(segment: Segment, decider: Decider, subtype: int | None, turn: int) -> int:
    """The mark a service's chain gives a SYN (or the first ACK of a mid-stream entry): 0 where
    it leaves the packet to the worker."""
    table = decider.table
    if table.index is Index.WORKER or segment.flags & TCP_SYN == 0 and (subtype == 1 or table.index is Index.COUNTER):
        return 0
    if table.index is Index.COUNTER:
        position = turn % len(table.slots)
    else:
        key = segment.src if table.index is Index.SOURCE else flow_key(segment.src, segment.sport, segment.dst,
                                                                        segment.dport)
        position = slot(key, len(table.slots))
    mark = table.mark_at(position)
    return mark if decider.mptcp_aware and subtype == 0 else mark | LEARNED


def renew_chains(outline: Outline, table: str) -> str:
    """Commands that empty every chain of the table, so that loading the ruleset again in the
    same transaction replaces its rules instead of adding them twice."""
    return "".join(f"flush chain inet {table} {name}\n" for name in sorted(outline.chains))


def families(cfg: Config) -> set[int]:
    return {ipaddress.ip_address(vip).version for vip in cfg.vips}


def changes(now: tuple[int, ...], was: tuple[int, ...], first: int = 0) -> list[tuple[int, int]]:
    """(key, value) where a table of the same size changed (none when it is the same tuple); its
    keys count from `first`."""
    return [] if now is was else [(first | i, value) for i, (value, old) in enumerate(zip(now, was)) if value != old]


class Ruleset:
    """Our nft table (and the xtables queue rule where it is needed) in the kernel."""

    def __init__(self, nft: Nft, cfg: Config):
        self.nft, self.cfg = nft, cfg
        native = {"auto": None, "native": True, "xtables": False}[cfg.queue_mode]
        self.native_queue = native_queue_supported(nft) if native is None else native
        self.owner = "worker"
        self.tables: dict[str, LookupTable] = {}  # as last written to the kernel
        self.slots = SchedulerMaps(cfg.table_name)
        self.written_for: Config | None = None  # the config the decide and join-port maps were written from

    @property
    def queue_mode(self) -> str:
        return "native nft queue" if self.native_queue else "xtables NFQUEUE on mark bit"

    def install(self, cfg: Config, tables: Mapping[str, LookupTable]) -> None:
        """Load the table with the services' chains and tables, or adopt the one there (a
        restarted worker's, or the operator's): one transaction, so no SYN finds a service's
        chain empty. cfg: the config in force (its marks read back from the kernel)."""
        tables = self._kernel_tables(cfg, tables)
        outline, written = self.outline(), True
        if outline is None:
            self.nft.run(render_ruleset(cfg, self.native_queue, by_worker=True) + render_decide(cfg, tables))
        else:
            self.owner = "worker" if outline.comment == WORKER_COMMENT else "operator"
            log.info("nft table inet %s exists (%s's): adopting it with its token map", cfg.table_name, self.owner)
            decide = render_decide(cfg, tables, named(outline, "svc_") - set(tables),
                                   unwanted_affinity(outline, cfg, tables))
            # this version's rules; sets and maps keep their elements
            rules = renew_chains(outline, cfg.table_name) + render_ruleset(cfg, self.native_queue, True) \
                if self.owner == "worker" else ""
            try:
                self.nft.run(rules + decide)
            except KernelError as e:  # e.g. a token map of another size: the rules in place go on
                log.error("could not bring the rules of table inet %s up to date, keeping them: %s",
                          cfg.table_name, e)
                written = self.nft.try_run(decide)  # the tables alone: a backend gone meanwhile gets nothing new
            self.sync_vips(cfg)
        if written:
            self.tables, self.written_for = dict(tables), cfg
        else:  # what the kernel holds is unknown: the next sync writes every table
            log.error("could not write the scheduler tables of table inet %s; trying again", cfg.table_name)
            self.tables, self.written_for = {}, None
        if not self.native_queue:
            for version in families(cfg):
                self._xtables(version, "-C") or self._xtables(version, "-A", check=True)

    @staticmethod
    def _kernel_tables(cfg: Config, tables: Mapping[str, LookupTable]) -> Mapping[str, LookupTable]:
        return tables if cfg.handshakes == "kernel" else {}

    def sync_tables(self, cfg: Config, tables: Mapping[str, LookupTable]) -> None:
        """Rewrite the tables that changed (health, drain, weights, reload), each in one
        transaction with its chain, so that no SYN sees half of one; a new config (a reload)
        rewrites the maps from VIP . port to service and from join port to backend too."""
        tables = self._kernel_tables(cfg, tables)
        changed = {name: table for name, table in tables.items() if self.tables.get(name) is not table}
        gone = set(self.tables) - set(tables)
        if changed and not gone and cfg is self.written_for:
            services = {s.name: s for s in cfg.services}
            in_place = {name: table for name, table in changed.items() if name in self.tables
                        and len(table.via) == len(self.tables[name].via)
                        and service_rules(services[name], table) == service_rules(services[name], self.tables[name])}
            for name, table in in_place.items():  # (a health or drain change: the chain stays as it is)
                was = self.tables[name]
                self.slots.write({f"sched_{name}": changes(table.slots, was.slots),
                                  f"via_{name}": changes(table.via, was.via, VIRTUAL)})
                self.tables[name] = table
                del changed[name]
        if changed or gone or cfg is not self.written_for:
            reloaded = cfg is not self.written_for and any(t.affinity for t in (*self.tables.values(), *tables.values()))
            outline = self.outline() if reloaded else None
            unwanted = unwanted_affinity(outline, cfg, tables) if outline else None
            self.nft.run(render_decide(cfg, changed, gone, unwanted))
            self.tables, self.written_for = dict(tables), cfg

    def outline(self) -> Outline | None:
        return TableReader(self.cfg.table_name).outline()

    def _xtables(self, version: int, action: str, check: bool = False) -> bool:
        binary = iptables_binary(version)
        rule = xtables_rule(self.cfg)
        done = subprocess.run([binary, *rule[:2], action, *rule[2:]], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise KernelError(f"{binary} {action}: {done.stderr.strip()}")
        return done.returncode == 0

    def sync_vips(self, cfg: Config) -> None:
        """Make the VIP sets hold exactly the config's VIP . port pairs (add first, then delete)."""
        table = self.cfg.table_name
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

    def sync_unavailable(self, marks: set[int]) -> None:
        """The backend marks whose joins the worker must read before they are steered; the
        clients that backends taking no new connections took last are forgotten (their sets
        flushed: nothing is listed), so that each is remembered where it goes next."""
        table = self.cfg.table_name
        elements = f"add element inet {table} unavailable {{ {', '.join(f'0x{m:x}' for m in sorted(marks))} }}"
        self.nft.run(f"flush set inet {table} unavailable" + (f"; {elements}" if marks else ""))
        persistent = {name: lookup for name, lookup in self.tables.items() if lookup.affinity}
        present = affinity_sets(self.written_for or self.cfg, persistent)
        forgotten = [affinity_set(name, version, mark) for name in persistent for mark in sorted(marks)
                     for version in (4, 6)]
        flushes = [f"flush set inet {table} {name}" for name in forgotten if name in present]
        if flushes:
            self.nft.run("\n".join(flushes) + "\n")

    def remove(self) -> None:
        """Our xtables rules, the mangle table iptables-nft made for them alone, and our nft table
        unless the operator installed it."""
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
                    self.nft.try_run(f"delete table {family} mangle")
        outline = self.outline()
        if outline is not None and outline.comment == WORKER_COMMENT:  # never the one an operator installed
            self.nft.try_run(f"delete table inet {self.cfg.table_name}")
