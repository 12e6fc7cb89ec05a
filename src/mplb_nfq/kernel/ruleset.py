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
from typing import TYPE_CHECKING, Container, Mapping, NamedTuple

from ..core.marks import BACKEND_MASK, JOIN, LEARNED, QUEUE, REJECT
from ..core.packet import TCP_ACK, TCP_SYN, Segment
from .nft import KernelError, Nft, native_queue_supported

if TYPE_CHECKING:  # the config is data here: the kernel layer never imports operations
    from ..ops.config import Config

log = logging.getLogger("mplb_nfq.kernel")
NFT_DIR = Path(__file__).resolve().parent.parent / "nft"
XT_COMMENT = "mplb-nfq"


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
        backend_mask=f"0x{BACKEND_MASK:08x}",
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


class Classified(NamedTuple):
    mark: int  # the packet's mark when it leaves the classify chain
    queued: str | None  # the counter of the rule that sends it to the worker; None: it stays in the kernel
    kernel_hit: bool = False  # a MP_JOIN SYN the token map steered


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
             token_map: Mapping[int, int], tracked: bool = True, unavailable: Container[int] = ()) -> Classified:
    """What nft/mplb.nft's classify chain and its handshake chains do to one TCP segment, given
    its flow's conntrack state: the model `inspect` replays. A kernel test sends packets through
    the real ruleset and holds this function to its counters, rule by rule."""
    handshake = segment.flags & (TCP_SYN | TCP_ACK)
    subtype, token = nft_mptcp_option(segment.options)
    if (segment.dst, segment.dport) in vips:
        mark = ct_mark if original and ct_mark else 0
        if ct_mark & (LEARNED | JOIN):
            return Classified(mark, None)
        hit = False
        if handshake == TCP_SYN and not mark and tracked and subtype == 1 and token is not None:
            found = token_map.get(token)
            if found is not None:
                mark, hit = found, True
        if handshake == TCP_SYN and mark & BACKEND_MASK in unavailable and mark & BACKEND_MASK:
            return Classified(0, "queued_join_unavailable")
        if handshake == TCP_SYN and not mark:
            return Classified(mark, "queued_syn")
        if handshake == TCP_ACK and not ct_mark & LEARNED and subtype == 0:
            return Classified(mark, "queued_capable")
        if handshake == TCP_ACK and new and not mark:
            return Classified(mark, "queued_first")
        return Classified(mark, None, hit)
    if (segment.src, segment.sport) in vips and handshake == TCP_SYN | TCP_ACK and not ct_mark & LEARNED \
            and subtype == 0:
        return Classified(ct_mark, "queued_synack")
    return Classified(0, None)


def renew_chains(listing: str, table: str) -> str:
    """Commands that empty every chain of the table, so that loading the ruleset again in the
    same transaction replaces its rules instead of adding them twice."""
    chains = re.findall(r"^\s*chain (\w+) \{", listing, re.MULTILINE)
    return "".join(f"flush chain inet {table} {name}\n" for name in chains)


def families(cfg: Config) -> set[int]:
    return {ipaddress.ip_address(vip).version for vip in cfg.vips}


class Ruleset:
    """Our nft table (and the xtables queue rule where it is needed) in the kernel."""

    def __init__(self, nft: Nft, cfg: Config):
        self.nft, self.cfg = nft, cfg
        native = {"auto": None, "native": True, "xtables": False}[cfg.queue_mode]
        self.native_queue = native_queue_supported(nft) if native is None else native
        self.owner = "worker"

    @property
    def queue_mode(self) -> str:
        return "native nft queue" if self.native_queue else "xtables NFQUEUE on mark bit"

    def install(self) -> None:
        """Load the table, or adopt the one there (a restarted worker's, or the operator's)."""
        cfg = self.cfg
        listing = self.listing()
        if listing is None:
            self.nft.run(render_ruleset(cfg, self.native_queue, by_worker=True))
        else:
            self.owner = "worker" if WORKER_COMMENT in listing else "operator"
            log.info("nft table inet %s exists (%s's): adopting it with its token map", cfg.table_name, self.owner)
            if self.owner == "worker":  # this version's rules, in one transaction; sets and maps keep their elements
                try:
                    self.nft.run(renew_chains(listing, cfg.table_name) + render_ruleset(cfg, self.native_queue, True))
                except KernelError as e:  # e.g. a token map of another size: the rules in place go on
                    log.error("could not bring the rules of table inet %s up to date, keeping them: %s",
                              cfg.table_name, e)
            self.sync_vips(cfg)
        if not self.native_queue:
            for version in families(cfg):
                self._xtables(version, "-C") or self._xtables(version, "-A", check=True)

    def listing(self) -> str | None:
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
        """The backend marks whose joins the worker must read before they are steered."""
        table = self.cfg.table_name
        elements = f"add element inet {table} unavailable {{ {', '.join(f'0x{m:x}' for m in sorted(marks))} }}"
        self.nft.run(f"flush set inet {table} unavailable" + (f"; {elements}" if marks else ""))

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
        listing = self.listing()
        if listing is not None and WORKER_COMMENT in listing:  # never the one an operator installed
            self.nft.try_run(f"delete table inet {self.cfg.table_name}")
