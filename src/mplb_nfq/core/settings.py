"""The config as data: what ops/config.py reads from the TOML file and validates, and what every
layer (the kernel adapters included) takes. Each default lives here, once."""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable

from .balancer import Backend, Balancer, Service

CLUSTER_HOLD_MS = 200  # hold_ms in a cluster: a join that crosses balancers waits for a peer's news
ANNOUNCE_DEVICE = "mplb-announce"  # the TUN device whose link BIRD checks


class ConfigError(ValueError):
    def __init__(self, path: str, key: str, reason: str):
        super().__init__(f"{path}: {key}: {reason}")
        self.path, self.key, self.reason = path, key, reason


@dataclass(frozen=True)
class BackendConfig:
    name: str
    addresses: tuple[str, ...]  # where the LB sends the VIP's packets (on a tunnel: the inner address)
    weight: int
    mark: int
    table: int
    tunnel: str = "none"  # none (same segment) | vxlan | ipip
    remote: str | None = None  # the backend's tunnel endpoint, reached by routing
    vni: int | None = None  # VXLAN network identifier

    @property
    def device(self) -> str | None:
        """The LB's tunnel device towards this backend."""
        return None if self.tunnel == "none" else f"mplbt{self.mark:x}"


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    vips: tuple[str, ...]
    ports: tuple[int, ...]
    backends: tuple[str, ...]
    scheduler: str
    unknown_join: str
    mptcp_aware: bool
    persistence: int
    maglev_size: int
    direct_return: bool = False
    joins: str = "token"  # token | announced-port: each backend announces a join port of the VIP of its own
    join_port_base: int | None = None  # a backend's join port: join_port_base + (its mark - mark_base)


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    port: int | None = None  # default: the first port of the backend's first service
    mptcp: bool = False  # the check must complete an MPTCP handshake (not fall back to TCP)


@dataclass(frozen=True)
class ClusterConfig:
    """Balancers behind ECMP that share what they learn through Redis."""
    name: str  # the cluster's key prefix in Redis: balancers of one cluster share it
    balancer: str  # this balancer's name, unique in the cluster
    redis: str  # redis://HOST:PORT/DB, rediss:// (TLS), unix:///PATH, or sentinel[s]://HOST:PORT,.../SERVICE/DB
    username: str | None = None  # the ACL user (the reader's default: the balancer's name); None: Redis's default user
    password: str = field(default="", repr=False)  # read from password_file
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    announce_device: str | None = ANNOUNCE_DEVICE  # None: no announcement


@dataclass(frozen=True)
class SentinelSet:
    """A Redis primary that Sentinel watches and fails over: where the sentinels listen, the
    primary's service name, the database; tls: sentinels:// (the sentinels and the data nodes)."""
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    tls: bool = False


SENTINEL_ADDRESS = re.compile(r"(?P<scheme>sentinels?)://(?P<hosts>[^/@\s]+)/(?P<service>[A-Za-z0-9_.-]+)(/(?P<db>\d+))?")
SENTINEL_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


def sentinel_set(address: str) -> SentinelSet | None:
    """The Sentinel set a sentinel:// or sentinels:// address names; None for any other address,
    or one whose hosts are not HOST:PORT."""
    found = SENTINEL_ADDRESS.fullmatch(address)
    if not found:
        return None
    hosts = []
    for part in found["hosts"].split(","):
        host = SENTINEL_HOST.fullmatch(part)
        if not host or not 0 < int(host["port"]) < 65536:
            return None
        hosts.append((host["host"].strip("[]"), int(host["port"])))
    return SentinelSet(tuple(hosts), found["service"], int(found["db"] or 0), found["scheme"] == "sentinels")


def uses_tls(address: str) -> bool:
    return address.startswith(("rediss://", "sentinels://"))


