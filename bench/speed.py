"""Speed of the data path, side by side in one run, on the lab topology without rate limits.

    .venv/bin/python bench/speed.py [--only handshake,delay,bulk,queue,memory] [--rounds N]
                                    [--bulk-rounds N] [--json]

0. handshake: the time to fetch a small object (connect, ask, 1 KB back) at 50 and 1,000
   fetches/s, p50 and p99, plain TCP and MPTCP, through plain forwarding, mplb-nfq (the kernel
   decides), mplb-nfq with handshakes = "queue" (every handshake held for the worker) and HAProxy
   (mode tcp, made MPTCP with mptcpize); connections per second each sustains; packets queued
   per MPTCP connection; with --json, one JSON document whose `summary` holds the ratios;
1. queued handshake packets per second, one worker, against the binding's floor (a worker that
   accepts without looking) and two steps between them (the floor reading the payload and
   setting a mark; and parsing it too): a generator in the client namespace floods MP_CAPABLE
   SYNs, third ACKs and MP_JOIN SYNs;
2. added delay, p50 and p99, at low and high connection rates, against the same path with nothing
   queued, and the share of it that the binding's floor costs on its own: of a queued SYN alone
   (a plain TCP connect: its SYN-ACK is not queued), and of an MPTCP handshake (the SYN and the
   SYN-ACK, which carries the server's key, are both queued);
3. bulk throughput and CPU per GB through the LB against plain forwarding, against the design's
   kernel mechanisms alone (conntrack mark and policy routing) and against HAProxy, and the
   packets that reached userspace during a 100 MB transfer;
4. userspace memory per tracked connection (bench/memory.py).
"""
import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from mplb_nfq.lab.packets import ACK, CLIENT_KEY, SYN, mp_capable, mp_join_syn, tcp  # noqa: E402

from mplb_nfq.lab.lab import PORT, WorkerProcess, config_text  # noqa: E402
from mplb_nfq.lab.netns import VIP, Topology, backend_address  # noqa: E402
from mplb_nfq.ops.config import load as load_config  # noqa: E402

MB = 1_000_000


def handshake_flood(flows: int, first_port: int) -> list[bytes]:
    """Per flow: a SYN, its third ACK, a join (unknown token). New ports each time: fresh flows."""
    packets = []
    for i in range(flows):
        client, port = f"10.0.{1 + i % 2}.{50 + i // 2 % 150}", first_port + i // 300
        key = (i + 1).to_bytes(8, "big")
        packets += [tcp(client, VIP, port, PORT, SYN, mp_capable()),
                    tcp(client, VIP, port, PORT, ACK, mp_capable(1, 1, CLIENT_KEY, key), seq=1001, ack=1),
                    tcp(f"10.0.3.{50 + i // 2 % 150}", VIP, port, PORT, SYN, mp_join_syn(0x20000000 + i))]
    return packets


