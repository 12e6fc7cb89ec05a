"""Floods from a spoofing client against real MPTCP downloads: what an attacker costs real joins.

    .venv/bin/python bench/hostile.py [--dsr | --cluster] [--rate 10000] [--seconds 60] [--downloads 20] [--json]

One lab topology (2 backends, 50 Mbit/s paths, the judge on the backends; --cluster: two
balancers behind a router with ECMP, Redis, direct server return); for each flood in turn a
fresh worker on each balancer (default config: token_capacity 1,000,000, hold_max 1024,
unknown_join random) and, while the flood runs, --downloads fetches of 4 MB one after the other, each of
which opens one join from the client's second address. Floods (mplb_nfq.lab.flood, sources in
198.18.0.0/15, each packet from another address):

  none     the baseline
  capable  bare ACKs carrying MP_CAPABLE with made-up keys (each teaches a token under DSR)
  joins    MP_JOIN SYNs with random tokens (each held hold_ms, then dropped: a flood does not send again)
  replay   MP_JOIN SYNs carrying the token of a live connection (a long download's)

Per flood: packets sent and the rate reached; legitimate joins completed on their connection's
backend / attempted (backends' MPJoinAckRx against MP_CAPABLE connections), and the judge's
misrouted and late joins (foreign ones are the flood's own); the workers' RSS and CPU seconds
(summed over balancers); the kernel token maps' sizes; in a cluster Redis's RSS; held joins found / expired / pushed out; tokens provisional,
proven, pushed out. The downloads are spread over the flood, which lasts at least as long as
they do. Prints a table and, with --json, one JSON document alone on stdout. Removes
everything it started."""
import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mplb_nfq.lab.ecmp import ClusterTopology
from mplb_nfq.lab.judge import Judge
from mplb_nfq.lab.lab import PORT, WorkerProcess, config_text
from mplb_nfq.lab.netns import VIP, Topology

FLOODS = ("none", "capable", "joins", "replay")
SIZE = 4_000_000


