"""Helpers for the kernel tests: downloads through the lab topology, backend counters."""
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from mplb_nfq.lab.lab import PORT
from mplb_nfq.lab.netns import VIP, VIP6

KERNEL = [pytest.mark.kernel,
          pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and nftables")]
MB = 1_000_000


def _fetch_args(family, mapped):
    return [VIP6 if family == 6 else VIP, "--port", str(PORT), *(["--mapped"] if mapped else [])]


def fetch(topo, *sizes, pause=0.0, family=4, mapped=False):
    """Downloads from the VIP (VIP6 with family=6; mapped: through an AF_INET6 socket)."""
    args = [a for s in sizes for a in ("--size", str(s))]
    out = topo.exec("client", sys.executable, "-m", "mplb_nfq.lab.transfer", "fetch", *_fetch_args(family, mapped),
                    "--pause", str(pause), *args, capture_output=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def fetch_in_background(topo, size, family=4, mapped=False):
    return topo.python("client", "mplb_nfq.lab.transfer", "fetch", *_fetch_args(family, mapped), "--size", str(size),
                       stdout=subprocess.PIPE, text=True)


WRONG_JOINS = ("misrouted", "foreign", "late")
NO_WRONG_JOINS = dict.fromkeys(WRONG_JOINS, 0)


def counters(topo):
    """Per backend: its MPTCP counters (nstat), and the judge's exact verdicts on the joins it
    received (`joins`, `misrouted`, `foreign`, `late`: mplb_nfq.lab.judge)."""
    verdicts = topo.judge.verdicts()
    return {name: {**topo.nstat(name), **verdicts[name]} for name in topo.backend_names}


def wrong_joins(before, after):
    """The joins between two readings that reached a backend not their connection's, or were refused there."""
    return {key: sum(delta(before, after, key).values()) for key in WRONG_JOINS}


def delta(before, after, key):
    return {name: after[name].get(key, 0) - before[name].get(key, 0) for name in before}


def nft_counters(topo):
    data = json.loads(topo.exec("lb", "nft", "-j", "list", "counters", "table", "inet", "mplb",
                                capture_output=True).stdout)
    return {c["counter"]["name"]: c["counter"]["packets"] for c in data["nftables"] if "counter" in c}


def serving(before, after):
    """The backend that accepted the one new MPTCP connection between two counter readings."""
    (name,) = [n for n, v in delta(before, after, "MPTcpExtMPCapableSYNRX").items() if v == 1]
    return name


def inject(topo, packets, repeat=1, seconds=30.0, namespace="client"):
    """Send raw IP packets from a namespace (the client's by default); returns how many were sent."""
    script = os.path.join(os.path.dirname(__file__), "inject.py")
    out = topo.exec(namespace, sys.executable, script, "--repeat", str(repeat), "--seconds", str(seconds),
                    input="\n".join(p.hex() for p in packets) + "\n", capture_output=True).stdout
    return int(out)


def wait_for(condition, timeout, step=0.1):
    """Until condition() holds (returns when it did), or fail after timeout seconds: for what
    the worker reports a while after it happened (a second worker's counters reach the first
    every half second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def worker_stats(topo, w):
    status = json.loads(topo.exec("lb", sys.executable, "-m", "mplb_nfq", "status", "--json", "-c",
                                  str(w.config_path), capture_output=True).stdout)
    return status


@contextmanager
def one_path_download(topo, size):
    """A download that starts on one subflow: the client's second address is no subflow endpoint
    until the test adds it back (topo.subflow_endpoint(True)), which opens a subflow on it then.
    Yields the process, the backend counters before it and once it runs, and its backend. The
    download ends with the block: a failed test leaves no traffic to the next one."""
    topo.subflow_endpoint(False)
    process = None
    try:
        before = counters(topo)
        process = fetch_in_background(topo, size)
        wait_for(lambda: sum(delta(before, counters(topo), "MPTcpExtMPCapableSYNRX").values()) >= 1, 10)
        running = counters(topo)
        yield SimpleNamespace(process=process, before=before, running=running, home=serving(before, running))
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.communicate()
            forget_connections(topo)
        topo.subflow_endpoint(True)


@contextmanager
def flooding(topo, kind, rate=10_000, seconds=30.0, token=0):
    """A flood from spoofed sources in the client's namespace (mplb_nfq.lab.flood) for the block;
    yields once the balancer has seen its first packets. It stops when the block ends."""
    before = sum(nft_counters(topo).values())
    process = topo.python("client", "mplb_nfq.lab.flood", kind, "--vip", VIP, "--port", str(PORT), "--rate",
                          str(rate), "--seconds", str(seconds), "--token", hex(token), stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sum(nft_counters(topo).values()) > before + rate // 10, 10)
        yield process
    finally:
        process.kill()
        process.communicate()
        forget_connections(topo)


def forget_connections(topo):
    """Empty the LB's conntrack table: a flood's entries (spoofed SYNs and ACKs, some with a
    backend's mark) and those of a download killed midway (closing for seconds) would count as
    their backend's connections in the tests after it."""
    topo.exec("lb", sys.executable, "-c", "from pyroute2 import NFCTSocket\nwith NFCTSocket() as ct: ct.flush()")


def token_map(topo, role="lb"):
    """A balancer's kernel token map: token -> (mark, comment)."""
    listing = json.loads(topo.exec(role, "nft", "-j", "list", "map", "inet", "mplb", "tokens",
                                   capture_output=True).stdout)
    (elements,) = [item["map"].get("elem", []) for item in listing["nftables"] if "map" in item]
    return {key["elem"]["val"]: (mark, key["elem"].get("comment")) for key, mark in elements}


CT_MARKS = """
import sys
from pyroute2 import NFCTSocket
client, port = sys.argv[1], int(sys.argv[2])
with NFCTSocket() as ct:
    for entry in ct.dump():
        if entry.get_nested("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_SRC_PORT") == port \
                and entry.get_nested("CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V4_SRC") == client:
            print(entry.get_attr("CTA_MARK") or 0)
"""


def ct_marks(topo, client, sport):
    """The conntrack marks of the LB's entries from client:sport (the port alone also finds the
    LB's own connections, its health checks' among them, whose ephemeral ports it may share)."""
    out = topo.exec("lb", sys.executable, "-c", CT_MARKS, client, str(sport), capture_output=True).stdout
    return [int(line) for line in out.split()]
