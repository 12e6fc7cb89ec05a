"""A soak under faults: real MPTCP and TCP fetches through mplb-nfq (the default handshake path)
while everything an operator does, and everything that fails, happens on a schedule.

    .venv/bin/python bench/soak.py [--minutes N] [--rate R] [--json]

Lab topology, both client links at 100 Mbit/s, three backends (b3 comes and goes by reload).
Load: `soak_client.py`, R fetches/s from both client addresses (each MPTCP connection opens a
join from the other), 80% MPTCP, objects of 256 KB, 1 MB and 4 MB checked byte for byte.
Faults, in turn, each several times: restart (SIGTERM, start), kill -9 and start, a reload
changing weights, a reload adding or removing b3 (retired), drain and undrain, an outage (b2's
server stopped until its health check fails, then started), a hostile burst (MP_CAPABLE SYNs
and MP_JOIN SYNs with random tokens from addresses no host owns). The service's unknown-join
policy is `reset`: a join whose token nobody knows (a hostile one, or one of a connection
opened while no worker ran) is refused, never guessed. The judge (mplb_nfq.lab.judge) counts,
from what the backends sent and received, the joins that reached a backend other than their
connection's (misrouted), carried a token no backend issued (foreign), or reached their
connection's backend after the connection had ended there (late: a 256 KB fetch takes some
20 ms; a join SYN dropped during a restart comes again a second later).

Prints what happened and, with --json, one JSON document alone on stdout. Removes everything
it started."""
import argparse
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from mplb_nfq.lab.packets import SYN, mp_capable, mp_join_syn, tcp  # noqa: E402

from mplb_nfq.lab.judge import Judge  # noqa: E402
from mplb_nfq.lab.lab import PORT, WorkerProcess  # noqa: E402
from mplb_nfq.lab.netns import CLIENT, VIP, Topology, backend_address  # noqa: E402

