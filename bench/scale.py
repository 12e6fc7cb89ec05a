"""One balancer holding N live MPTCP connections: what its housekeeping costs at that scale.

    .venv/bin/python bench/scale.py [--connections 1000000] [--quick] [--json]

The state of N connections is built on the kernel without opening N sockets: N conntrack entries
created over ctnetlink (batched, with a backend's mark, in the LB's namespace of the lab's
topology) and N token-map elements naming them, as a worker that learned them leaves them. The
worker is then restarted, so that it adopts them as after an upgrade, and measured:

- `adoption_s`: from its start to its "ready" line, the N tokens read back and watched, after a
  graceful stop (from the snapshot it left); `adoption_after_crash_s`: the same after a SIGKILL
  (read back from the kernel map);
- `token_removal_*_s`: from a connection's conntrack entry destroyed to its token leaving the map
  (the map's deletions read from nf_tables' own events), while 1,000 connections a second end;
- `worker_rss_mb`, `worker_cpu_at_rest`: the worker's processes (the worker, its conntrack
  follower, its health checker), their memory summed (PSS: pages they share counted once), and
  their CPU share over 10 s of rest (once the follower's full readings of conntrack are over);
- `kernel_bytes_per_connection`: MemAvailable's drop while the state was built, per connection;
- `table_write_ms`: a backend drained or undrained (its Maglev table of 65,537 slots rewritten),
  from the control socket's command to the answer of the status asked next (the loop's turn in
  between writes the table);
- `scrape_ms`: a `/metrics` scrape, from the LB's namespace;
- `tokens_per_cpu_second`: bench/learn_rate.py's figure, learning from a burst of copies.

The host's nf_conntrack_max (a global) is raised for the run and put back; the namespaces, the
worker and its kernel state are removed at the end.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS = "10.200.0.0"
PORTS = 60_000  # client ports per client address
GOLDEN = 0x9E3779B1  # odd: i -> i * GOLDEN mod 2**32 is one-to-one, so the tokens are distinct
ENDS_PER_SECOND = 1000
END_SECONDS = 10
CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


def flow(i: int, vip: bytes, port: int) -> tuple:
    import ipaddress
    client = (ipaddress.ip_address(CLIENTS) + i // PORTS).packed
    return client, 1024 + i % PORTS, vip, port


def token(i: int) -> int:
    return ((i + 1) * GOLDEN) & 0xFFFFFFFF


# -- run inside the LB's namespace (this file, called again through `ip netns exec`) ----------
def build_state(n: int, table: str, vip: str, port: int, marks: list[int], timeout: int) -> dict:
    import ipaddress

    from mplb_nfq.core.tokens import flow_comment
    from mplb_nfq.kernel.ctnetlink import Conntrack
    from mplb_nfq.kernel.tokenmap import TokenMap

    packed = ipaddress.ip_address(vip).packed
    tokens, conntrack = TokenMap(table), Conntrack()
    started = time.perf_counter()
    step = 100_000
    for start in range(0, n, step):
        chunk = range(start, min(n, start + step))
        flows = {token(i): flow(i, packed, port) for i in chunk}
        refused = tokens.add([(token(i), marks[i % len(marks)]) for i in chunk], timeout,
                             {t: flow_comment(f) for t, f in flows.items()})
        assert not refused, f"{len(refused)} tokens refused"
    tokens_s = time.perf_counter() - started
    started = time.perf_counter()
    created = conntrack.create(((flow(i, packed, port), marks[i % len(marks)]) for i in range(n)), timeout)
    return {"tokens_s": tokens_s, "conntrack_s": time.perf_counter() - started, "conntrack_created": created}


def end_connections(n: int, table: str, vip: str, port: int, rate: int, seconds: float) -> dict:
    """End `rate` connections a second (their conntrack entries deleted) and time each token's
    removal from the map, as nf_tables announces it (NFNLGRP_NFTABLES)."""
    import ipaddress
    import socket

    from mplb_nfq.kernel.ctnetlink import Conntrack
    from mplb_nfq.kernel.nfnetlink import NETLINK_NETFILTER, SOL_NETLINK, NLMSG_HEADER
    from mplb_nfq.kernel.tokenmap import NFNL_SUBSYS_NFTABLES, NFT_MSG_DELSETELEM, parse_elements

    packed = ipaddress.ip_address(vip).packed
    monitor = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    monitor.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
    monitor.bind((0, 0))
    monitor.setsockopt(SOL_NETLINK, 1, 7)  # NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES
    conntrack = Conntrack()
    ended_at: dict[int, float] = {}
    removed_at: dict[int, float] = {}

    def read_monitor():
        while True:
            try:
                data = monitor.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            now, offset = time.monotonic(), 0
            while offset + NLMSG_HEADER.size <= len(data):
                length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
                if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELSETELEM:
                    for t, *_ in parse_elements(data[offset + NLMSG_HEADER.size:offset + length]):
                        removed_at.setdefault(t, now)
                offset += length + (-length % 4)

    batch = rate // 10
    total = int(rate * seconds)
    started = time.monotonic()
    for k, first in enumerate(range(0, total, batch)):
        while time.monotonic() < started + k * 0.1:
            read_monitor()
            time.sleep(0.005)
        chosen = [(i * 7919) % n for i in range(first, first + batch)]  # spread over the table
        now = time.monotonic()
        conntrack.delete(flow(i, packed, port) for i in chosen)
        ended_at.update((token(i), now) for i in chosen)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not set(ended_at) <= set(removed_at):
        read_monitor()
        time.sleep(0.01)
    delays = sorted(removed_at[t] - ended_at[t] for t in ended_at if t in removed_at)
    missing = len(ended_at) - len(delays)
    q = statistics.quantiles(delays, n=100) if len(delays) > 1 else [float("nan")] * 99
    return {"ended": len(ended_at), "not_removed": missing, "p50_s": round(q[49], 4), "p99_s": round(q[98], 4),
            "max_s": round(delays[-1], 4) if delays else None}


def scrape(address: str, times: int = 5) -> dict:
    import urllib.request
    took = []
    size = 0
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as answer:
            size = len(answer.read())
        took.append((time.perf_counter() - started) * 1000)
    return {"scrape_ms": round(statistics.median(took), 1), "bytes": size}


# -- run on the host --------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def memory_mb(pids: list[int], field: str) -> float:
    """The processes' memory (smaps_rollup's Rss or Pss: Pss shares the pages forked processes
    share among them, so that a sum counts each page once)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def settled_follower(socket_path: str, n: int, patience: float = 300.0) -> dict:
    """The follower's status once it is at rest: watching the n connections, a full reading of
    conntrack done, and no other ended for twice as long as the last one took (a graceful restart
    reads again once its snapshot is loaded: 7-8 s of a core at a million, not rest)."""
    from mplb_nfq.ops.control import request
    deadline, last, since = time.monotonic() + patience, None, time.monotonic()
    follower: dict = {}
    while time.monotonic() < deadline:
        follower = request(socket_path, "status").get("conntrack", {})
        readings = follower.get("full_readings", 0)
        if readings != last:
            last, since = readings, time.monotonic()
        quiet = time.monotonic() - since >= 2 * follower.get("last_reading_s", 0.0) + 1
        if readings >= 1 and follower.get("watched", 0) >= n and quiet:
            break
        time.sleep(0.5)
    return follower


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def inside(topo, *args: str) -> dict:
    done = topo.exec("lb", sys.executable, __file__, "--inside", *args, capture_output=True, text=True)
    return json.loads(done.stdout)


