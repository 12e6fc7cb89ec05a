"""`mplb-nfq lab`: the paper's experiment (Fig. 1(c)) in network namespaces on this machine.

A client with two 50 Mbit/s links downloads files of increasing size from the VIP, through an
MPTCP-unaware balancer (source-address hash, the join treated as a new connection) and through
mplb-nfq, repeated; mean and 95% confidence interval (Student t) per size and mode.
"""
from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .ecmp import MAX_BALANCERS, ClusterTopology, balancer_address
from .judge import Judge, difference
from .netns import (
    CLIENT,
    DUAL_STACK_V6,
    VIP,
    VIP6,
    Topology,
    backend_address,
    tunnel_address,
    tunnel_vni,
    underlay_address,
    until,
)

PORT = 8080
MODES = {  # name -> config lines that make the mode
    "unaware": 'scheduler = "sh"\nmptcp_aware = false\n',
    "mplb": 'scheduler = "rr"\nmptcp_aware = true\n',
}
# Two-sided 95% Student t critical values for 1..30 degrees of freedom.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


@dataclass
class LabSettings:
    sizes_mb: list[float] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    repeat: int = 5
    backends: int = 2
    rate_mbit: int = 50
    family: str = "4"  # 4, 6, or dual: an IPv4 connection whose second subflow is IPv6
    direct_return: bool = False  # the backends answer the client directly, not through the LB
    tunnel: str | None = None  # vxlan or ipip: backends behind a router, each reached through a tunnel
    joins: str = "token"  # announced-port: each backend announces a join port of the VIP (C flag)
    balancers: int = 0  # N: a cluster of N balancers behind a router (BGP, ECMP), Redis shared; 0: one LB
    redis: str = "single"  # a cluster's Redis: one process, or "sentinel" (a primary, a replica, three sentinels)
    faults: bool = False  # a cluster's MPLB run: the Redis primary killed, a balancer killed, a backend flapping

    @classmethod
    def quick(cls, balancers: int = 0) -> "LabSettings":
        # a cluster's run needs joins to cross balancers, half of them do: a few more connections
        return cls(sizes_mb=[1, 2, 5, 30] if balancers else [2, 30], repeat=3, balancers=balancers)