FAULTS = ("restart", "kill", "reload_weights", "reload_backends", "drain", "outage", "hostile")
SIZES = (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
SLACK = 3.0  # seconds around a fault's window in which a failure is put down to it: a SYN dropped in
# it is sent again a second later, then two more; a join refusal is noticed up to half a second late


class Soak:
    def __init__(self, topo: Topology, run: Path):
        self.topo, self.run = topo, run
        self.config = run / "soak.toml"
        self.weight, self.members = 1, ["b1", "b2"]
        self.servers: dict[str, subprocess.Popen] = {}
        self.worker: WorkerProcess | None = None
        self.windows: list[tuple[str, float, float]] = []
        self.memory_kib: list[int] = []  # each worker's, just before it went, and the last one's at the end

    def write_config(self) -> None:
        lines = ["[[services]]", 'name = "soak"', f'vip = "{VIP}"', f"ports = [{PORT}]", 'scheduler = "wrr"',
                 'unknown_join = "reset"', f"backends = {json.dumps(self.members)}",
                 f'[control]\nsocket = "{self.run / "control.sock"}"', '[metrics]\naddress = ""',
                 "[health]\ninterval = 0.5\ntimeout = 0.4\nrise = 2\nfall = 2",
                 "[kernel]\nconntrack_interval = 0.5"]
        for name in ["b1", "b2", "b3"]:
            if name in self.members:
                weight = self.weight if name == "b1" else 1
                lines.append(f'[[backends]]\nname = "{name}"\naddress = "{backend_address(int(name[1:]) - 1)}"\n'
                             f"weight = {weight}")
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.topo.exec("lb", sys.executable, "-m", "mplb_nfq", *args, "-c", str(self.config),
                              capture_output=True, check=False)

    def serve(self, name: str) -> None:
        self.servers[name] = self.topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: f":{PORT}" in self.topo.exec(name, "ss", "-Hltn", capture_output=True).stdout, 5)

    def start_worker(self) -> None:
        self.worker = WorkerProcess(self.topo, self.config, self.run / "worker.log")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.worker.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def backend_up(self, name: str) -> bool:
        status = json.loads(self.cli("status", "--json").stdout or "{}")
        return any(b["name"] == name and b["state"] == "up" for s in status.get("services", []) for b in s["backends"])

    @contextlib.contextmanager
    def window(self, kind: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((kind, started, time.monotonic()))

    def inject(self, kind: str) -> None:
        with self.window(kind):
            getattr(self, kind)()

    def restart(self) -> None:
        self.memory_kib.append(self.rss_kib())
        self.worker.stop(cleanup=False)
        self.start_worker()

    def kill(self) -> None:
        self.memory_kib.append(self.rss_kib())
        self.worker.proc.send_signal(signal.SIGKILL)
        self.worker.proc.wait()
        self.worker.log.close()
        self.start_worker()

    def reload_weights(self) -> None:
        self.weight = 3 if self.weight == 1 else 1
        self.write_config()
        self.cli("reload")

    def reload_backends(self) -> None:
        self.members = ["b1", "b2"] if "b3" in self.members else ["b1", "b2", "b3"]
        self.write_config()
        self.cli("reload")

    def drain(self) -> None:
        self.cli("drain", "b1")
        time.sleep(2)
        self.cli("undrain", "b1")

    def outage(self) -> None:
        self.servers["b2"].kill()
        self.servers["b2"].wait()
        wait(lambda: not self.backend_up("b2"), 10)
        self.serve("b2")
        wait(lambda: self.backend_up("b2"), 10)

    def hostile(self) -> None:
        rng = random.Random(len(self.windows))
        packets = [tcp(f"10.0.3.{1 + i % 250}", VIP, 1024 + rng.randrange(60000), PORT, SYN, mp_capable())
                   for i in range(2000)]
        packets += [tcp(f"10.0.3.{1 + i % 250}", VIP, 1024 + rng.randrange(60000), PORT, SYN,
                        mp_join_syn(rng.getrandbits(32))) for i in range(2000)]
        sender = self.topo.popen("client", sys.executable, str(BENCH.parent / "tests" / "inject.py"),
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        sender.communicate("\n".join(p.hex() for p in packets) + "\n", timeout=60)

    def fault_during(self, record: dict) -> str | None:
        return next((kind for kind, start, end in self.windows
                     if start - SLACK <= record["end"] and record["start"] <= end + SLACK), None)


def wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def nstat_sum(topo: Topology, key: str) -> int:
    return sum(topo.nstat(name).get(key, 0) for name in topo.backend_names)


def read_conntrack(topo: Topology) -> None:
    """A full reading of the LB's conntrack, as `conntrack -L` makes one: the kernel destroys the
    expired entries it passes (otherwise its garbage collector's next round does, up to a minute
    later), and the follower hears of their end."""
    topo.exec("lb", sys.executable, "-c", "from mplb_nfq.kernel.ctnetlink import Conntrack\n"
                                          "for _ in Conntrack().dump(): pass")


def tokens_in_map(topo: Topology) -> int:
    listing = json.loads(topo.exec("lb", "nft", "-j", "list", "map", "inet", "mplb", "tokens",
                                   capture_output=True).stdout)
    return sum(len(item["map"].get("elem", [])) for item in listing["nftables"] if "map" in item)


def leftovers(topo: Topology) -> list[str]:
    """What the worker's cleanup should have removed from the LB: our table, rules, routes."""
    found = []
    if "mplb" in topo.exec("lb", "nft", "list", "tables", capture_output=True).stdout:
        found.append("nft table inet mplb")
    for family in ("-4", "-6"):
        rules = topo.exec("lb", "ip", family, "rule", capture_output=True).stdout
        found += [f"ip {family} rule {line.strip()}" for line in rules.splitlines() if line.startswith(("1000:", "1001:"))]
    return found


def soak(minutes: float, rate: float) -> dict:
    seconds = minutes * 60
    period = min(15.0, max(5.5, seconds / (2 * len(FAULTS))))  # a fault takes 3 s at most
    with Topology(backends=3, rate_mbit=100) as topo, tempfile.TemporaryDirectory(prefix="mplb-soak-") as tmp:
        state = Soak(topo, Path(tmp))
        for name in topo.backend_names:
            state.serve(name)
        topo.exec("client", "ip", "mptcp", "endpoint", "flush")
        for address in CLIENT[4]:  # a connection from either address opens its join from the other
            topo.exec("client", "ip", "mptcp", "endpoint", "add", address, "subflow")
        # closed and half-open connections (the hostile SYNs') leave conntrack sooner, and their
        # tokens the map: the leak check at the end waits for that
        topo.sysctl(topo.ns("lb"), "net.netfilter.nf_conntrack_tcp_timeout_time_wait", 5)
        topo.sysctl(topo.ns("lb"), "net.netfilter.nf_conntrack_tcp_timeout_syn_recv", 10)
        state.write_config()
        state.start_worker()
        memory_start = state.rss_kib()
        joins_before = nstat_sum(topo, "MPTcpExtMPJoinAckRx")
        judge = Judge(topo)
        client = topo.popen("client", sys.executable, str(BENCH / "soak_client.py"), VIP, str(PORT), str(seconds),
                            str(rate), ",".join(CLIENT[4]), ",".join(map(str, SIZES)), "0.8",
                            stdout=subprocess.PIPE, text=True)
        began, injected = time.monotonic(), Counter()
        while (sum(injected.values()) + 1) * period <= seconds - period / 2:
            time.sleep(max(0.0, began + (sum(injected.values()) + 1) * period - time.monotonic()))
            kind = FAULTS[sum(injected.values()) % len(FAULTS)]
            print(f"{time.monotonic() - began:6.1f} s  {kind}", file=sys.stderr, flush=True)
            state.inject(kind)
            injected[kind] += 1
        out, _ = client.communicate(timeout=seconds + 120)
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        wrong = judge.sync().wrong()
        judge.close()
        joins = nstat_sum(topo, "MPTcpExtMPJoinAckRx") - joins_before
        # closed connections leave conntrack, then the map
        drained = wait(lambda: read_conntrack(topo) or tokens_in_map(topo) == 0, 60)
        tokens_left = tokens_in_map(topo)
        memory_end = state.rss_kib()
        state.memory_kib.append(memory_end)
        state.worker.stop(cleanup=True)
        left = leftovers(topo)
    failed = [r for r in records if r["error"] or not r["intact"]]
    in_outage = [r for r in failed if state.fault_during(r) == "outage"]
    outside = [r for r in failed if r not in in_outage]
    report = {
        "minutes": minutes, "rate": round(len(records) / seconds, 2), "attempted": len(records),
        "completed": len(records) - len(failed), "failed": len(outside), "failed_in_outage": len(in_outage),
        "failures_by_fault": dict(Counter(state.fault_during(r) or "none" for r in outside)),
        "failure_examples": [r["error"] for r in outside[:5]],
        "mptcp_connections": sum(r["mptcp"] for r in records), "joins_completed": joins,
        **{f"{verdict}_joins": sum(1 for v, _ in wrong if v == verdict) for verdict in ("misrouted", "foreign", "late")},
        "wrong_joins_by_fault": {verdict: dict(Counter(state.fault_during({"start": t, "end": t}) or "none"
                                                       for v, t in wrong if v == verdict))
                                 for verdict in sorted({v for v, _ in wrong})},
        "corrupted_bytes": sum(r["received"] for r in records if r["received"] == r["size"] and not r["intact"]),
        "bytes_received": sum(r["received"] for r in records),
        "faults_injected": dict(injected), "worker_restarts_survived": injected["restart"] + injected["kill"],
        "worker_memory_kib": {"start": memory_start, "end": memory_end, "each_worker_at_its_end": state.memory_kib},
        "tokens_left_after_load": tokens_left, "tokens_drained": drained, "kernel_leftovers": left,
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=6.0, help="fetches per second")
    parser.add_argument("--json", action="store_true", help="one JSON document alone on stdout")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        report = soak(args.minutes, args.rate)
        for key, value in report.items():
            print(f"{key:28} {value}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
