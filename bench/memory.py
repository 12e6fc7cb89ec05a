"""Userspace memory per tracked MPTCP connection, measured with tracemalloc.

    .venv/bin/python bench/memory.py [--connections 100000]

Each connection goes through the core as the worker sees it: its SYN, then the backend's SYN-ACK
(the token is learned). Two figures: while the handshake entries (the flow table, kept for
limits.flow_timeout) are still there, and after they expired, when only the token remains.
"""
import argparse
import gc
import ipaddress
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mplb_nfq.lab.packets import ACK, SYN, mp_capable, tcp  # noqa: E402

from mplb_nfq.core.balancer import Backend, Balancer, Service  # noqa: E402
from mplb_nfq.core.packet import parse_ip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=100_000)
    n = parser.parse_args().connections
    backends = [Backend(f"b{i}", (f"10.0.9.{i}",), 0x100 + i, 1000 + i) for i in range(4)]
    vip = ipaddress.ip_address("10.0.100.1").packed
    lb = Balancer([Service("web", (vip,), (80,), backends)], flow_capacity=2 * n, token_capacity=2 * n,
                  flow_ttl=60, token_ttl=7200)
    packets = []
    for i in range(n):
        client = str(ipaddress.ip_address("10.1.0.0") + i // 50000)
        port = 1024 + i % 50000
        key = i.to_bytes(8, "big")
        packets.append((parse_ip(tcp(client, "10.0.100.1", port, 80, SYN, mp_capable())),
                        parse_ip(tcp("10.0.100.1", client, 80, port, SYN | ACK, mp_capable(1, 1, key)))))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i, (syn, synack) in enumerate(packets):
        mark = lb.decide(syn, 0, 0.0).mark
        lb.decide(synack, mark, 0.0)
    del packets, syn, synack
    gc.collect()
    with_flows = tracemalloc.get_traced_memory()[0] - base
    lb.flows.expire(61.0)
    gc.collect()
    tokens_only = tracemalloc.get_traced_memory()[0] - base
    print(f"{n} connections: {len(lb.tokens)} tokens, {len(lb.flows)} flows left")
    print(f"during the handshake window: {with_flows / n:.0f} bytes per connection")
    print(f"tracked (token only):        {tokens_only / n:.0f} bytes per connection")


if __name__ == "__main__":
    main()
