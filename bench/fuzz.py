"""Fuzz campaign: random and mutated inputs through the parser and the balancer, in parallel.

    .venv/bin/python bench/fuzz.py [--inputs 1000000] [--seed 1]

Inputs: mutations (byte flips, truncations, option splices) of every packet of the real
captures in tests/captures, of generated MPTCP handshake packets, and plain random bytes. A crash
is any exception out of parse_ip or Balancer.decide; the campaign stops at the first and prints
the input. The fast subset runs in the test suite (tests/test_property.py).
"""
import argparse
import multiprocessing
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mplb_nfq.lab.packets import ACK, CLIENT_KEY, SERVER_KEY, SYN, mp_capable, mp_join_syn, tcp  # noqa: E402

from mplb_nfq.core.balancer import Backend, Balancer, Service  # noqa: E402
from mplb_nfq.core.packet import Malformed, Segment, parse_ip  # noqa: E402
from mplb_nfq.inspect import read_packets  # noqa: E402


def corpus() -> list[bytes]:
    seeds = [ip for pcap in sorted((ROOT / "tests" / "captures").glob("*.pcap"))
             for _, ip in read_packets(str(pcap)) if ip]
    seeds += [tcp("10.0.1.2", "10.0.100.1", 40000, 80, SYN, mp_capable()),
              tcp("10.0.1.2", "10.0.100.1", 40000, 80, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY)),
              tcp("10.0.100.1", "10.0.1.2", 80, 40000, SYN | ACK, mp_capable(1, 1, SERVER_KEY)),
              tcp("10.0.2.2", "10.0.100.1", 40001, 80, SYN, mp_join_syn(0x12345678)),
              tcp("2001:db8::2", "2001:db8::1", 40000, 80, SYN, mp_capable(0, 0x81, CLIENT_KEY))]
    return seeds


def balancer(seeds: list[bytes], rng: random.Random) -> Balancer:
    parsed = [s for s in map(parse_ip, seeds) if isinstance(s, Segment)]
    vips = tuple({s.dst for s in parsed} | {s.src for s in parsed})
    ports = tuple({s.dport for s in parsed} | {s.sport for s in parsed})
    backends = [Backend(f"b{i}", (f"10.0.9.{i}",), 0x100 + i, 1000 + i) for i in range(3)]
    return Balancer([Service("fuzz", vips, ports, backends, "maglev", "random", True, 30)],
                    flow_capacity=10_000, token_capacity=10_000, rng=rng)


def mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.45 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.6:
            data = data[:rng.randint(0, len(data))]
        elif choice < 0.75 and len(data) > 40:  # splice a random option-like run into the TCP header
            at = rng.randint(20, min(len(data), 60))
            kind = rng.choice([0, 1, 2, 30, 30, 30])
            data[at:at] = bytes([kind, rng.randrange(48)]) + rng.randbytes(rng.randrange(12))
        elif choice < 0.85:
            other = rng.choice(seeds)
            cut = rng.randint(0, min(len(data), len(other)))
            data = data[:cut] + other[cut:]
        else:
            data = bytearray(rng.randbytes(rng.randrange(80)))
    return bytes(data)


def campaign(args: tuple[int, int]) -> tuple[int, dict, str | None]:
    seed, count = args
    rng = random.Random(seed)
    seeds = corpus()
    lb = balancer(seeds, rng)
    outcomes = {"segment": 0, "malformed": 0, "not_tcp": 0}
    for i in range(count):
        data = mutate(rng, rng.choice(seeds), seeds)
        try:
            result = parse_ip(data)
            lb.decide(result, rng.choice((0, 0x100, 0x101 | 0x40000000)), i * 1e-3)
        except Exception as e:  # a crash: report the input
            return i, outcomes, f"{type(e).__name__}: {e}; input {data.hex()}"
        outcomes["malformed" if isinstance(result, Malformed) else "not_tcp" if result is None else "segment"] += 1
    return count, outcomes, None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    workers = multiprocessing.cpu_count()
    share = args.inputs // workers
    started = time.monotonic()
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(campaign, [(args.seed * 1000 + i, share) for i in range(workers)])
    elapsed = time.monotonic() - started
    total = sum(r[0] for r in results)
    outcomes = {k: sum(r[1][k] for r in results) for k in results[0][1]}
    crashes = [r[2] for r in results if r[2]]
    print(f"{total} inputs in {elapsed:.1f} s ({total / elapsed:,.0f}/s on {workers} processes): {outcomes}")
    for crash in crashes:
        print("CRASH", crash)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