def measure(n: int, quick: bool = False) -> dict:
    from mplb_nfq.lab.lab import PORT, WorkerProcess, config_text
    from mplb_nfq.lab.netns import VIP, Topology
    from mplb_nfq.ops.control import request

    results: dict = {"connections": n}
    old_max = int(Path(CONNTRACK_MAX).read_text())
    Path(CONNTRACK_MAX).write_text(str(max(old_max, n + 200_000)))
    topo = Topology(backends=3, rate_mbit=None)
    worker = None
    with tempfile.TemporaryDirectory(prefix="mplb-scale-") as tmp:
        try:
            run_dir = Path(tmp)
            topo.build()
            servers = [topo.python(b, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for b in topo.backend_names]
            config = run_dir / "mplb.toml"
            text = config_text("mplb", 3, run_dir, metrics="127.0.0.1:9850",
                               extra=f"[limits]\ntoken_capacity = {2 * n}\nflow_capacity = 100000")
            config.write_text(text.replace('scheduler = "rr"', 'scheduler = "maglev"'))
            worker = WorkerProcess(topo, config, run_dir / "worker.log")
            socket_path = str(run_dir / "control.sock")
            status = request(socket_path, "status")
            marks = [int(b["mark"], 16) for s in status["services"] for b in s["backends"]]
            before = mem_available()
            timeout = 5 * 86400
            results["build"] = inside(topo, "build", str(n), "mplb", VIP, str(PORT), ",".join(map(str, marks)),
                                      str(timeout))
            results["kernel_bytes_per_connection"] = round((before - mem_available()) / n)
            # the state was written behind the worker's back: a crash's restart reads it from the map,
            # then a graceful one from the snapshot the stop leaves
            for stop, figure in ((signal.SIGKILL, "adoption_after_crash_s"), (signal.SIGTERM, "adoption_s")):
                worker.proc.send_signal(stop)
                worker.proc.wait(timeout=60)
                started = time.monotonic()
                worker = WorkerProcess(topo, config, run_dir / "worker.log")
                results[figure] = round(time.monotonic() - started, 2)
                results[figure.replace("_s", "_from")] = worker.ready.get("adopted_from")
                results[figure.replace("_s", "_tokens")] = worker.ready.get("adopted")
            pids = process_tree(worker.proc.pid)
            results["follower"] = settled_follower(socket_path, n)
            rest = 1 if quick else 10
            cpu = cpu_seconds(pids)
            time.sleep(rest)
            results["worker_cpu_at_rest"] = round((cpu_seconds(pids) - cpu) / rest, 3)
            tree = process_tree(worker.proc.pid)
            results["worker_rss_mb"] = round(memory_mb(tree, "Pss"), 1)
            results["worker_processes_pss_mb"] = sorted((round(memory_mb([p], "Pss"), 1) for p in tree), reverse=True)
            results["token_removal"] = inside(topo, "end", str(n), "mplb", VIP, str(PORT), str(ENDS_PER_SECOND),
                                              str(1 if quick else END_SECONDS))
            results["token_removal_p50_s"] = results["token_removal"]["p50_s"]
            results["token_removal_p99_s"] = results["token_removal"]["p99_s"]
            writes = []
            for _ in range(1 if quick else 3):
                for command in ("drain", "undrain"):  # the loop's next turn writes the table: the status waits for it
                    started = time.perf_counter()
                    request(socket_path, command, backend="b1")
                    request(socket_path, "status")
                    writes.append((time.perf_counter() - started) * 1000)
            results["table_write_ms"] = round(statistics.median(writes), 1)
            results["scrape"] = inside(topo, "scrape", "127.0.0.1:9850")
            results["scrape_ms"] = results["scrape"]["scrape_ms"]
            worker.stop(cleanup=True)
            worker = None
            for server in servers:
                server.kill()
        finally:
            if worker is not None:
                worker.stop(cleanup=True)
            topo.destroy()
            Path(CONNTRACK_MAX).write_text(str(old_max))
    if not quick:
        learn = subprocess.run([sys.executable, str(HERE / "learn_rate.py"), "100000"], capture_output=True, text=True)
        results["tokens_per_cpu_second"] = json.loads(learn.stdout.splitlines()[-1]).get("tokens_per_cpu_second")
    return results


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--inside":
        job, args = sys.argv[2], sys.argv[3:]
        if job == "build":
            n, table, vip, port, marks, timeout = args
            found = build_state(int(n), table, vip, int(port), [int(m) for m in marks.split(",")], int(timeout))
        elif job == "end":
            n, table, vip, port, rate, seconds = args
            found = end_connections(int(n), table, vip, int(port), int(rate), float(seconds))
        else:
            found = scrape(args[0])
        print(json.dumps(found))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="one JSON object, nothing else")
    parser.add_argument("--quick", action="store_true", help="1 s of ends and of rest, one table write, no learning rate")
    options = parser.parse_args()
    results = measure(options.connections, options.quick)
    if options.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