@dataclass(frozen=True)
class Config:
    path: str
    services: tuple[ServiceConfig, ...]
    backends: tuple[BackendConfig, ...]
    health: HealthConfig = HealthConfig()
    queue: int = 0
    queue_mode: str = "auto"  # auto | native | xtables
    handshakes: str = "kernel"  # kernel: SYNs decided and tokens copied in the kernel | queue: both held for the worker
    table_name: str = "mplb"
    mark_base: int = 0x100
    table_base: int = 1000
    max_backends: int = 256
    rule_priority: int = 1000
    flow_capacity: int = 1_000_000
    flow_timeout: int = 60
    token_capacity: int = 1_000_000
    token_timeout: int = 5 * 86400  # a backstop: a token goes when its connection does
    metrics_address: str | None = "127.0.0.1:9842"
    control_socket: str = "/run/mplb-nfq/control.sock"
    conntrack_interval: float = 2.0
    workers: int = 1  # processes, one queue each (queue .. queue + workers - 1)
    hold_ms: int = 50  # how long a worker holds a join whose token it does not know yet (200 in a cluster)
    hold_max: int = 1024  # how many joins it holds at most (the oldest goes first)
    cluster: ClusterConfig | None = None

    @property
    def vips(self) -> list[str]:
        return [vip for s in self.services for vip in s.vips]

    def join_ports(self, service: ServiceConfig) -> dict[str, int]:
        """backend name -> the port of the service's VIPs its joins go to (joins = "announced-port");
        from its mark, so that it stays across reloads and restarts as the mark does."""
        if service.join_port_base is None:
            return {}
        marks = {b.name: b.mark for b in self.backends}
        return {name: service.join_port_base + marks[name] - self.mark_base for name in service.backends}

    @property
    def fallback_table(self) -> int:
        return self.table_base - 1

    def with_stable_marks(self, running: dict[str, int], reserved: Iterable[int] = ()) -> "Config":
        """This config with the marks that running backends already have (a reload must not
        move a backend's connections: conntrack holds their marks). New backends take free marks,
        not the reserved ones (in use in the kernel for backends gone from the config)."""
        taken = set(running.values()) | set(reserved)
        free = (m for m in range(self.mark_base, self.mark_base + self.max_backends) if m not in taken)
        backends = []
        for b in self.backends:
            mark = running.get(b.name)
            if mark is None:
                mark = b.mark if b.mark not in taken else next(free, None)
                if mark is None:
                    raise ConfigError(self.path, "backends", f"no free mark for backend {b.name!r}: "
                                      f"kernel.max_backends ({self.max_backends}) are in use, retired ones included")
                taken.add(mark)
            backends.append(dataclasses.replace(b, mark=mark, table=self.table_base + mark - self.mark_base))
        return dataclasses.replace(self, backends=tuple(backends))

    def installed_marks(self, installed: dict[int, tuple[int, set[str], set[str]]]) -> dict[str, int]:
        """The marks a process before this one gave this config's backends, known by the addresses
        their routes go through."""
        marks = {}
        for b in self.backends:
            for mark, (_, hops, _) in installed.items():
                if hops & set(b.addresses):
                    marks[b.name] = mark
        return marks

    def build_services(self, existing: dict[str, Backend] | None = None) -> list[Service]:
        """The core's services. Backends already running (a reload) keep their object and state."""
        existing = dict(existing or {})
        backends: dict[str, Backend] = {}
        for b in self.backends:
            backend = existing.get(b.name) or Backend(b.name, b.addresses, b.mark, b.table)
            backend.addresses, backend.weight, backend.retired = b.addresses, b.weight, False
            backends[b.name] = backend
        return [Service(s.name, tuple(ipaddress.ip_address(v).packed for v in s.vips), s.ports,
                        [backends[n] for n in s.backends], s.scheduler, s.unknown_join, s.mptcp_aware,
                        s.persistence, s.maglev_size, s.direct_return) for s in self.services]

    def balancer(self, **overrides) -> Balancer:
        return Balancer(self.build_services(), flow_capacity=self.flow_capacity, flow_ttl=self.flow_timeout,
                        token_capacity=self.token_capacity, token_ttl=self.token_timeout, **overrides)
