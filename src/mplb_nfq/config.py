"""The one TOML config file: read, validate (file, key and reason on every error), build the core."""
from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .balancer import BACKEND_MASK, SCHEDULERS, UNKNOWN_JOIN_POLICIES, Backend, Balancer


class ConfigError(ValueError):
    def __init__(self, path: str, key: str, reason: str):
        super().__init__(f"{path}: {key}: {reason}")
        self.path, self.key, self.reason = path, key, reason


@dataclass(frozen=True)
class Config:
    path: str
    vip: str
    ports: tuple[int, ...]
    backends: tuple[Backend, ...]
    scheduler: str = "rr"
    unknown_join: str = "random"
    mptcp_aware: bool = True
    queue: int = 0
    queue_mode: str = "auto"  # auto | native | xtables
    table_name: str = "mplb"
    rule_priority: int = 1000
    flow_capacity: int = 1_000_000
    token_capacity: int = 1_000_000
    token_timeout: int = 7200

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.vip).version

    def balancer(self, **overrides) -> Balancer:
        return Balancer(list(self.backends), scheduler=self.scheduler, unknown_join=self.unknown_join,
                        mptcp_aware=self.mptcp_aware, flow_capacity=self.flow_capacity,
                        token_capacity=self.token_capacity, token_ttl=self.token_timeout,
                        flow_ttl=self.token_timeout, **overrides)


TOP_KEYS = {"vip", "ports", "scheduler", "unknown_join", "mptcp_aware", "backends", "kernel", "limits"}
KERNEL_KEYS = {"queue", "queue_mode", "table_name", "mark_base", "table_base", "rule_priority"}
LIMIT_KEYS = {"flow_capacity", "token_capacity", "token_timeout"}
BACKEND_KEYS = {"name", "address"}


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


def from_dict(data: dict, path: str = "<config>") -> Config:
    def fail(key: str, reason: str):
        raise ConfigError(path, key, reason)

    def unknown(table: dict, allowed: set, prefix: str):
        for key in table:
            if key not in allowed:
                fail(prefix + key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def integer(table: dict, key: str, default: int, low: int, high: int, prefix: str = "") -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            fail(prefix + key, f"must be an integer from {low} to {high}, got {value!r}")
        return value

    def choice(key: str, default: str, allowed: tuple) -> str:
        value = data.get(key, default)
        if value not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    unknown(data, TOP_KEYS, "")
    vip = _address(data.get("vip"), "vip", fail)
    ports = data.get("ports", [80])
    if not isinstance(ports, list) or not ports or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports):
        fail("ports", f"must be a non-empty list of TCP ports (1-65535), got {ports!r}")
    if len(set(ports)) != len(ports):
        fail("ports", "a port is listed twice")
    kernel = data.get("kernel", {})
    limits = data.get("limits", {})
    for name, table, keys in (("kernel", kernel, KERNEL_KEYS), ("limits", limits, LIMIT_KEYS)):
        if not isinstance(table, dict):
            fail(name, "must be a table")
        unknown(table, keys, name + ".")
    mark_base = integer(kernel, "mark_base", 0x100, 1, BACKEND_MASK, "kernel.")
    table_base = integer(kernel, "table_base", 100, 2, 0xFFFFFFF0, "kernel.")  # table_base - 1: fail-open routes
    queue_mode = kernel.get("queue_mode", "auto")
    if queue_mode not in ("auto", "native", "xtables"):
        fail("kernel.queue_mode", f"must be auto, native or xtables, got {queue_mode!r}")
    table_name = kernel.get("table_name", "mplb")
    if not isinstance(table_name, str) or not table_name.replace("_", "").isalnum():
        fail("kernel.table_name", f"must be letters, digits and _, got {table_name!r}")

    raw_backends = data.get("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        fail("backends", "at least one [[backends]] entry is needed")
    if mark_base + len(raw_backends) - 1 > BACKEND_MASK:
        fail("kernel.mark_base", f"{len(raw_backends)} backends do not fit below 0x{BACKEND_MASK:x}")
    backends, names, addresses = [], set(), set()
    for i, b in enumerate(raw_backends):
        prefix = f"backends[{i}]."
        if not isinstance(b, dict):
            fail(f"backends[{i}]", "must be a table")
        unknown(b, BACKEND_KEYS, prefix)
        name = b.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            fail(prefix + "name", f"must be a name of letters, digits, - and _, got {name!r}")
        if name in names:
            fail(prefix + "name", f"duplicate backend {name!r}")
        address = _address(b.get("address"), prefix + "address", fail)
        if address == vip:
            fail(prefix + "address", "the backend's real address cannot be the VIP")
        if address in addresses:
            fail(prefix + "address", f"duplicate backend address {address}")
        if ipaddress.ip_address(address).version != ipaddress.ip_address(vip).version:
            fail(prefix + "address", f"{address} is not of the VIP's address family")
        names.add(name)
        addresses.add(address)
        backends.append(Backend(name, address, mark_base + i, table_base + i))

    return Config(
        path=path, vip=vip, ports=tuple(ports), backends=tuple(backends),
        scheduler=choice("scheduler", "rr", SCHEDULERS),
        unknown_join=choice("unknown_join", "random", UNKNOWN_JOIN_POLICIES),
        mptcp_aware=_boolean(data, "mptcp_aware", True, fail),
        queue=integer(kernel, "queue", 0, 0, 65535, "kernel."),
        queue_mode=queue_mode, table_name=table_name,
        rule_priority=integer(kernel, "rule_priority", 1000, 1, 32764, "kernel."),
        flow_capacity=integer(limits, "flow_capacity", 1_000_000, 1, 100_000_000, "limits."),
        token_capacity=integer(limits, "token_capacity", 1_000_000, 1, 100_000_000, "limits."),
        token_timeout=integer(limits, "token_timeout", 7200, 1, 30 * 86400, "limits."),
    )


def _address(value, key: str, fail) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        fail(key, f"must be an IPv4 or IPv6 address, got {value!r}")


def _boolean(data: dict, key: str, default: bool, fail) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        fail(key, f"must be true or false, got {value!r}")
    return value
