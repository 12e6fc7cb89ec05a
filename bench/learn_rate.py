"""Tokens one worker learns per second of its own CPU: copies of MP_CAPABLE SYN-ACKs read from
nflog (CopyReader), the core's decision and token (TokenStore.learn), written to a kernel token
map in one transaction per batch (TokenMap), in a network namespace of its own.

    .venv/bin/python bench/learn_rate.py [CONNECTIONS] [ROUNDS]

A sender process writes forged SYN-ACKs (each with its own server key) through a raw socket;
the ruleset copies each to nflog with a backend's mark and drops it (a veth pair gives them a route).
Each round is a fresh learner on an emptied map (the figure moves by ±5% from one to the next,
3 rounds by default). Prints one JSON line: the median round's figures (the upper one of an even count), and every
round's rate."""
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mplb_nfq.lab.packets import ACK, SYN, mp_capable, tcp  # noqa: E402

NAMESPACE, GROUP, TABLE, VIP, PORT, MARK = "mplb-bench-learn", 7, "mplb_learn", "10.0.100.1", 5201, 0x101
RULESET = f"""table inet {TABLE} {{
    map tokens {{ typeof tcp option @30,32,32 : meta mark ; size 2000000 ; flags timeout ; }}
    chain out {{
        type filter hook output priority mangle; policy accept;
        ip saddr {VIP} meta mark set {MARK} log group {GROUP} snaplen 128 drop
    }}
}}
"""
SENDER = """
import socket, sys
packets = [bytes.fromhex(line) for line in sys.stdin.read().split()]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for packet in packets:
    try:
        s.sendto(packet, ("10.0.1.2", 0))
    except PermissionError:  # the ruleset dropped it, once copied
        pass
"""


def learner(connections: int) -> dict:
    import ipaddress
    import logging

    from mplb_nfq.core.balancer import Backend, Balancer, Service
    from mplb_nfq.kernel.copies import CopyReader
    from mplb_nfq.kernel.tokenmap import TokenMap
    from mplb_nfq.ops.logs import ThrottledLog
    from mplb_nfq.ops.tokenstore import TokenStore

    class KernelMap:  # the dataplane's token calls, on the real map
        def __init__(self):
            self.map = TokenMap(TABLE)

        def add_tokens(self, tokens, comments=None, timeout=None):
            return self.map.add(tokens, timeout or 600, comments)

        def lookup_token(self, token):
            return self.map.lookup(token)

        def replace_tokens(self, tokens, comments=None):
            self.map.replace(tokens, 600, comments)

    backends = [Backend("b1", ("10.0.9.11",), 0x100, 100), Backend("b2", ("10.0.9.12",), MARK, 101)]
    balancer = Balancer([Service("s", (ipaddress.ip_address(VIP).packed,), (PORT,), backends)])
    stats: Counter = Counter()
    store = TokenStore(balancer, KernelMap(), stats, ThrottledLog(logging.getLogger("bench")))
    reader = CopyReader(GROUP, 128)
    packets = [tcp(VIP, f"10.0.1.{2 + i % 200}", PORT, 1024 + i // 200, SYN | ACK,
                   mp_capable(1, 1, (i + 1).to_bytes(8, "big"))) for i in range(connections)]
    with tempfile.TemporaryFile("w+") as forged:  # written before the clock starts: not the learner's work
        forged.write("\n".join(p.hex() for p in packets))
        forged.seek(0)
        sender = subprocess.Popen([sys.executable, "-c", SENDER], stdin=forged, text=True)
        cpu_before, started = time.process_time(), time.monotonic()
    while stats["copies"] < connections and time.monotonic() - started < 60:
        if select.select([reader], [], [], 1.0)[0]:
            store.learn(reader, 256)
    cpu = time.process_time() - cpu_before
    sender.wait()
    return {"connections": connections, "copies": stats["copies"], "copies_lost": stats["copies_lost"],
            "tokens_installed": stats["tokens_installed"], "cpu_seconds": round(cpu, 3),
            "tokens_per_cpu_second": round(stats["tokens_installed"] / cpu),
            "wall_seconds": round(time.monotonic() - started, 3)}


def main() -> None:
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if os.environ.get("MPLB_LEARN_INSIDE"):
        if os.environ.get("MPLB_LEARN_PROFILE"):
            import cProfile
            cProfile.runctx("learner(connections)", globals(), locals(), sort="tottime")
            return
        print(json.dumps(learner(connections)))
        return
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    try:
        inside = ["ip", "netns", "exec", NAMESPACE]
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                        ["ip", "link", "set", "d0", "up"], ["ip", "link", "set", "d1", "up"], ["ip", "address", "add", "10.0.1.1/24", "dev", "d0"]):
            subprocess.run(inside + command, check=True)
        subprocess.run(inside + ["nft", "-f", "-"], input=RULESET, text=True, check=True)
        results = []
        for _ in range(rounds):
            subprocess.run(inside + ["nft", "flush", "map", "inet", TABLE, "tokens"], check=True)
            learned = subprocess.run(inside + [sys.executable, __file__, str(connections)], check=True, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "MPLB_LEARN_INSIDE": "1"})
            results.append(json.loads(learned.stdout.splitlines()[-1]))
        median = sorted(results, key=lambda r: r["tokens_per_cpu_second"])[len(results) // 2]
        print(json.dumps({**median, "rounds": [r["tokens_per_cpu_second"] for r in results]}))
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)


if __name__ == "__main__":
    main()
