"""`mplb-nfq inspect`: MPTCP connections, keys, tokens and joins in a capture, through the same core.

dpkt reads the file (pcap or pcapng); the link layer is stripped here and every IP packet goes
through `packet.parse_ip` and, with a config, through the ruleset's model and `Balancer.decide`, as
the kernel and the worker would see it.
"""
from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

from .core.balancer import Balancer
from .core.marks import LEARNED, PROVISIONAL, REJECT
from .core.packet import TCP_ACK, TCP_SYN, Malformed, Segment, endpoint, parse_ip, token_of_key
from .core.tokens import plan_writes
from .core.verdicts import Kind, Verdict
from .kernel.ruleset import Decider, classify
from .core.settings import Config

ETHERTYPES_IP = (0x0800, 0x86DD)
VLAN_ETHERTYPES = (0x8100, 0x88A8)


def ip_payload(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet inside a link-layer frame, or None when it holds no IP."""
    if linktype == 1:  # Ethernet
        offset, ethertype = 14, int.from_bytes(frame[12:14], "big")
        while ethertype in VLAN_ETHERTYPES and len(frame) >= offset + 4:
            ethertype, offset = int.from_bytes(frame[offset + 2:offset + 4], "big"), offset + 4
        return frame[offset:] if ethertype in ETHERTYPES_IP else None
    if linktype in (101, 12, 14):  # raw IP (LINKTYPE_RAW and the DLT numbers some systems use)
        return frame
    if linktype == 113:  # Linux cooked v1
        return frame[16:] if int.from_bytes(frame[14:16], "big") in ETHERTYPES_IP else None
    if linktype == 276:  # Linux cooked v2
        return frame[20:] if int.from_bytes(frame[0:2], "big") in ETHERTYPES_IP else None
    raise ValueError(f"link type {linktype} is not supported (Ethernet, raw IP, Linux cooked are)")


class CaptureError(ValueError):
    pass


def read_packets(path: str):
    """Yield (timestamp, IP packet bytes or None) from a pcap or pcapng file."""
    import struct

    import dpkt

    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        try:
            reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
            linktype = reader.datalink()
            for ts, frame in reader:
                yield float(ts), ip_payload(linktype, frame)
        except (dpkt.dpkt.Error, struct.error, EOFError, ValueError) as e:
            raise CaptureError(f"{path}: not a readable pcap or pcapng file ({type(e).__name__}: {e or 'empty'})") from None


@dataclass
class Connection:
    id: int
    client: str
    server: str
    version: int | None = None
    client_key: bytes | None = None
    server_key: bytes | None = None
    backend: str | None = None

    def tokens(self) -> tuple[int | None, int | None]:
        def token(key):
            return token_of_key(key, self.version) if key is not None and self.version is not None else None
        return token(self.client_key), token(self.server_key)

    def as_dict(self) -> dict:
        client_token, server_token = self.tokens()
        result = {"id": self.id, "client": self.client, "server": self.server, "version": self.version,
                  "client_key": _hex(self.client_key), "server_key": _hex(self.server_key),
                  "client_token": _token(client_token), "server_token": _token(server_token)}
        if self.backend is not None:
            result["backend"] = self.backend
        return result


def _hex(key: bytes | None) -> str | None:
    return "0x" + key.hex() if key is not None else None


def _token(token: int | None) -> str | None:
    return f"0x{token:08x}" if token is not None else None


def inspect_packets(packets, cfg: Config | None = None) -> dict:
    """With a config, each packet goes through the ruleset's model (`kernel.ruleset.classify`) and,
    where the ruleset would queue it, through the core, as the worker would see it; the tokens
    the worker would write go to a stand-in for the kernel map."""
    balancer: Balancer | None = cfg.balancer() if cfg else None
    vips = {(ipaddress.ip_address(v).packed, p) for s in cfg.services for v in s.vips for p in s.ports} if cfg else set()
    deciders = None
    if cfg and cfg.handshakes == "kernel":
        tables = balancer.lookup_tables()
        deciders = {(ipaddress.ip_address(v).packed, p): Decider(tables[s.name], s.mptcp_aware)
                    for s in cfg.services for v in s.vips for p in s.ports}
    turns: Counter[int] = Counter()  # each service counter's next number, by its table
    marks: dict[tuple, int] = {}  # stands in for the conntrack mark of each flow
    originals: dict[tuple, tuple] = {}  # each conntrack entry's original direction
    token_map: dict[int, int] = {}
    by_flow: dict[tuple, Connection] = {}
    connections: list[Connection] = []
    joins: list[dict] = []
    counts = {"packets": 0, "ip": 0, "tcp": 0, "malformed": 0}
    malformed: list[dict] = []
    for number, (ts, ip) in enumerate(packets, 1):
        counts["packets"] += 1
        if ip is None:
            continue
        counts["ip"] += 1
        segment = parse_ip(ip)
        if isinstance(segment, Malformed):
            counts["malformed"] += 1
            malformed.append({"packet": number, "reason": segment.reason})
            continue
        if segment is None:
            continue
        counts["tcp"] += 1
        verdict = None
        connection = min(segment.flow, (segment.dst, segment.dport, segment.src, segment.sport))
        new = connection not in originals
        original = originals.setdefault(connection, segment.flow) == segment.flow
        if balancer is not None:
            decider = deciders.get((segment.dst, segment.dport)) if deciders else None
            turn = turns[id(decider.table)] if decider else 0
            classified = classify(segment, marks.get(connection, 0), original, new, vips, token_map, (),
                                  deciders, turn)
            if classified.copied:  # the packet went on; the worker learns from its copy
                verdict = balancer.decide(segment, classified.mark & ~LEARNED or marks.get(connection, 0), ts)
                writes = plan_writes([verdict])
                token_map.update(writes.added + writes.renew)
                if classified.copied == "copied_proof":  # the rule that copies it clears the flag
                    marks[connection] = marks.get(connection, 0) & ~PROVISIONAL
                else:
                    marks[connection] = marks.get(connection, 0) | LEARNED | (classified.mark & PROVISIONAL)
            elif classified.queued:
                verdict = balancer.decide(segment, classified.mark, ts)
                writes = plan_writes([verdict])
                token_map.update(writes.install)
                token_map.update((token, REJECT) for token in writes.reject)
                if verdict.accept and not verdict.mark & REJECT:
                    marks[connection] = verdict.mark
            elif classified.kernel_hit:
                marks[connection] = classified.mark
                verdict = Verdict(True, classified.mark, Kind.JOIN_HIT)
            elif classified.mark and new and segment.is_syn:  # decided by its service's table
                turns[id(decider.table)] += 1
                marks[connection] = classified.mark
                verdict = Verdict(True, classified.mark, Kind.MP_CAPABLE_SYN if segment.capable else Kind.SYN)
        chosen = balancer.backend_of(verdict.mark) if verdict is not None and verdict.accept else None
        _track(segment, number, by_flow, connections, joins, chosen.name if chosen else None, verdict)
    for join in joins:
        join["connection"] = _owner(join.pop("_token"), connections)
    return {"counts": counts, "connections": [c.as_dict() for c in connections], "joins": joins,
            "malformed": malformed}


def _track(segment: Segment, number: int, by_flow: dict, connections: list, joins: list,
           backend: str | None, verdict) -> None:
    flags = segment.flags & (TCP_SYN | TCP_ACK)
    forward = segment.flow
    reverse = (segment.dst, segment.dport, segment.src, segment.sport)
    if segment.join is not None:
        entry = {"packet": number, "from": endpoint(segment.src, segment.sport),
                 "to": endpoint(segment.dst, segment.dport), "token": _token(segment.join.token),
                 "_token": segment.join.token}
        if verdict is not None:
            entry["backend"] = backend if verdict.accept else None
            entry["lookup"] = verdict.kind
        joins.append(entry)
        return
    capable = segment.capable
    if capable is None:
        return
    if flags == TCP_SYN:
        conn = Connection(len(connections) + 1, endpoint(segment.src, segment.sport),
                          endpoint(segment.dst, segment.dport), capable.version, capable.sender_key)
        connections.append(conn)
        by_flow[forward] = conn
        conn.backend = backend
    elif flags == TCP_SYN | TCP_ACK and reverse in by_flow:
        by_flow[reverse].server_key = capable.sender_key
        by_flow[reverse].version = capable.version
    elif capable.receiver_key is not None and forward in by_flow:
        conn = by_flow[forward]
        conn.client_key, conn.server_key, conn.version = capable.sender_key, capable.receiver_key, capable.version


def _owner(token: int, connections: list[Connection]) -> int | str:
    for conn in connections:
        client_token, server_token = conn.tokens()
        if token == server_token or token == client_token:
            return conn.id
    return "unknown token"


def inspect_file(path: str, cfg: Config | None = None) -> dict:
    result = inspect_packets(read_packets(path), cfg)
    result["file"] = path
    return result


def render_text(result: dict) -> str:
    c = result["counts"]
    lines = [f"{result.get('file', '')}: {c['packets']} packets, {c['tcp']} TCP, {c['malformed']} malformed",
             "", "MPTCP connections:"]
    for conn in result["connections"]:
        lines.append(f"  #{conn['id']} {conn['client']} -> {conn['server']} v{conn['version']}"
                     + (f" backend {conn['backend']}" if "backend" in conn else ""))
        lines.append(f"      client key {conn['client_key']} token {conn['client_token']}")
        lines.append(f"      server key {conn['server_key']} token {conn['server_token']}")
    if not result["connections"]:
        lines.append("  (none)")
    lines.append("MP_JOIN subflows:")
    for join in result["joins"]:
        owner = join["connection"]
        owner = f"connection #{owner}" if isinstance(owner, int) else owner
        backend = f", backend {join['backend']} ({join['lookup']})" if "lookup" in join else ""
        lines.append(f"  packet {join['packet']}: {join['from']} -> {join['to']} token {join['token']}: "
                     f"{owner}{backend}")
    if not result["joins"]:
        lines.append("  (none)")
    for bad in result["malformed"]:
        lines.append(f"malformed packet {bad['packet']}: {bad['reason']}")
    return "\n".join(lines)
