"""A hostile client for the lab: raw packets from spoofed sources at a steady rate, run inside the
client's namespace (raw sockets; the addresses are 198.18.0.0/15's, reserved for benchmarks, and
the namespaces lead nowhere else). Kinds:

  capable  bare ACKs carrying MP_CAPABLE with made-up keys: each would teach a token (direct
           server return: the third ACK is all the balancer sees of a handshake)
  joins    MP_JOIN SYNs carrying random tokens: each unknown to every balancer
  replay   MP_JOIN SYNs carrying one live token (--token), each from another source and port

Prints one JSON line: packets sent, seconds, the rate reached.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import time

from .packets import ACK, SYN, mp_capable, mp_join_syn, tcp

KINDS = ("capable", "joins", "replay")
SOURCES = ipaddress.ip_network("198.18.0.0/15")
TICK = 0.01  # seconds between two bursts


def packet(kind: str, i: int, vip: str, port: int, token: int, rng: random.Random) -> bytes:
    source = str(SOURCES[1 + rng.randrange(SOURCES.num_addresses - 2)])
    sport = 1024 + rng.randrange(64000)
    if kind == "capable":
        return tcp(source, vip, sport, port, ACK, mp_capable(1, 1, rng.randbytes(8), rng.randbytes(8)),
                   seq=rng.getrandbits(32), ack=rng.getrandbits(32))
    token = rng.getrandbits(32) if kind == "joins" else token
    return tcp(source, vip, sport, port, SYN, mp_join_syn(token, nonce=i), seq=rng.getrandbits(32))


def flood(kind: str, rate: int, seconds: float, vip: str, port: int, token: int = 0, seed: int = 1) -> dict:
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    # prepared ahead, so that building packets does not slow the rate; sent round and round
    pool = [packet(kind, i, vip, port, token, rng) for i in range(min(rate * int(seconds + 1), 200_000))]
    started = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started + TICK) * rate)
        while sent < due:
            sock.sendto(pool[sent % len(pool)], (vip, 0))
            sent += 1
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    elapsed = time.monotonic() - started
    return {"kind": kind, "sent": sent, "seconds": round(elapsed, 2), "rate": round(sent / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=int, default=10_000, help="packets per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--token", type=lambda s: int(s, 0), default=0, help="replay: the live token")
    args = parser.parse_args()
    print(json.dumps(flood(args.kind, args.rate, args.seconds, args.vip, args.port, args.token)), flush=True)


if __name__ == "__main__":
    main()
