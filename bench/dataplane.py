"""The data path on the real kernel: packets queued and copied per MPTCP connection, and the
worker's CPU per packet it handled.

    .venv/bin/python bench/dataplane.py [--connections 300] [--size 20000]

Builds the lab topology (no rate limit), runs the worker, opens N MPTCP connections (each with a
second subflow), then reads the worker's own counters, the nft counters and the worker
process's CPU time from /proc.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from speed import cpu_times

from mplb_nfq.lab.lab import PORT, WorkerProcess, config_text
from mplb_nfq.lab.netns import VIP, Topology


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--size", type=int, default=20_000, help="bytes per download")
    args = parser.parse_args()
    with Topology(rate_mbit=None) as topo, tempfile.TemporaryDirectory() as tmp:
        for name in topo.backend_names:
            topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT))
        time.sleep(1)
        config = Path(tmp, "mplb.toml")
        config.write_text(config_text("mplb", topo.backends, Path(tmp)))
        worker = WorkerProcess(topo, config, Path(tmp, "worker.log"))
        user_before, system_before = cpu_times(worker.proc.pid)
        started = time.monotonic()
        out = topo.exec("client", sys.executable, "-m", "mplb_nfq.lab.transfer", "fetch", VIP, "--port", str(PORT),
                        "--pause", "0.01", *[a for _ in range(args.connections) for a in ("--size", str(args.size))],
                        capture_output=True).stdout
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        user_after, system_after = cpu_times(worker.proc.pid)
        user, system = user_after - user_before, system_after - system_before
        nft = json.loads(topo.exec("lb", "nft", "-j", "list", "counters", "table", "inet", "mplb",
                                   capture_output=True).stdout)
        counters = {c["counter"]["name"]: c["counter"]["packets"] for c in nft["nftables"] if "counter" in c}
        joins = sum(topo.nstat(b).get("MPTcpExtMPJoinAckRx", 0) for b in topo.backend_names)
        stats = worker.stop()
    ok = sum(1 for line in out.splitlines() if json.loads(line).get("received") == args.size)
    queued, copies = stats["packets"], stats.get("copies", 0)
    print(f"connections completed        {ok}/{args.connections} in {elapsed:.1f} s; joins completed {joins}")
    print(f"packets queued               {queued} ({queued / args.connections:.2f} per MPTCP connection: joins that "
          f"raced their token's copy; held and found {stats.get('held_found', 0)})")
    print(f"copies read                  {copies} ({copies / args.connections:.2f} per MPTCP connection)")
    print(f"  by kind                    {stats['kinds']}")
    print(f"  joins steered in kernel    {counters['join_kernel_hit']} of {args.connections}")
    print(f"worker CPU per queued packet {stats['decide_us_per_packet']} µs parse + decide; the whole process "
          f"(incl. token installs, health checks), per packet queued or copied: "
          f"{user / max(queued + copies, 1) * 1e6:.1f} µs user, {system / max(queued + copies, 1) * 1e6:.1f} µs system")


if __name__ == "__main__":
    main()
