"""The one TOML config file: read and validate (file, key and reason on every error) into the
config's data (core/settings.py).

Nothing here touches the kernel: a file is wholly valid before anything is installed.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

from ..core.balancer import UNKNOWN_JOIN_POLICIES
from ..core.marks import BACKEND_MASK
from ..core.news import NAME
from ..core.schedulers import MAGLEV_DEFAULT_SIZE, MAGLEV_MAX_SIZE, SCHEDULERS, is_prime
from ..core.settings import (
    ANNOUNCE_DEVICE,
    CLUSTER_HOLD_MS,
    BackendConfig,
    ClusterConfig,
    Config,
    ConfigError,
    HealthConfig,
    ServiceConfig,
    sentinel_set,
    uses_tls,
)

RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local
DEFAULT = Config(path="", services=(), backends=())  # the defaults, as the data model sets them


def load(path: str | Path) -> Config:
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "-", f"not valid TOML: {e}") from None
    return from_dict(data, path)


class _Reader:
    """Typed access to one TOML table, failing with the file and the full key."""

    def __init__(self, path: str, table, prefix: str, allowed: set[str]):
        self.path, self.prefix = path, prefix
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table = table
        for key in table:
            if key not in allowed:
                self.fail(key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def fail(self, key: str, reason: str):
        full = f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)
        raise ConfigError(self.path, full, reason)

    def integer(self, key: str, default: int | None, low: int, high: int) -> int:
        value = self.table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(key, f"must be an integer from {low} to {high}, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.table.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            self.fail(key, f"must be a number from {low} to {high}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, allowed: tuple) -> str:
        value = self.table.get(key, default)
        if value not in allowed:
            self.fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def name(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value or not value.replace("-", "").replace("_", "").isalnum():
            self.fail(key, f"must be a name of letters, digits, - and _, got {value!r}")
        return value

    def address(self, key: str) -> str:
        value = self.table.get(key)
        try:
            return str(ipaddress.ip_address(value))
        except (ValueError, TypeError):
            self.fail(key, f"must be an IPv4 or IPv6 address, got {value!r}")

    def addresses(self, key: str, single: str | None = None) -> tuple[str, ...]:
        """`key` as a list of addresses, or `single` as one address."""
        if single and single in self.table:
            if key in self.table:
                self.fail(key, f"give {single} or {key}, not both")
            raw, shown = [self.table[single]], single
        else:
            raw, shown = self.table.get(key), key
        if not isinstance(raw, list) or not raw:
            self.fail(shown, f"must be an IPv4 or IPv6 address{' (or a list)' if single else ' list'}, got {raw!r}")
        result = []
        for value in raw:
            try:
                result.append(str(ipaddress.ip_address(value)))
            except (ValueError, TypeError):
                self.fail(shown, f"must be an IPv4 or IPv6 address, got {value!r}")
        if len(set(result)) != len(result):
            self.fail(shown, "an address is listed twice")
        return tuple(result)


TOP_KEYS = {"services", "backends", "health", "kernel", "limits", "metrics", "control", "cluster"}
CLUSTER_KEYS = {"name", "balancer", "redis", "username", "password_file", "tls_ca", "tls_cert", "tls_key",
                "announce_device"}
CLUSTER_SCHEDULERS = ("maglev", "sh")  # every balancer computes the same table from the same config
SERVICE_KEYS = {"name", "vip", "vips", "ports", "backends", "scheduler", "unknown_join", "mptcp_aware",
                "persistence", "maglev_size", "direct_return", "joins", "join_port_base"}
JOINS = ("token", "announced-port")
BACKEND_KEYS = {"name", "address", "addresses", "weight", "mark", "tunnel", "remote", "vni"}
TUNNELS = ("none", "vxlan", "ipip")
HEALTH_KEYS = {"enabled", "interval", "timeout", "rise", "fall", "port", "mptcp"}
KERNEL_KEYS = {"queue", "queue_mode", "table_name", "mark_base", "table_base", "max_backends", "rule_priority",
               "conntrack_interval", "workers", "hold_ms", "hold_max", "handshakes"}
LIMIT_KEYS = {"flow_capacity", "flow_timeout", "token_capacity", "token_timeout"}


def from_dict(data: dict, path: str = "<config>") -> Config:
    _Reader(path, data, "", TOP_KEYS)  # refuses unknown top-level keys
    kernel = _Reader(path, data.get("kernel", {}), "kernel", KERNEL_KEYS)
    limits = _Reader(path, data.get("limits", {}), "limits", LIMIT_KEYS)
    metrics = _Reader(path, data.get("metrics", {}), "metrics", {"address"})
    control = _Reader(path, data.get("control", {}), "control", {"socket"})
    health = _Reader(path, data.get("health", {}), "health", HEALTH_KEYS)

    mark_base = kernel.integer("mark_base", DEFAULT.mark_base, 1, BACKEND_MASK)
    max_backends = kernel.integer("max_backends", DEFAULT.max_backends, 1, 4096)
    if mark_base + max_backends - 1 > BACKEND_MASK:
        kernel.fail("max_backends", f"marks 0x{mark_base:x} + {max_backends} overlap the flag bits "
                                    f"(backend marks live below 0x{BACKEND_MASK + 1:x})")
    table_base = kernel.integer("table_base", DEFAULT.table_base, 2, 0xFFFF0000)
    tables = range(table_base - 1, table_base + max_backends)
    if RESERVED_TABLES & set(tables):
        kernel.fail("table_base", f"routing tables {tables.start}-{tables.stop - 1} include a reserved "
                                  f"one (0, 253 default, 254 main, 255 local)")
    table_name = kernel.table.get("table_name", DEFAULT.table_name)
    if not isinstance(table_name, str) or not table_name.replace("_", "").isalnum():
        kernel.fail("table_name", f"must be letters, digits and _, got {table_name!r}")

    backends = _backends(path, data.get("backends"), mark_base, max_backends, table_base)
    services = _services(path, data.get("services"), {b.name: b for b in backends}, max_backends)
    used = {n for s in services for n in s.backends}
    for i, b in enumerate(backends):
        if b.name not in used:
            raise ConfigError(path, f"backends[{i}].name", f"backend {b.name!r} is in no service")

    metrics_address = metrics.table.get("address", DEFAULT.metrics_address)
    if metrics_address:
        host, _, port = str(metrics_address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            metrics.fail("address", f"must be HOST:PORT (or \"\" for no metrics), got {metrics_address!r}")
    socket_path = control.table.get("socket", DEFAULT.control_socket)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        control.fail("socket", f"must be an absolute path, got {socket_path!r}")
    interval = health.number("interval", DEFAULT.health.interval, 0.05, 3600)
    timeout = health.number("timeout", min(DEFAULT.health.timeout, interval), 0.01, 3600)
    if timeout > interval:
        health.fail("timeout", f"{timeout} s is longer than the interval ({interval} s)")

    queue, workers = kernel.integer("queue", DEFAULT.queue, 0, 65535), kernel.integer("workers", DEFAULT.workers, 1, 64)
    if queue + workers - 1 > 65535:
        kernel.fail("workers", f"queues {queue}..{queue + workers - 1} pass 65535, the last queue number")
    return Config(
        path=path, services=tuple(services), backends=tuple(backends),
        health=HealthConfig(health.boolean("enabled", DEFAULT.health.enabled), interval, timeout,
                            health.integer("rise", DEFAULT.health.rise, 1, 100),
                            health.integer("fall", DEFAULT.health.fall, 1, 100),
                            health.integer("port", None, 1, 65535) if "port" in health.table else None,
                            health.boolean("mptcp", DEFAULT.health.mptcp)),
        queue=queue,
        queue_mode=kernel.choice("queue_mode", DEFAULT.queue_mode, ("auto", "native", "xtables")),
        handshakes=kernel.choice("handshakes", DEFAULT.handshakes, ("kernel", "queue")),
        table_name=table_name, mark_base=mark_base, table_base=table_base, max_backends=max_backends,
        rule_priority=kernel.integer("rule_priority", DEFAULT.rule_priority, 1, 32764),
        conntrack_interval=kernel.number("conntrack_interval", DEFAULT.conntrack_interval, 0.1, 3600),
        workers=workers, hold_ms=kernel.integer("hold_ms", CLUSTER_HOLD_MS if "cluster" in data else DEFAULT.hold_ms,
                                                0, 10_000),
        # held joins wait in the kernel's queue (4,096 packets), which every queued packet shares
        hold_max=kernel.integer("hold_max", DEFAULT.hold_max, 0, 2048),
        flow_capacity=limits.integer("flow_capacity", DEFAULT.flow_capacity, 1, 100_000_000),
        flow_timeout=limits.integer("flow_timeout", DEFAULT.flow_timeout, 1, 86400),
        token_capacity=limits.integer("token_capacity", DEFAULT.token_capacity, 1, 100_000_000),
        token_timeout=limits.integer("token_timeout", DEFAULT.token_timeout, 1, 30 * 86400),
        metrics_address=metrics_address or None, control_socket=socket_path,
        cluster=_cluster(path, data["cluster"], services, backends) if "cluster" in data else None,
    )


def _cluster(path: str, table, services: list[ServiceConfig], backends: list[BackendConfig]) -> ClusterConfig:
    r = _Reader(path, table, "cluster", CLUSTER_KEYS)
    for i, b in enumerate(backends):
        if not NAME.fullmatch(b.name):  # balancers name backends to each other: news.NAME parses them
            raise ConfigError(path, f"backends[{i}].name", "a cluster's backend names are at most 64 ASCII letters, "
                              f"digits, - and _, got {b.name!r}")
    for i, s in enumerate(services):
        if s.scheduler not in CLUSTER_SCHEDULERS:
            raise ConfigError(path, f"services[{i}].scheduler", f"a cluster needs a scheduler every balancer "
                              f"computes alike ({', '.join(CLUSTER_SCHEDULERS)}), got {s.scheduler!r}")
        if not s.direct_return:
            raise ConfigError(path, f"services[{i}].direct_return", "a cluster needs direct server return: "
                              "a reply cannot be counted on to pass the balancer its connection came through")
    url = r.table.get("redis")
    if not isinstance(url, str) or not (re.fullmatch(r"(rediss?://[^/@\s]+(/\d+)?|unix:///\S+)", url)
                                        or sentinel_set(url)):
        r.fail("redis", "must be redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] (TLS), unix:///PATH, or a "
                        "Sentinel set: sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (sentinels:// with TLS), "
                        f"with no credentials in it (they go in username and password_file), got {url!r}")
    password_path = r.table.get("password_file")
    if not isinstance(password_path, str) or not password_path.startswith("/"):
        r.fail("password_file", f"must be the absolute path of a file holding the Redis password (a cluster never "
                                f"talks to an open Redis), got {password_path!r}")
    try:
        password = Path(password_path).read_text().strip()
    except OSError as e:
        r.fail("password_file", f"cannot read {password_path}: {e.strerror}")
    if not password:
        r.fail("password_file", f"{password_path} is empty")
    files = {}
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = r.table.get(key)
        if value is None:
            continue
        if not uses_tls(url):
            r.fail(key, "only with a rediss:// or sentinels:// (TLS) address")
        if not isinstance(value, str) or not Path(value).is_file():
            r.fail(key, f"must be the path of a readable file, got {value!r}")
        files[key] = value
    if ("tls_cert" in files) != ("tls_key" in files):
        r.fail("tls_cert" if "tls_key" in files else "tls_key", "a client certificate needs both tls_cert and tls_key")
    device = r.table.get("announce_device", ANNOUNCE_DEVICE)
    if not isinstance(device, str) or not re.fullmatch(r"([A-Za-z0-9_.-]{1,15})?", device):
        r.fail("announce_device", f"must be an interface name of at most 15 characters (or \"\"), got {device!r}")
    balancer = r.name("balancer")
    if not NAME.fullmatch(balancer):  # its peers find it by its keys' names (news.Keys)
        r.fail("balancer", f"must be at most 64 ASCII letters, digits, - and _, got {balancer!r}")
    username = r.table.get("username", balancer)  # each balancer its own user (deploy/cluster/redis-acl.conf)
    if not (isinstance(username, str) and username.strip()):
        r.fail("username", f"must be a Redis ACL user name, got {username!r}")
    return ClusterConfig(r.name("name"), balancer, url, username, password, **files, announce_device=device or None)


def _backends(path: str, raw, mark_base: int, max_backends: int, table_base: int) -> list[BackendConfig]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, "backends", "at least one [[backends]] entry is needed")
    if len(raw) > max_backends:
        raise ConfigError(path, "backends", f"{len(raw)} backends, kernel.max_backends is {max_backends}")
    readers = [_Reader(path, b, f"backends[{i}]", BACKEND_KEYS) for i, b in enumerate(raw)]
    explicit: dict[int, str] = {}
    for r in readers:
        if "mark" in r.table:
            mark = r.integer("mark", None, mark_base, mark_base + max_backends - 1)
            if mark in explicit:
                r.fail("mark", f"mark 0x{mark:x} overlaps backend {explicit[mark]!r}")
            explicit[mark] = r.table.get("name")
    free = (m for m in range(mark_base, mark_base + max_backends) if m not in explicit)
    result, names, owners = [], set(), {}
    for r in readers:
        name = r.name("name")
        if name in names:
            r.fail("name", f"duplicate backend {name!r}")
        addresses = r.addresses("addresses", single="address")
        if len({ipaddress.ip_address(a).version for a in addresses}) != len(addresses):
            r.fail("addresses", "at most one address per family (IPv4, IPv6)")
        for a in addresses:
            if a in owners:
                r.fail("address", f"duplicate backend address {a} (also {owners[a]!r})")
            owners[a] = name
        mark = r.table["mark"] if "mark" in r.table else next(free)
        names.add(name)
        tunnel = r.choice("tunnel", "none", TUNNELS)
        remote = None
        if tunnel != "none":
            remote = r.address("remote")
            if ipaddress.ip_address(remote).version != 4 or any(
                    ipaddress.ip_address(a).version != 4 for a in addresses):
                r.fail("remote", "tunnels carry IPv4 to an IPv4 endpoint here")
        elif "remote" in r.table or "vni" in r.table:
            r.fail("remote" if "remote" in r.table else "vni", "only with a tunnel")
        vni = r.integer("vni", mark, 1, 0xFFFFFF) if tunnel == "vxlan" else None
        result.append(BackendConfig(name, addresses, r.integer("weight", 1, 0, 65535), mark,
                                    table_base + mark - mark_base, tunnel, remote, vni))
    return result


def _services(path: str, raw, backends: dict[str, BackendConfig], max_backends: int) -> list[ServiceConfig]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, "services", "at least one [[services]] entry is needed")
    result, names, endpoints = [], set(), {}
    all_addresses = {a: b.name for b in backends.values() for a in b.addresses}
    for i, table in enumerate(raw):
        r = _Reader(path, table, f"services[{i}]", SERVICE_KEYS)
        name = r.name("name", f"service{i}")
        if name in names:
            r.fail("name", f"duplicate service {name!r}")
        vips = r.addresses("vips", single="vip")
        key = "vip" if "vip" in r.table else "vips"
        for vip in vips:
            if vip in all_addresses:
                r.fail(key, f"VIP {vip} is the real address of backend {all_addresses[vip]!r}")
        ports = r.table.get("ports", [80])
        if not isinstance(ports, list) or not ports or not all(
                isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports):
            r.fail("ports", f"must be a non-empty list of TCP ports (1-65535), got {ports!r}")
        if len(set(ports)) != len(ports):
            r.fail("ports", "a port is listed twice")
        for vip in vips:
            for port in ports:
                if (vip, port) in endpoints:
                    r.fail("ports", f"{vip} port {port} is also served by {endpoints[(vip, port)]!r}")
                endpoints[(vip, port)] = name
        members = r.table.get("backends", list(backends))
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            r.fail("backends", f"must be a non-empty list of backend names, got {members!r}")
        for m in members:
            if m not in backends:
                r.fail("backends", f"unknown backend {m!r} (defined: {', '.join(backends)})")
            families = {ipaddress.ip_address(a).version for a in backends[m].addresses}
            for vip in vips:
                if ipaddress.ip_address(vip).version not in families:
                    r.fail("backends", f"backend {m!r} has no IPv{ipaddress.ip_address(vip).version} "
                                       f"address for VIP {vip}")
        if len(set(members)) != len(members):
            r.fail("backends", "a backend is listed twice")
        maglev_size = r.integer("maglev_size", MAGLEV_DEFAULT_SIZE, 3, MAGLEV_MAX_SIZE)
        if not is_prime(maglev_size):
            r.fail("maglev_size", f"must be a prime, got {maglev_size}")
        joins = r.choice("joins", "token", JOINS)
        join_port_base = None
        if joins == "announced-port":  # a port per possible backend: marks (and so ports) outlive reloads
            join_port_base = r.integer("join_port_base", None, 1, 65536 - max_backends)
            for vip in vips:
                for port in range(join_port_base, join_port_base + max_backends):
                    if (vip, port) in endpoints:
                        r.fail("join_port_base", f"join ports {join_port_base}-{join_port_base + max_backends - 1} "
                                                 f"(one per possible backend, max_backends {max_backends}) take "
                                                 f"{vip} port {port}, served by {endpoints[(vip, port)]!r}")
                    endpoints[(vip, port)] = name
        elif "join_port_base" in r.table:
            r.fail("join_port_base", 'only with joins = "announced-port"')
        names.add(name)
        result.append(ServiceConfig(
            name, vips, tuple(ports), tuple(members), r.choice("scheduler", "rr", SCHEDULERS),
            r.choice("unknown_join", "random", UNKNOWN_JOIN_POLICIES), r.boolean("mptcp_aware", True),
            r.integer("persistence", 0, 0, 86400 * 7), maglev_size, r.boolean("direct_return", False), joins,
            join_port_base))
    return result