def wait(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {seconds} s")
        time.sleep(0.1)


def status(topo: Topology, worker: WorkerProcess) -> dict:
    out = topo.exec(worker.role, sys.executable, "-m", "mplb_nfq", "status", "--json", "-c", str(worker.config_path),
                    capture_output=True).stdout
    return json.loads(out)["packets"]


def process_usage(pid: int) -> tuple[int, float]:
    """(RSS in KiB, CPU seconds) of a process, from /proc."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks (USER_HZ 100)


def token_map(topo: Topology, role: str = "lb") -> list[int]:
    listing = json.loads(topo.exec(role, "nft", "-j", "list", "map", "inet", "mplb", "tokens",
                                   capture_output=True).stdout)
    return [e[0]["elem"]["val"] for item in listing["nftables"] if "map" in item for e in item["map"].get("elem", [])]


def all_tokens(topo: Topology) -> set[int]:
    return {token for role in roles(topo) for token in token_map(topo, role)}


def counters(topo: Topology) -> dict:
    verdicts = topo.judge.verdicts()
    return {name: {**topo.nstat(name), **verdicts[name]} for name in topo.backend_names}


def delta(before: dict, after: dict, key: str) -> int:
    return sum(after[name].get(key, 0) - before[name].get(key, 0) for name in before)


def fetch(topo: Topology, size: int) -> subprocess.Popen:
    return topo.python("client", "mplb_nfq.lab.transfer", "fetch", VIP, "--port", str(PORT), "--size", str(size),
                       stdout=subprocess.PIPE, text=True)


def roles(topo: Topology) -> list[str]:
    return topo.balancer_names if isinstance(topo, ClusterTopology) else ["lb"]


def redis_rss_kib(topo: Topology) -> int | None:
    """The Redis server's resident memory (its ACL user may not run INFO)."""
    if not isinstance(topo, ClusterTopology):
        return None
    return process_usage(topo.processes["redis"].pid)[0]


def run_flood(topo: Topology, run: Path, kind: str, args) -> dict:
    workers = []
    for role in roles(topo):
        config = run / f"{kind}-{role}.toml"
        cluster = topo.cluster_config(role, "hostile") if isinstance(topo, ClusterTopology) else ""
        config.write_text(config_text("mplb", 2, run, direct_return=args.dsr or bool(cluster), cluster=cluster)
                          .replace(str(run / "control.sock"), str(run / f"{role}.sock")))
        workers.append(WorkerProcess(topo, config, run / f"{kind}-{role}.log", role))
    if isinstance(topo, ClusterTopology):
        topo.wait_announced(len(workers))
    flood = live = None
    try:
        token = 0
        if kind == "replay":  # a connection that outlives the flood: its token is replayed
            joined = delta(counters(topo), {n: {} for n in topo.backend_names}, "MPTcpExtMPJoinAckRx")
            earlier = all_tokens(topo)  # the earlier floods' connections' (a DSR entry outlives its connection)
            live = fetch(topo, int(args.seconds * 50e6 / 8 * 2))
            wait(lambda: all_tokens(topo) - earlier, 10)
            (token,) = all_tokens(topo) - earlier
            wait(lambda: -delta(counters(topo), {n: {} for n in topo.backend_names}, "MPTcpExtMPJoinAckRx")
                 > -joined, 10)  # its own join is in, before the count starts
        if kind != "none":
            flood = topo.python("client", "mplb_nfq.lab.flood", kind, "--vip", VIP, "--port", str(PORT),
                                "--rate", str(args.rate), "--seconds", str(args.seconds), "--token", hex(token),
                                stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        before = counters(topo)
        received = []
        for i in range(args.downloads):  # spread over the flood
            time.sleep(max(0.0, started + i * args.seconds / args.downloads - time.monotonic()))
            out, _ = fetch(topo, SIZE).communicate()
            received += [json.loads(line)["received"] for line in out.splitlines()]
        after = counters(topo)
        stats = [status(topo, w) for w in workers]
        usage = [process_usage(w.proc.pid) for w in workers]
        sent = {}
        if flood:
            out, _ = flood.communicate(timeout=args.seconds + 30)
            sent = json.loads(out.splitlines()[-1]) if out.strip() else {}
        map_sizes = [len(token_map(topo, role)) for role in roles(topo)]
        redis = redis_rss_kib(topo)
    finally:
        for process in (flood, live):
            if process and process.poll() is None:
                process.kill()
                process.communicate()
        for w in workers:
            w.stop()

    def total(key):
        return sum(s.get(key, 0) for s in stats)

    return {"flood": kind, "sent": sent.get("sent", 0), "rate": sent.get("rate", 0),
            "downloads_whole": sum(r == SIZE for r in received), "downloads": args.downloads,
            "joins_completed": delta(before, after, "MPTcpExtMPJoinAckRx"),
            "joins_attempted": delta(before, after, "MPTcpExtMPCapableSYNRX"),
            "misrouted": delta(before, after, "misrouted"), "late": delta(before, after, "late"),
            "foreign": delta(before, after, "foreign"), "worker_rss_kib": sum(rss for rss, _ in usage),
            "worker_cpu_s": round(sum(cpu for _, cpu in usage), 2), "token_map": sum(map_sizes),
            "redis_rss_kib": redis, "copies_lost": total("copies_lost"), "held_found": total("held_found"),
            "held_dropped_once": total("held_dropped_once"), "held_expired": total("held_expired"), "held_pushed_out": total("held_pushed_out"),
            "tokens_provisional": total("tokens_provisional"), "tokens_proven": total("tokens_proven"),
            "tokens_pushed_out": total("tokens_pushed_out")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsr", action="store_true", help="direct server return (the backends answer the client)")
    parser.add_argument("--cluster", action="store_true", help="two balancers behind ECMP, sharing through Redis")
    parser.add_argument("--rate", type=int, default=10_000, help="flood packets per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="each flood's length")
    parser.add_argument("--downloads", type=int, default=20, help="4 MB downloads during each flood")
    parser.add_argument("--floods", default=",".join(FLOODS), help="which, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with contextlib.ExitStack() as stack:
        run = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mplb-hostile-")))
        topo = stack.enter_context(ClusterTopology(backends=2, balancers=2, run_dir=run) if args.cluster
                                   else Topology(backends=2, direct_return=args.dsr))
        for name in topo.backend_names:
            topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name in topo.backend_names:
            wait(lambda: f":{PORT}" in topo.exec(name, "ss", "-Hltn", capture_output=True).stdout, 5)
        topo.judge = stack.enter_context(Judge(topo))
        for kind in args.floods.split(","):
            results.append(run_flood(topo, run, kind, args))
            print(f"{kind:8} sent {results[-1]['sent']:>7} at {results[-1]['rate']:>6}/s: joins "
                  f"{results[-1]['joins_completed']}/{results[-1]['joins_attempted']}, misrouted "
                  f"{results[-1]['misrouted']}, late {results[-1]['late']}, worker {results[-1]['worker_rss_kib']} KiB "
                  f"{results[-1]['worker_cpu_s']} CPU s, token map {results[-1]['token_map']}", file=sys.stderr)
    summary = {"mode": "cluster" if args.cluster else "dsr" if args.dsr else "routed", "rate": args.rate,
               "seconds": args.seconds,
               "floods": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
