"""Token propagation in a cluster: from one balancer's learning to another's kernel map, through
Redis, at 1,000 and 10,000 new connections per second, and the CPU it costs.

    .venv/bin/python bench/cluster_propagation.py [--seconds S] [--rates 1000,10000] [--json]

The cluster lab topology (lab/ecmp.py: router, BIRD, Redis with an ACL user) with two
balancers. lb2 runs the real worker: its link follows Redis, its worker installs each batch into
the kernel token map and the core and records the delay from the batch's oldest learning to the
end of the install. lb1 stands for a balancer that learns `rate` tokens a second: this script
feeds its link process (the same code a worker starts) one batch per millisecond, as a worker's
loop flushes what a turn learned; making 10,000 real MPTCP handshakes a second is beyond this
machine's two cores. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

DRIVER = """
import random, sys, time
from mplb_nfq.core.news import Batch
from mplb_nfq.ops.link import LinkHandle
from mplb_nfq.core.settings import ClusterConfig
redis, password, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
link = LinkHandle(ClusterConfig("bench", "lb1", redis, "lb1", password, announce_device=None), 600, "bench")
link_process = link.process
time.sleep(1.5)  # connected
started, sent, backends = time.monotonic(), 0, ("b1", "b2")
before = open(f"/proc/{link_process.pid}/stat").read().split()
while time.monotonic() - started < seconds:
    due = int((time.monotonic() - started) * rate) - sent
    if due > 0:
        now = time.time()
        link.send(Batch("lb1", now, {random.getrandbits(32): backends[i % 2] for i in range(due)}))
        sent += due
    time.sleep(0.001)
time.sleep(1.0)
after = open(f"/proc/{link_process.pid}/stat").read().split()
ticks = sum(int(after[i]) - int(before[i]) for i in (13, 14)) / __import__("os").sysconf("SC_CLK_TCK")
print(sent, ticks)
"""


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    return found


def measure(topo, worker, rate: float, seconds: float) -> dict:
    from mplb_nfq.lab.ecmp import REDIS_PORT, STORE

    status = [sys.executable, "-m", "mplb_nfq", "status", "--json", "-c", str(worker.config_path)]
    pid = worker.proc.pid
    helpers = children(pid)
    before = cpu_seconds(pid), sum(cpu_seconds(c) for c in helpers)
    received_before = json.loads(topo.exec("lb2", *status, capture_output=True).stdout)["packets"]["cluster"]
    driver = topo.exec("lb1", sys.executable, "-c", DRIVER, f"redis://{STORE}:{REDIS_PORT}/0", topo.redis_passwords["lb1"],
                       str(rate), str(seconds), capture_output=True)
    sent, publisher_cpu = driver.stdout.split()
    after = cpu_seconds(pid), sum(cpu_seconds(c) for c in helpers)
    cluster = json.loads(topo.exec("lb2", *status, capture_output=True).stdout)["packets"]["cluster"]
    received = cluster["tokens_received"] - received_before["tokens_received"]
    return {"rate": rate, "seconds": seconds, "published": int(sent), "installed": received,
            "p50_ms": cluster["propagation_ms_p50"], "p99_ms": cluster["propagation_ms_p99"],
            "worker_cpu_per_s": round((after[0] - before[0]) / seconds, 3),
            "worker_helpers_cpu_per_s": round((after[1] - before[1]) / seconds, 3),
            "publishing_link_cpu_per_s": round(float(publisher_cpu) / seconds, 3),
            "worker_cpu_us_per_token": round((after[0] - before[0]) * 1e6 / max(received, 1), 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="1000,10000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from mplb_nfq.lab.ecmp import ClusterTopology
    from mplb_nfq.lab.lab import WorkerProcess, config_text

    random.seed(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="mplb-bench-cluster-") as tmp:
        run_dir = Path(tmp)
        topo = ClusterTopology(backends=2, balancers=2, rate_mbit=None, run_dir=run_dir)
        try:
            topo.build()
            (run_dir / "lb2").mkdir()
            config = run_dir / "lb2" / "mplb.toml"
            config.write_text(config_text("mplb", 2, run_dir / "lb2", direct_return=True,
                                          cluster=topo.cluster_config("lb2", "bench"),
                                          extra="[limits]\ntoken_capacity = 2000000"))
            worker = WorkerProcess(topo, config, run_dir / "lb2" / "worker.log", "lb2")
            try:
                for rate in (float(r) for r in args.rates.split(",")):
                    results.append(measure(topo, worker, rate, args.seconds))
                    time.sleep(2.0)  # the recent delays (4,096 batches) are this rate's only
            finally:
                worker.stop()
        finally:
            topo.destroy()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['rate']:>7.0f}/s: {r['installed']}/{r['published']} installed, propagation p50 {r['p50_ms']} ms "
                  f"p99 {r['p99_ms']} ms; receiving worker {r['worker_cpu_per_s']} CPU-s/s "
                  f"({r['worker_cpu_us_per_token']} us/token), its link and conntrack reader "
                  f"{r['worker_helpers_cpu_per_s']} CPU-s/s; publishing link {r['publishing_link_cpu_per_s']} CPU-s/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
