"""CPU cost of the pure core per handshake packet (parse + decide), without the kernel.

    .venv/bin/python bench/core_cost.py [--n 200000]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mplb_nfq.lab.packets import ACK, CLIENT_KEY, SERVER_KEY, SYN, mp_capable, mp_join_syn, tcp  # noqa: E402

from mplb_nfq.core.balancer import Backend, Balancer, Service  # noqa: E402
from mplb_nfq.core.packet import parse_ip, token_of_key  # noqa: E402

OPTIONS = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07"  # mss, sackOK, TS, wscale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    n = parser.parse_args().n
    backends = [Backend(f"b{i}", (f"10.0.9.{i}",), 0x100 + i, 1000 + i) for i in range(4)]
    service = Service("web", (bytes([10, 0, 100, 1]),), (80,), backends)
    token = token_of_key(SERVER_KEY, 1)
    cases = {
        "MP_CAPABLE SYN": [tcp("10.0.1.2", "10.0.100.1", 1024 + i % 60000, 80, SYN, OPTIONS + mp_capable())
                           for i in range(1000)],
        "third ACK": [tcp("10.0.1.2", "10.0.100.1", 1024 + i % 60000, 80, ACK,
                          b"\x01\x01\x08\x0a" + bytes(8) + mp_capable(1, 1, CLIENT_KEY, SERVER_KEY))
                      for i in range(1000)],
        "MP_JOIN SYN": [tcp("10.0.2.2", "10.0.100.1", 1024 + i % 60000, 80, SYN, OPTIONS + mp_join_syn(token))
                        for i in range(1000)],
    }
    print(f"{'packet':16} {'parse µs':>9} {'parse+decide µs':>16}")
    for name, packets in cases.items():
        lb = Balancer([service], flow_capacity=10_000)
        lb.decide(parse_ip(cases["third ACK"][0]), 0x100, 0)
        started = time.perf_counter()
        for i in range(n):
            parse_ip(packets[i % 1000])
        parse_us = (time.perf_counter() - started) / n * 1e6
        started = time.perf_counter()
        for i in range(n):
            lb.decide(parse_ip(packets[i % 1000]), 0x100, i * 1e-6)
        total_us = (time.perf_counter() - started) / n * 1e6
        print(f"{name:16} {parse_us:9.2f} {total_us:16.2f}")


if __name__ == "__main__":
    main()