def flood(topo, packets, seconds) -> subprocess.Popen:
    proc = topo.popen("client", sys.executable, str(BENCH.parent / "tests" / "inject.py"), "--repeat", "1",
                      "--seconds", str(seconds), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write("\n".join(p.hex() for p in packets) + "\n")
    proc.stdin.close()
    return proc


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def measure_rate(topo, pid, first_port, seconds=3.0, settle=1.0) -> tuple[float, float, float, float]:
    """Packets the queue's consumer (process pid) handled while the generator saturates it with
    fresh flows (a flow whose SYN was decided is steered by its conntrack mark, not queued
    again): per second of wall time, and per second of the consumer's own CPU time (what one
    core given to it alone would do: the generator and the backends share this machine's two);
    then its user and system CPU µs per packet (the kernel forwards each packet, and answers
    it from a backend, inside the verdict's system call)."""
    gen = flood(topo, handshake_flood(60000, first_port), settle + seconds + 1)
    time.sleep(settle)
    first, started, (user, system) = queued_total(pid), time.monotonic(), cpu_times(pid)
    time.sleep(seconds)
    handled = max(queued_total(pid) - first, 1)
    user_after, system_after = cpu_times(pid)
    cpu = max(user_after - user + system_after - system, 0.01)
    gen.wait(timeout=60)
    return (handled / (time.monotonic() - started), handled / cpu, (user_after - user) / handled * 1e6,
            (system_after - system) / handled * 1e6)


def queued_total(pid: int) -> int:
    """Packets queue 0 has handed out (id_sequence), read in the namespace of process pid."""
    for line in Path(f"/proc/{pid}/net/netfilter/nfnetlink_queue").read_text().splitlines():
        fields = line.split()
        if fields[0] == "0":
            return int(fields[7])
    return 0


RATE_ARMS = {  # name -> floor.py's mode (None: the worker itself), and what the arm stands for
    "worker": (None, "the worker"),
    "floor": ("accept", "the binding's floor (accepts without looking)"),
    "mark": ("mark", "floor + reading the payload and setting a backend's mark (a compiled decision, at best)"),
    "parse": ("parse", "floor + our parser + the mark"),
}


def queue_rates(topo, run: Path, rounds: int = 3) -> dict:
    """The worker, the floor and the two steps between them in turn, `rounds` times each (this
    machine drifts from second to second); the medians, and every round."""
    config = run / "mplb.toml"
    config.write_text(config_text("mplb", 2, run, extra="[limits]\nflow_capacity = 100000\n"))
    mark = hex(load_config(str(config)).backends[0].mark)
    topo.exec("lb", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_be_liberal=1")
    measured: dict[str, list[tuple[float, float, float, float]]] = {arm: [] for arm in RATE_ARMS}
    first_port = 1024
    for _ in range(rounds):
        for arm, (mode, _) in RATE_ARMS.items():  # fresh ports each time: new flows, queued again
            worker = WorkerProcess(topo, config, run / "worker.log")
            if mode is None:
                measured[arm].append(measure_rate(topo, worker.proc.pid, first_port))
                worker.stop()
            else:
                with floor_instead_of(worker, topo, config, mode, mark) as floor_proc:
                    measured[arm].append(measure_rate(topo, floor_proc.pid, first_port))
            first_port += 200
    topo.exec("lb", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_be_liberal=0")
    medians = {arm: [statistics.median(r[k] for r in rates) for k in range(4)] for arm, rates in measured.items()}
    floor_wall, floor_cpu, floor_user, floor_system = medians["floor"]
    print(f"queued handshake packets/s, median of {rounds} rounds: per second of wall time, per second of the "
          f"process's own CPU (of the floor's), CPU µs per packet user + system", flush=True)
    report = {}
    for arm, (wall, cpu, user, system) in medians.items():
        print(f"  {wall:8,.0f} {cpu:8,.0f} ({cpu / floor_cpu:4.0%}) {user:5.1f} + {system:4.1f}  "
              f"{RATE_ARMS[arm][1]}", flush=True)
        report[arm] = {"pps": round(wall), "per_cpu_second": round(cpu), "of_floor": round(wall / floor_wall, 3),
                       "of_floor_per_cpu_second": round(cpu / floor_cpu, 3), "user_us": round(user, 1),
                       "system_us": round(system, 1), "rounds": [[round(x, 1) for x in r] for r in measured[arm]]}
    print(f"  80% of the floor's rate per CPU-second leaves {1.25 * (floor_user + floor_system):.1f} µs per packet "
          f"in all", flush=True)
    return report


@contextlib.contextmanager
def floor_instead_of(worker: WorkerProcess, topo, config: Path, mode: str = "accept", mark: str = "0"):
    """The binding's floor (or a step up from it, bench/floor.py's mode) on the worker's queue
    and ruleset: the worker is killed (its ruleset stays), the floor worker started; at the end,
    the floor stopped and the ruleset removed."""
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    floor_proc = topo.popen("lb", sys.executable, str(BENCH / "floor.py"), "0", mode, mark, stdout=subprocess.PIPE,
                            text=True)
    floor_proc.stdout.readline()
    try:
        yield floor_proc
    finally:
        floor_proc.send_signal(signal.SIGTERM)
        floor_proc.wait(timeout=10)
        topo.exec("lb", sys.executable, "-m", "mplb_nfq", "cleanup", "-c", str(config))


def latency(topo, count, rate, threads, protocol, fetch_bytes: int = 0) -> dict:
    out = topo.exec("client", sys.executable, str(BENCH / "connect_latency.py"), VIP, str(PORT), str(count),
                    str(rate), str(threads), protocol, str(fetch_bytes), capture_output=True).stdout
    return json.loads(out)


HAPROXY_CONFIG = """global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend vip
    bind {vip}:{port}
    default_backend servers
backend servers
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def haproxy(topo, run: Path):
    """The user's alternative on the LB: Debian's HAProxy in mode tcp, its sockets made MPTCP by
    mptcpize, listening on the VIP (an address of the LB here); it ends MPTCP at the LB and opens
    its own connection to a backend."""
    servers = "\n".join(f"    server b{i + 1} {backend_address(i)}:{PORT}" for i in range(topo.backends))
    config = run / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(vip=VIP, port=PORT, servers=servers))
    topo.exec("lb", "ip", "address", "add", f"{VIP}/32", "dev", "lo")
    proc = topo.popen("lb", "mptcpize", "run", "haproxy", "-db", "-f", str(config), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while f"{VIP}:{PORT}" not in topo.exec("lb", "ss", "-Hltn", capture_output=True).stdout:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("haproxy did not start listening")
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        topo.exec("lb", "ip", "address", "del", f"{VIP}/32", "dev", "lo")


FETCH_BYTES = 1024
FETCH_LOADS = {"50": (300, 50, 1), "1000": (3000, 1000, 2)}  # fetches, per second, client threads
HANDSHAKE_ARMS = {"plain": "plain forwarding (5-tuple multipath route over the backends)", "lb": "mplb-nfq (the kernel decides)",
                  "queue": 'mplb-nfq, handshakes = "queue"', "haproxy": "HAProxy (mode tcp, mptcpize)"}


def spread_route(topo, action: str) -> None:
    """Plain forwarding over every backend, as the balancers spread their connections: a
    multipath route hashed on the 5-tuple (a kernel-only L4 balancer; a join may land elsewhere
    and be reset, which costs a 1 KB fetch nothing)."""
    if action == "add":
        topo.exec("lb", "sysctl", "-q", "-w", "net.ipv4.fib_multipath_hash_policy=1")
        hops = [word for i in range(topo.backends) for word in ("nexthop", "via", backend_address(i))]
        topo.exec("lb", "ip", "route", "add", f"{VIP}/32", *hops)
    else:
        topo.exec("lb", "ip", "route", "del", f"{VIP}/32")
        topo.exec("lb", "sysctl", "-q", "-w", "net.ipv4.fib_multipath_hash_policy=0")


@contextlib.contextmanager
def arm_running(topo, run: Path, arm: str):
    if arm == "plain":
        spread_route(topo, "add")
        try:
            yield
        finally:
            spread_route(topo, "del")
    elif arm == "haproxy":
        with haproxy(topo, run):
            yield
    else:
        config = run / f"{arm}.toml"
        config.write_text(config_text("mplb", 2, run, kernel='handshakes = "queue"\n' if arm == "queue" else ""))
        worker = WorkerProcess(topo, config, run / f"{arm}.log")
        try:
            yield
        finally:
            worker.stop()


def handshake(topo, run: Path, rounds: int = 3) -> dict:
    """Every arm in turn, `rounds` times (this machine drifts): small fetches at each load, then
    connects as fast as four client threads go; the percentiles over all rounds' samples."""
    samples: dict[tuple[str, str, str], list[int]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    queued = {"lb": [0, 0], "queue": [0, 0]}  # packets queued during MPTCP fetches, MPTCP fetches
    for _ in range(rounds):
        for arm in HANDSHAKE_ARMS:
            with arm_running(topo, run, arm):
                time.sleep(1)
                for protocol in ("tcp", "mptcp"):
                    before = nft_queued(topo) if arm in queued else 0
                    for load, (count, rate, threads) in FETCH_LOADS.items():
                        result = latency(topo, count, rate, threads, protocol, FETCH_BYTES)
                        samples.setdefault((arm, protocol, load), []).extend(result["samples_us"])
                    if arm in queued and protocol == "mptcp":
                        queued[arm][0] += nft_queued(topo) - before
                        queued[arm][1] += sum(count for count, _, _ in FETCH_LOADS.values())
                    rates.setdefault((arm, protocol), []).append(latency(topo, 3000, 0, 4, protocol)["rate"])
    report: dict = {"fetch": {}, "connections_per_s": {}}
    for protocol in ("tcp", "mptcp"):
        for load in FETCH_LOADS:
            cut = {arm: percentiles(samples[arm, protocol, load]) for arm in HANDSHAKE_ARMS}
            report["fetch"][f"{protocol}_{load}"] = {arm: {k: round(v) for k, v in c.items()} for arm, c in cut.items()}
            line = ", ".join(f"{arm} {c['p50_us']:.0f} / {c['p99_us']:.0f}" for arm, c in cut.items())
            print(f"fetch of 1 KB, {protocol}, {load}/s, p50 / p99 µs ({rounds} rounds, "
                  f"{len(samples['plain', protocol, load])} per arm): {line}", flush=True)
        report["connections_per_s"][protocol] = {arm: round(statistics.median(rates[arm, protocol]))
                                                 for arm in HANDSHAKE_ARMS}
        print(f"{protocol} connections/s (median of {rounds}): " + ", ".join(
            f"{arm} {n}" for arm, n in report["connections_per_s"][protocol].items()), flush=True)
    report["queued_per_mptcp_connection"] = {arm: round(n / max(total, 1), 3) for arm, (n, total) in queued.items()}
    print(f"packets queued per MPTCP connection: {report['queued_per_mptcp_connection']}", flush=True)

    def ratio(arm: str, protocol: str, q: str) -> float:
        fetches = report["fetch"][f"{protocol}_1000"]
        return round(fetches[arm][q] / fetches["plain"][q], 3)

    cps = report["connections_per_s"]
    report["summary"] = {
        "mptcp_fetch_p50_ratio": ratio("lb", "mptcp", "p50_us"), "mptcp_fetch_p99_ratio": ratio("lb", "mptcp", "p99_us"),
        "tcp_fetch_p99_ratio": ratio("lb", "tcp", "p99_us"),
        "queue_mode_mptcp_fetch_p99_ratio": ratio("queue", "mptcp", "p99_us"),
        "haproxy_mptcp_fetch_p99_ratio": ratio("haproxy", "mptcp", "p99_us"),
        "queued_per_mptcp_connection": report["queued_per_mptcp_connection"]["lb"],
        "tcp_connections_per_s_ratio": round(cps["tcp"]["lb"] / cps["tcp"]["plain"], 3),
        "mptcp_connections_per_s_ratio": round(cps["mptcp"]["lb"] / cps["mptcp"]["plain"], 3),
        "haproxy_mptcp_connections_per_s_ratio": round(cps["mptcp"]["haproxy"] / cps["mptcp"]["plain"], 3),
    }
    print(f"summary at 1,000 fetches/s (LB / plain forwarding): {json.dumps(report['summary'])}", flush=True)
    return report


def fetch(topo, size) -> float:
    out = topo.exec("client", sys.executable, "-m", "mplb_nfq.lab.transfer", "fetch", VIP, "--port", str(PORT),
                    "--size", str(size), capture_output=True).stdout
    return json.loads(out)["mbit_s"]


def nft_queued(topo) -> int:
    data = json.loads(topo.exec("lb", "nft", "-j", "list", "counters", "table", "inet", "mplb",
                                capture_output=True).stdout)
    return sum(c["counter"]["packets"] for c in data["nftables"] if "counter" in c
               and c["counter"]["name"].startswith("queued_"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="handshake,delay,bulk,queue,memory", help="comma-separated parts to run")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document alone on "
                        "stdout (the lines a person reads go to stderr)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the handshake part")
    parser.add_argument("--bulk-rounds", type=int, default=30, help="rounds of the bulk part")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = measure(set(args.only.split(",")), args.rounds, args.bulk_rounds)
    print(json.dumps(report))


def measure(parts: set[str], rounds: int, bulk_rounds: int) -> dict:
    report = {}
    with Topology(rate_mbit=None) as topo, tempfile.TemporaryDirectory(prefix="mplb-bench-") as tmp:
        run = Path(tmp)
        for name in topo.backend_names:
            topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT), stdout=subprocess.DEVNULL)
        time.sleep(1)
        config = run / "lat.toml"
        config.write_text(config_text("mplb", 2, run))
        if "handshake" in parts:
            report["handshake"] = handshake(topo, run, rounds)
            report["summary"] = report["handshake"].pop("summary")
        if "delay" in parts:
            report["handshake_delay"] = handshake_delay(topo, config, run)
        if "bulk" in parts:
            report["bulk"] = bulk(topo, config, run, bulk_rounds)
        if "queue" in parts:
            report["queue"] = queue_rates(topo, run)
    if "memory" in parts:
        memory = subprocess.run([sys.executable, str(BENCH / "memory.py")], capture_output=True, text=True).stdout
        print(memory.strip())
        report["memory"] = memory.strip().splitlines()
    return report


def plain_route(topo, action: str) -> None:
    """The same path with nothing queued: a fixed route to one backend, no ruleset."""
    topo.exec("lb", "ip", "route", action, f"{VIP}/32", "via", backend_address(0))


MECHANISMS_TABLE, MECHANISMS_MARK = 1999, 0x1ff
MECHANISMS_RULESET = f"""table inet mplb_bench_mechanisms {{
    chain steer {{
        type filter hook prerouting priority mangle; policy accept;
        ct direction original ct mark != 0 meta mark set ct mark
        ct state new ct direction original ip daddr {VIP} ct mark set {MECHANISMS_MARK} meta mark set {MECHANISMS_MARK}
    }}
}}
"""


CONNTRACK_RULESET = """table inet mplb_bench_conntrack {
    chain track {
        type filter hook prerouting priority mangle; policy accept;
        ct direction original ct mark != 0 meta mark set ct mark
    }
}
"""


def conntrack_only(topo, action: str) -> None:
    """The first of the mechanisms alone: every packet tracked by conntrack (a rule that reads
    its mark makes the namespace track), routed as plain forwarding is, with no fwmark rule."""
    if action == "add":
        topo.exec("lb", "nft", "-f", "-", input=CONNTRACK_RULESET)
        plain_route(topo, "add")
    else:
        plain_route(topo, "del")
        topo.exec("lb", "nft", "delete", "table", "inet", "mplb_bench_conntrack")


def mechanisms_only(topo, action: str) -> None:
    """What the design's kernel mechanisms cost with no balancing in them: conntrack, its mark
    given back to each packet of the client's direction, and a fwmark rule to one backend's
    table; nothing classified, nothing queued."""
    if action == "add":
        topo.exec("lb", "nft", "-f", "-", input=MECHANISMS_RULESET)
        topo.exec("lb", "ip", "route", "add", f"{VIP}/32", "via", backend_address(0), "table", str(MECHANISMS_TABLE))
        topo.exec("lb", "ip", "rule", "add", "fwmark", hex(MECHANISMS_MARK), "lookup", str(MECHANISMS_TABLE))
    else:
        topo.exec("lb", "ip", "rule", "del", "fwmark", hex(MECHANISMS_MARK), "lookup", str(MECHANISMS_TABLE))
        topo.exec("lb", "ip", "route", "flush", "table", str(MECHANISMS_TABLE))
        topo.exec("lb", "nft", "delete", "table", "inet", "mplb_bench_mechanisms")


CONNECTS = {"tcp": "a queued SYN (TCP connect)", "mptcp": "an MPTCP handshake (SYN and SYN-ACK queued)"}
LOADS = {"low": (300, 50, 1), "high": (3000, 1000, 2)}  # connections, per second, client threads


def handshake_delay(topo, config, run, rounds: int = 5) -> dict:
    """Connect times through the worker, through the binding's floor on the same ruleset (what
    NFQUEUE and the binding cost), and on a plain route, in `rounds` interleaved rounds (this
    machine drifts); the percentiles of each arm over all its rounds' connects (the p99 of one
    round's few hundred connects is mostly noise), and the added delay: the worker's minus the
    plain route's."""
    samples: dict[tuple[str, str, str], list[int]] = {}  # (arm, protocol, load) -> connect times, µs
    rates: dict[tuple[str, str, str], list[float]] = {}

    def every_case(arm: str) -> None:
        for protocol in CONNECTS:
            for load in LOADS:
                result = latency(topo, *LOADS[load], protocol)
                samples.setdefault((arm, protocol, load), []).extend(result["samples_us"])
                rates.setdefault((arm, protocol, load), []).append(result["rate"])

    for _ in range(rounds):
        worker = WorkerProcess(topo, config, run / "lat.log")
        every_case("worker")
        with floor_instead_of(worker, topo, config):
            every_case("floor")
        plain_route(topo, "add")
        every_case("plain")
        plain_route(topo, "del")
    report = {}
    for protocol in CONNECTS:
        for load in LOADS:
            ours, floor, base = [percentiles(samples[arm, protocol, load]) for arm in ("worker", "floor", "plain")]
            added = {q: ours[q] - base[q] for q in ("p50_us", "p99_us")}
            by_floor = {q: floor[q] - base[q] for q in ("p50_us", "p99_us")}
            rate = statistics.fmean(rates["worker", protocol, load])
            report[f"{protocol}_{load}"] = {"rate": round(rate), "connects": len(samples["worker", protocol, load]),
                                            **{k: round(v) for k, v in added.items()},
                                            "floor_added": {k: round(v) for k, v in by_floor.items()},
                                            "worker": ours, "floor": floor, "plain": base}
            print(f"added delay of {CONNECTS[protocol]} at {rate:.0f} conn/s ({rounds} rounds, "
                  f"{len(samples['worker', protocol, load])} connects per arm): p50 {added['p50_us']:.0f} µs, "
                  f"p99 {added['p99_us']:.0f} µs; the binding's floor alone adds p50 {by_floor['p50_us']:.0f} µs, "
                  f"p99 {by_floor['p99_us']:.0f} µs (connect p50 / p99: worker {ours['p50_us']:.0f} / "
                  f"{ours['p99_us']:.0f}, floor {floor['p50_us']:.0f} / {floor['p99_us']:.0f}, plain "
                  f"{base['p50_us']:.0f} / {base['p99_us']:.0f} µs)", flush=True)
    return report


def percentiles(connect_times: list[int]) -> dict:
    cuts = statistics.quantiles(connect_times, n=100)
    return {"p50_us": cuts[49], "p99_us": cuts[98]}


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (all but idle and iowait)."""
    user, nice, system, _, _, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measured_fetch(topo, size) -> tuple[float, float]:
    """Mbit/s, and the machine's CPU seconds per GB moved (sender, forwarding and receiver alike)."""
    before = busy_seconds()
    mbit = fetch(topo, size)
    return mbit, (busy_seconds() - before) / (size / 1e9)


def bulk(topo, config, run, rounds: int = 30, size: int = 1000 * MB) -> dict:
    """Rounds of five transfers, interleaved so that drift on this shared machine hits all
    alike: plain forwarding; conntrack alone; the design's kernel mechanisms alone (conntrack, its
    mark, a fwmark rule: what any conntrack-and-policy-routing balancer pays); through the LB;
    through HAProxy (mode tcp, mptcpize: it ends MPTCP and copies every byte). A single transfer
    varies by +-20% here (TCP and MPTCP-level retransmissions in the veth path, with or without
    the LB), hence many rounds and confidence intervals, and the CPU seconds per GB beside them:
    on this CPU-bound machine what a path costs per byte is what it takes off the throughput.
    Each transfer starts a second after its path was set up: past the worker's start (its
    conntrack counter forks, its health checks begin)."""
    plain, tracked, mechanisms, lb, proxied = [], [], [], [], []
    for _ in range(rounds):
        with haproxy(topo, run):
            time.sleep(1)
            proxied.append(measured_fetch(topo, size))
        for arm, setup in ((plain, plain_route), (tracked, conntrack_only), (mechanisms, mechanisms_only)):
            setup(topo, "add")
            time.sleep(1)
            arm.append(measured_fetch(topo, size))
            setup(topo, "del")
        worker = WorkerProcess(topo, config, run / "bulk.log")
        time.sleep(1)
        before = nft_queued(topo)
        lb.append(measured_fetch(topo, size))
        middle = nft_queued(topo)
        fetch(topo, 100 * MB)
        per_100mb = nft_queued(topo) - middle
        worker.stop()
    (lb_mbit, lb_cpu), (mech_mbit, mech_cpu), (ct_mbit, ct_cpu), (plain_mbit, plain_cpu), (ha_mbit, ha_cpu) = [
        [statistics.fmean(r[k] for r in arm) for k in (0, 1)] for arm in (lb, mechanisms, tracked, plain, proxied)]
    low, high = paired_ratio_interval([x[0] for x in lb], [x[0] for x in plain])
    mech_low, mech_high = paired_ratio_interval([x[0] for x in mechanisms], [x[0] for x in plain])
    ct_low, ct_high = paired_ratio_interval([x[0] for x in tracked], [x[0] for x in plain])
    own_low, own_high = paired_ratio_interval([x[0] for x in lb], [x[0] for x in mechanisms])
    print(f"bulk throughput ({rounds} rounds of {size // MB} MB, means): through the LB {lb_mbit:.0f} Mbit/s, "
          f"plain forwarding {plain_mbit:.0f} Mbit/s, ratio {lb_mbit / plain_mbit:.3f} (95% bootstrap interval "
          f"{low:.3f}-{high:.3f}); CPU seconds per GB: LB {lb_cpu:.3f}, plain {plain_cpu:.3f} "
          f"({lb_cpu / plain_cpu - 1:+.1%}); packets queued during a 100 MB transfer: {per_100mb}", flush=True)
    print(f"  the design's mechanisms alone (conntrack mark, fwmark rule, nothing queued): {mech_mbit:.0f} Mbit/s, "
          f"ratio to plain {mech_mbit / plain_mbit:.3f} ({mech_low:.3f}-{mech_high:.3f}), CPU per GB "
          f"{mech_cpu / plain_cpu - 1:+.1%}; the LB against them: {lb_mbit / mech_mbit:.3f} "
          f"({own_low:.3f}-{own_high:.3f}), CPU per GB {lb_cpu / mech_cpu - 1:+.1%}", flush=True)
    print(f"  HAProxy (mode tcp, mptcpize): {ha_mbit:.0f} Mbit/s, ratio to plain {ha_mbit / plain_mbit:.3f}, CPU per "
          f"GB {ha_cpu:.3f} ({ha_cpu / plain_cpu - 1:+.1%}); the LB against it: {lb_mbit / ha_mbit:.3f}, CPU per GB "
          f"{lb_cpu / ha_cpu - 1:+.1%}", flush=True)
    print(f"  of them, conntrack alone (every packet tracked, plain routes, no fwmark rule): {ct_mbit:.0f} Mbit/s, "
          f"ratio to plain {ct_mbit / plain_mbit:.3f} ({ct_low:.3f}-{ct_high:.3f}), CPU per GB "
          f"{ct_cpu / plain_cpu - 1:+.1%}", flush=True)
    return {"lb_mbit_s": [round(x[0]) for x in lb], "plain_mbit_s": [round(x[0]) for x in plain],
            "mechanisms_mbit_s": [round(x[0]) for x in mechanisms], "conntrack_mbit_s": [round(x[0]) for x in tracked],
            "conntrack_cpu_s_per_gb": [round(x[1], 3) for x in tracked],
            "lb_cpu_s_per_gb": [round(x[1], 3) for x in lb], "plain_cpu_s_per_gb": [round(x[1], 3) for x in plain],
            "mechanisms_cpu_s_per_gb": [round(x[1], 3) for x in mechanisms],
            "ratio": round(lb_mbit / plain_mbit, 3), "ratio_95": [round(low, 3), round(high, 3)],
            "conntrack_ratio": round(ct_mbit / plain_mbit, 3),
            "conntrack_ratio_95": [round(ct_low, 3), round(ct_high, 3)],
            "mechanisms_ratio": round(mech_mbit / plain_mbit, 3), "mechanisms_ratio_95": [round(mech_low, 3),
                                                                                            round(mech_high, 3)],
            "lb_to_mechanisms_ratio": round(lb_mbit / mech_mbit, 3), "lb_to_mechanisms_95": [round(own_low, 3),
                                                                                              round(own_high, 3)],
            "cpu_per_gb_ratio": round(lb_cpu / plain_cpu, 3),
            "haproxy_mbit_s": [round(x[0]) for x in proxied], "haproxy_cpu_s_per_gb": [round(x[1], 3) for x in proxied],
            "lb_to_haproxy_ratio": round(lb_mbit / ha_mbit, 3), "lb_to_haproxy_cpu_per_gb": round(lb_cpu / ha_cpu, 3),
            "queued_per_100MB_transfer": per_100mb, "queued_per_connection": middle - before}


def paired_ratio_interval(arm: list[float], base: list[float], rounds: int = 10000) -> tuple[float, float]:
    """95% bootstrap interval of mean(arm) / mean(base), resampling whole pairs of the same round
    (a round shares the machine's state of the moment)."""
    rng = random.Random(0)
    pairs = list(zip(arm, base))
    ratios = sorted(statistics.fmean(a for a, _ in sample) / statistics.fmean(b for _, b in sample)
                    for sample in (rng.choices(pairs, k=len(pairs)) for _ in range(rounds)))
    return ratios[int(rounds * 0.025)], ratios[int(rounds * 0.975)]


if __name__ == "__main__":
    main()
