"""The kernel objects of one config, together: the ruleset, the token map, routes and tunnels.

All of them are named by the config (table name, queue number, marks, tables, rule priority), so
`remove` takes away exactly mplb-nfq's own objects, also those a killed worker left behind. A
table that the operator installed (from `render-nft`) is filled, never deleted.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Mapping

from ..core.balancer import LookupTable
from ..core.settings import Config
from .nft import Nft
from .routing import RetiredRoutes, Routing
from . import snapshot
from .ruleset import Ruleset
from .tokenmap import TokenMap
log = logging.getLogger("mplb_nfq.kernel")


class Dataplane:
    def __init__(self, cfg: Config):
        self.cfg = cfg  # the config in force: `apply` replaces it
        self.nft = Nft()
        self.ruleset = Ruleset(self.nft, cfg)
        self.token_map = TokenMap(cfg.table_name)
        self.routing = Routing()
        self.retired: RetiredRoutes = []
        self.unavailable: set[str] = set()  # backends that take no new connections, by name

    @property
    def queue_mode(self) -> str:
        return self.ruleset.queue_mode

    @property
    def table_owner(self) -> str:
        return self.ruleset.owner

    def install(self, tables: Mapping[str, LookupTable]) -> None:
        self.ruleset.install(self.cfg, tables)
        self.routing.sync_tunnels(self.cfg)
        self.routing.sync_routes(self.cfg, unavailable=self.unavailable)
        log.info("queue %d, mode: %s", self.cfg.queue, self.queue_mode)

    def apply(self, cfg: Config, retired: RetiredRoutes) -> None:
        """A reload: the VIPs, tunnels and routes of the new config (retired backends keep theirs)."""
        self.ruleset.sync_vips(cfg)
        self.routing.sync_tunnels(cfg, retired)
        self.routing.sync_routes(cfg, retired, self.unavailable)
        self.cfg, self.retired = cfg, list(retired)

    def retire(self, retired: RetiredRoutes) -> None:
        """Backends whose last connection ended lose their routes and tunnels."""
        self.routing.sync_routes(self.cfg, retired, self.unavailable)
        self.routing.sync_tunnels(self.cfg, retired)
        self.retired = list(retired)

    def sync_tables(self, tables: Mapping[str, LookupTable]) -> None:
        """The services' scheduler tables, as the core computed them for the backends' state now."""
        self.ruleset.sync_tables(self.cfg, tables)

    def sync_unavailable(self, marks: set[int], names: set[str]) -> None:
        """Backends that take no new connections: their joins go to the worker before they are
        steered, and the fail-open route (what passes unqueued) leaves them out."""
        self.ruleset.sync_unavailable(marks)
        if names != self.unavailable:
            self.unavailable = names
            self.routing.sync_routes(self.cfg, self.retired, names)

    def reopen(self) -> None:
        """In a forked worker: netlink sockets of its own (a shared one mixes up the answers)."""
        self.nft = self.ruleset.nft = Nft()
        self.token_map = TokenMap(self.cfg.table_name)

    def add_tokens(self, tokens: list[tuple[int, int]], comments: Mapping[int, str] | None = None,
                   timeout: int | None = None) -> list[int]:
        """Install token -> backend mark in the kernel map, in one transaction; the tokens the map
        holds already with another mark (another worker's connection) are refused, and returned.
        A comment names the token's connection, for a restarted worker and for `nft list`.
        timeout: seconds (the token timeout when None)."""
        return self.token_map.add(tokens, timeout or self.cfg.token_timeout, comments)

    def renew_tokens(self, tokens: list[tuple[int, int]], comments: Mapping[int, str] | None = None) -> None:
        """The whole token timeout for tokens the map holds already (proven connections')."""
        self.token_map.renew(tokens, self.cfg.token_timeout, comments)

    def lookup_token(self, token: int) -> int | None:
        return self.token_map.lookup(token)

    def token_element(self, token: int) -> tuple[int, float] | None:
        """(mark, seconds left) of a token in the kernel map, or None."""
        return self.token_map.element(token)

    def replace_tokens(self, tokens: list[tuple[int, int]], comments: Mapping[int, str] | None = None) -> None:
        """token -> mark in place of what the map held: a server's token over a client's, or the
        reject mark for a collision (its joins are reset, whichever worker learned what)."""
        self.token_map.replace(tokens, self.cfg.token_timeout, comments)

    def delete_tokens(self, tokens: list[int]) -> None:
        self.token_map.delete(tokens)

    def read_tokens(self) -> list[tuple[int, int, float, str | None]]:
        return self.token_map.read()

    def add_subflows(self, subflows: list[tuple[tuple, int]]) -> None:
        """Join subflows that cluster peers steered (client -> VIP) and their marks, in one
        transaction: one the router moves here mid-stream keeps its backend."""
        if subflows:
            self.nft.run("\n".join(f"add element inet {self.cfg.table_name} subflows{_version(flow)} "
                                   f"{{ {_flow_key(flow)} timeout {self.cfg.token_timeout}s : 0x{mark:x} }}"
                                   for flow, mark in subflows))

    def delete_subflows(self, flows: list[tuple]) -> None:
        """Their connection ended; one that timed out meanwhile is no error."""
        commands = [f"delete element inet {self.cfg.table_name} subflows{_version(flow)} {{ {_flow_key(flow)} }}"
                    for flow in flows]
        if commands and not self.nft.try_run("\n".join(commands)):
            for command in commands:
                self.nft.try_run(command)

    def remove(self) -> None:
        self.routing.remove(self.cfg)
        self.ruleset.remove()
        snapshot.discard(self.cfg.table_name)


def _version(flow: tuple) -> int:
    return 6 if len(flow[0]) == 16 else 4


def _flow_key(flow: tuple) -> str:
    src, sport, dst, dport = flow
    return f"{ipaddress.ip_address(src)} . {sport} . {ipaddress.ip_address(dst)} . {dport}"