def t_critical(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(T_975):
        return T_975[df - 1]
    return 1.960 + 2.4 / df  # within 0.003 of the exact value beyond 30 degrees of freedom


def mean_ci(samples: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t)."""
    mean = statistics.fmean(samples)
    if len(samples) < 2:
        return mean, math.nan
    return mean, t_critical(len(samples) - 1) * statistics.stdev(samples) / math.sqrt(len(samples))


JOIN_PORT_BASE = 10000  # joins = "announced-port": backend i (mark mark_base + i) announces VIP:JOIN_PORT_BASE + i


def config_text(mode: str, backends: int, run_dir: Path, metrics: str = "", extra: str = "",
                kernel: str = "", direct_return: bool = False, tunnel: str | None = None, joins: str = "token",
                cluster: str = "") -> str:
    """The worker's config for one of the lab's modes: one dual-stack service (VIP and VIP6) on
    the backends' IPv4 and IPv6 addresses, or, through tunnels, IPv4; in a cluster with the
    [cluster] table given; its control socket lives in run_dir."""
    vips = f'["{VIP}"]' if tunnel else f'["{VIP}", "{VIP6}"]'
    announced = joins == "announced-port" and mode == "mplb"
    # the unaware balancer in front of backends that announce join ports: it balances those ports
    # as it balances the service's, by the client's address
    ports = [PORT] + (list(range(JOIN_PORT_BASE, JOIN_PORT_BASE + backends))
                      if joins == "announced-port" and mode == "unaware" else [])
    scheduling = MODES[mode].replace('"rr"', '"maglev"') if cluster else MODES[mode]  # what every balancer computes
    lines = ['[[services]]', 'name = "lab"', f"vips = {vips}", f"ports = {ports}", scheduling,
             f"direct_return = {str(direct_return).lower()}",
             *([f'joins = "announced-port"\njoin_port_base = {JOIN_PORT_BASE}'] if announced else []),
             f'[control]\nsocket = "{run_dir / "control.sock"}"', f'[metrics]\naddress = "{metrics}"',
             "[health]\ninterval = 0.5\ntimeout = 0.4\nrise = 2\nfall = 2", f"[kernel]\n{kernel}", extra, cluster]
    for i in range(backends):
        if tunnel:
            where = (f'address = "{tunnel_address(i)}"\ntunnel = "{tunnel}"\nremote = "{underlay_address(i)}"'
                     + (f"\nvni = {tunnel_vni(i)}" if tunnel == "vxlan" else ""))
        else:
            where = f'addresses = ["{backend_address(i)}", "{backend_address(i, 6)}"]'
        lines.append(f'[[backends]]\nname = "b{i + 1}"\n{where}')
    return "\n".join(lines) + "\n"


class Progress:
    """A one-line progress bar on stderr (only where stderr is read by a person or a log)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.done, self.width, self.started = total, 0, width, time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{label:28} {elapsed:5.0f}s, ~{eta:3.0f}s left ")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class WorkerProcess:
    """The balancer worker running in the lab's LB namespace."""

    def __init__(self, topo: Topology, config_path: Path, log_path: Path, role: str = "lb"):
        self.topo, self.config_path, self.log_path, self.role = topo, config_path, log_path, role
        self.cleaned = False  # by `stop`: nothing of this worker's is left in the kernel
        self.log = open(log_path, "w")
        self.proc = topo.popen(role, sys.executable, "-m", "mplb_nfq", "run", "-c", str(config_path),
                               stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = ready = json.loads(self.proc.stdout.readline() or '{"event": "died"}')
        if ready.get("event") != "ready":
            self.proc.wait()
            raise RuntimeError(f"the worker did not start; see {log_path}")

    def stop(self, cleanup: bool = True) -> dict:
        """SIGTERM, as systemd stops it (the kernel state stays); then, unless told otherwise,
        `mplb-nfq cleanup`, so that the next run starts from nothing."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.log.close()
        if cleanup:
            self.topo.exec(self.role, sys.executable, "-m", "mplb_nfq", "cleanup", "-c", str(self.config_path))
            self.cleaned = True
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return next((line for line in lines if line.get("event") == "stopped"), {})


def run_lab(settings: LabSettings, out_dir: str = "lab-results", as_json: bool = False) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    results = {"settings": asdict(settings), "modes": {}}
    progress = Progress(len(MODES) * len(settings.sizes_mb) * settings.repeat)
    with tempfile.TemporaryDirectory(prefix="mplb-lab-") as tmp:
        if settings.balancers:
            topo = ClusterTopology(backends=settings.backends, rate_mbit=settings.rate_mbit,
                                   balancers=settings.balancers, run_dir=Path(tmp), redis=settings.redis)
        else:
            topo = Topology(backends=settings.backends, rate_mbit=settings.rate_mbit,
                            direct_return=settings.direct_return, tunnel=settings.tunnel)
        judge = None
        try:
            topo.build()
            _check_unaware_splits(topo)
            for i in range(settings.backends):
                topo.python(f"b{i + 1}", "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for_servers(topo, settings.backends)
            judge = Judge(topo)
            if not settings.balancers or settings.family == "dual":  # (a cluster's client has both families' paths)
                _set_paths(topo, settings.family)
            if settings.joins == "announced-port":
                topo.announce_join_ports(JOIN_PORT_BASE)
            for mode in MODES:
                results["modes"][mode] = _run_mode(topo, judge, mode, settings, Path(tmp), out, progress)
        except KeyboardInterrupt:
            print("\ninterrupted; namespaces removed", file=sys.stderr)
            return 130
        finally:
            if judge is not None:
                judge.close()
            topo.destroy()
    largest = str(max(settings.sizes_mb))
    mbit = {m: results["modes"][m]["sizes"][largest]["mean_mbit_s"] for m in MODES}
    results["ratio"] = mbit["mplb"] / mbit["unaware"] if mbit["unaware"] else math.inf
    results["ratio_size_mb"] = max(settings.sizes_mb)
    results["oracle"] = {m: results["modes"][m]["oracle"] for m in MODES}
    if settings.balancers:
        results["balancers"] = settings.balancers
        results["joins_crossed"] = results["modes"]["mplb"]["joins_crossed"]
        results["misrouted_joins"] = results["oracle"]["mplb"]["misrouted"]
        results.update(results["modes"]["mplb"].get("faults", {}))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plotted = _plot(results, out / "lab.png")
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(_table(results))
        plot = f"plot: {out / 'lab.png'}" if plotted else "no plot (pip install 'mplb-nfq[lab]' for matplotlib)"
        print(f"\nresults: {out / 'results.json'}, {plot}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_unaware_splits(topo: Topology) -> None:
    """As in the paper, the client's two addresses (of each family) must hash to different backends."""
    import ipaddress
    from types import SimpleNamespace

    from ..core.schedulers import Flow, SourceHash

    backends = [SimpleNamespace(name=f"b{i + 1}", weight=1) for i in range(topo.backends)]
    for pair in (CLIENT[4], CLIENT[6], (CLIENT[4][0], DUAL_STACK_V6)):
        picks = {SourceHash().pick(Flow(ipaddress.ip_address(a).packed, 0, b"", PORT), backends).name for a in pair}
        if len(picks) != 2:
            raise RuntimeError(f"client addresses {pair} hash to one backend; change them")


def _set_paths(topo: Topology, family: str) -> None:
    """Which second subflow the client opens: from its second address of the family, or (dual
    stack) towards the IPv6 VIP each backend announces with ADD_ADDR."""
    if family == "dual":
        topo.dual_stack_paths()
    else:
        topo.subflow_endpoint(True, int(family))


def _fetch_target(family: str) -> list[str]:
    return {"4": [VIP], "6": [VIP6], "dual": [VIP, "--mapped"]}[family]


def _wait_for_servers(topo: Topology, backends: int) -> None:
    for i in range(backends):
        for _ in range(100):
            ss = topo.exec(f"b{i + 1}", "ss", "-Hltn", f"sport = :{PORT}", capture_output=True).stdout
            if ss.strip():
                break
            time.sleep(0.05)


def _run_mode(topo: Topology, judge: Judge, mode: str, settings: LabSettings, tmp: Path, out: Path,
              progress: Progress) -> dict:
    roles = topo.balancer_names if settings.balancers else ["lb"]
    workers = []
    before = judge.total()
    samples: dict[float, list[dict]] = {s: [] for s in settings.sizes_mb}
    try:
        for role in roles:
            (tmp / role).mkdir(exist_ok=True)
            config = tmp / role / f"{mode}.toml"
            cluster = topo.cluster_config(role, f"lab-{mode}") if settings.balancers else ""
            config.write_text(config_text(mode, settings.backends, tmp / role,
                                          direct_return=settings.direct_return or bool(cluster),
                                          tunnel=settings.tunnel, joins=settings.joins, cluster=cluster))
            log_name = f"worker-{mode}-{role}.log" if settings.balancers else f"worker-{mode}.log"
            workers.append(WorkerProcess(topo, config, out / log_name, role))
        if settings.balancers:
            topo.wait_announced(len(roles))
        faults = _inject_faults(topo, workers, settings) if settings.faults and mode == "mplb" else None
        for _ in range(settings.repeat):
            for size in settings.sizes_mb:
                fetch = topo.exec("client", sys.executable, "-m", "mplb_nfq.lab.transfer", "fetch",
                                  *_fetch_target(settings.family),
                                  "--port", str(PORT), "--size", str(int(size * 1e6)), "--pause", "0.2",
                                  capture_output=True)
                result = json.loads(fetch.stdout)
                if "error" in result or result["received"] != result["size"]:
                    raise RuntimeError(f"{mode}: download of {size} MB failed: {result}")
                samples[size].append(result)
                progress.step(f"{mode} {size:g} MB")
    finally:
        stats = {w.role: w.stop() for w in workers}
    oracle = difference(before, judge.total())
    sizes = {}
    for size, runs in samples.items():
        seconds = [r["seconds"] for r in runs]
        mbit = [r["mbit_s"] for r in runs]
        mean_s, ci_s = mean_ci(seconds)
        mean_mbit, ci_mbit = mean_ci(mbit)
        sizes[str(size)] = {"mean_s": mean_s, "ci_s": ci_s, "mean_mbit_s": mean_mbit, "ci_mbit_s": ci_mbit,
                            "samples_s": seconds, "samples_mbit_s": mbit}
    result = {"sizes": sizes, "oracle": oracle}
    if settings.balancers:
        result["workers"] = stats
        result["joins_crossed"] = sum(s.get("cluster", {}).get("joins_crossed", 0) for s in stats.values())
    else:
        result["worker"] = stats["lb"]
    if faults:
        result["faults"] = faults
    return result


FAULT_TRANSFER_BYTES = 60_000_000  # two of them outlast the three faults on the lab's 2 x 50 Mbit/s
FLAP_BLOCK = """table inet mplb_lab_flap {{
    chain input {{
        type filter hook input priority 0;
        ip saddr {sources} tcp dport {port} tcp flags & (syn | ack) == syn drop
    }}
}}
"""  # these balancers' health checks fail; clients' connections (from the client's addresses) go on
EVERY_BALANCER = f"{balancer_address(1)}-{balancer_address(MAX_BALANCERS)}"


def _inject_faults(topo: ClusterTopology, workers: list[WorkerProcess], settings: LabSettings) -> dict:
    """While two transfers run (each must arrive whole): the Redis primary killed (with Sentinel: its
    replica promoted; one Redis: restarted, empty), the last balancer's worker killed (the router
    withdraws it; a new worker adopts its maps and announces again), a backend's health checks
    failing until every balancer takes it out, then passing again. Replaces the killed worker in
    `workers`; the count of each fault."""
    running = [topo.python("client", "mplb_nfq.lab.transfer", "fetch", *_fetch_target(settings.family),
                           "--port", str(PORT), "--size", str(FAULT_TRANSFER_BYTES), stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    during = []  # how many transfers still ran as each fault began

    def still_running() -> None:
        during.append(sum(transfer.poll() is None for transfer in running))

    time.sleep(0.5)
    still_running()
    if settings.redis == "sentinel":
        killed = topo.kill_redis_primary()
        until(lambda: topo.primary_port() != killed, 20, "the sentinels promoted no replica")
        topo.restart_redis_node(killed)
    else:
        topo.stop_redis()
        topo.start_redis()
    victim = workers[-1]
    still_running()
    victim.proc.kill()
    victim.proc.wait()
    victim.log.close()
    until(lambda: balancer_address(int(victim.role.removeprefix("lb"))) not in topo.nexthops(), 10,
           f"the router kept {victim.role}")
    workers[-1] = WorkerProcess(topo, victim.config_path, victim.log_path.with_suffix(".restarted.log"), victim.role)
    topo.wait_announced(len(workers))
    still_running()
    topo.exec("b1", "nft", "-f", "-", input=FLAP_BLOCK.format(port=PORT, sources=EVERY_BALANCER))
    until(lambda: all(_backend_healthy(topo, w, "b1") is False for w in workers), 15, "b1 stayed up")
    topo.exec("b1", "nft", "delete", "table", "inet", "mplb_lab_flap")
    until(lambda: all(_backend_healthy(topo, w, "b1") for w in workers), 15, "b1 stayed down")
    for transfer in running:
        result = json.loads(transfer.communicate(timeout=120)[0] or "{}")
        if result.get("received") != FAULT_TRANSFER_BYTES or not result.get("intact"):
            raise RuntimeError(f"a transfer across the faults broke: {result}")
    return {"redis_failovers" if settings.redis == "sentinel" else "redis_restarts": 1, "balancer_faults": 1,
            "backend_flaps": 1, "transfers_across_faults": len(running), "transfers_running_at_each_fault": during}


def _backend_healthy(topo: ClusterTopology, worker: WorkerProcess, backend: str) -> bool | None:
    status = json.loads(topo.exec(worker.role, sys.executable, "-m", "mplb_nfq", "status", "--json", "-c",
                                  str(worker.config_path), capture_output=True).stdout)
    return next((b["healthy"] for s in status["services"] for b in s["backends"] if b["name"] == backend), None)


def _table(results: dict) -> str:
    lines = [f"{'size MB':>8} | " + " | ".join(f"{m + ' Mbit/s (95% CI)':>26}" for m in MODES) + " |  ratio"]
    sizes = results["modes"]["mplb"]["sizes"]
    for size in sizes:
        cells, means = [], []
        for mode in MODES:
            entry = results["modes"][mode]["sizes"][size]
            means.append(entry["mean_mbit_s"])
            cells.append(f"{entry['mean_mbit_s']:12.1f} ± {entry['ci_mbit_s']:5.1f}  "
                         f"({entry['mean_s']:5.2f} s)")
        lines.append(f"{float(size):>8g} | " + " | ".join(f"{c:>26}" for c in cells)
                     + f" | {means[1] / means[0]:6.2f}")
    lines.append(f"ratio at {results['ratio_size_mb']:g} MB: {results['ratio']:.2f}; joins "
                 + "; ".join(f"{m}: {o['joins']} received, {o['misrouted']} misrouted, {o['late']} late, "
                             f"{o['foreign']} foreign" for m, o in results["oracle"].items()))
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> bool:
    """The paper's Fig. 1(c); False when matplotlib (the `lab` extra) is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes_mb = results["settings"]["sizes_mb"]
    for mode, color in zip(MODES, ("tab:red", "tab:blue")):
        sizes = results["modes"][mode]["sizes"]
        x = [float(s) for s in sizes]
        label = "MPTCP-unaware LB (address hash)" if mode == "unaware" else "MPLB (mplb-nfq)"
        ax_time.errorbar(x, [v["mean_s"] for v in sizes.values()], yerr=[_finite(v["ci_s"]) for v in sizes.values()],
                         marker="o", color=color, capsize=3, label=label)
        ax_rate.errorbar(x, [v["mean_mbit_s"] for v in sizes.values()],
                         yerr=[_finite(v["ci_mbit_s"]) for v in sizes.values()], marker="o", color=color,
                         capsize=3, label=label)
    for ax, ylabel in ((ax_time, "download time (s)"), (ax_rate, "throughput (Mbit/s)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes_mb, [f"{s:g}" for s in sizes_mb])
        ax.minorticks_off()
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    settings = results["settings"]
    shape = {"4": "IPv4", "6": "IPv6", "dual": "dual stack"}[settings["family"]] + (
        ", direct server return" if settings["direct_return"] else "") + (
        f", {settings['tunnel']} tunnels" if settings["tunnel"] else "")
    fig.suptitle(f"MPTCP through a load balancer ({shape}): 2 x {settings['rate_mbit']} Mbit/s, "
                 f"mean and 95% CI over {results['settings']['repeat']} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value
