"""Hostile clients, overload, restarts and lifetimes, on the real kernel: each hole found when the
balancer was attacked, shown closed."""
import json
import os
import signal
import sys
import time

import pytest
from netlab import (
    KERNEL,
    MB,
    NO_WRONG_JOINS,
    counters,
    ct_marks,
    delta,
    fetch,
    fetch_in_background,
    flooding,
    forget_connections,
    inject,
    nft_counters,
    one_path_download,
    token_map,
    wait_for,
    worker_stats,
    wrong_joins,
)
from mplb_nfq.lab.packets import ACK, CLIENT_KEY, SYN, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.marks import BACKEND_MASK
from mplb_nfq.lab.lab import PORT, WorkerProcess
from mplb_nfq.lab.netns import VIP, backend_address

pytestmark = KERNEL
def handled(topo, w):
    return worker_stats(topo, w)["packets"]["packets"]


@pytest.fixture
def sysctl(topo):
    """Set LB sysctls for one test; they are put back after it."""
    saved = {}

    def set_(name, value):
        saved.setdefault(name, topo.exec("lb", "sysctl", "-n", name, capture_output=True).stdout.strip())
        topo.exec("lb", "sysctl", "-q", "-w", f"{name}={value}")

    yield set_
    for name, value in saved.items():
        topo.exec("lb", "sysctl", "-q", "-w", f"{name}={value}")


@pytest.mark.parametrize("handshakes, reach_the_worker", [("kernel", 0), ("queue", 1)])
def test_a_plain_connection_repeating_mp_capable_on_every_ack_reaches_the_worker_once(
        topo, worker, sysctl, handshakes, reach_the_worker):
    """Its SYN (plain TCP) settles it: in the kernel, or by the worker's verdict."""
    w = worker("mplb", kernel=f'handshakes = "{handshakes}"\n')
    sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 1)  # our ACKs are forged: let conntrack take them
    before = handled(topo, w)
    client = "10.0.1.51"  # no host owns it: the backend's answers die at the LB
    port = 52001 + reach_the_worker  # a connection of its own: conntrack remembers the other run's
    inject(topo, [tcp(client, VIP, port, PORT, SYN)])
    time.sleep(0.3)
    ack = tcp(client, VIP, port, PORT, ACK, mp_capable(1, 0x01, CLIENT_KEY), seq=1001, ack=1)
    assert inject(topo, [ack], repeat=2000) == 2000
    time.sleep(0.5)
    assert handled(topo, w) - before == reach_the_worker


def test_under_overload_the_queue_fails_open_and_real_connections_are_served(topo, worker):
    """A flood of joins no token matches: each is queued; held in the kernel, the SYNs are not."""
    w = worker("mplb")
    os.kill(w.proc.pid, signal.SIGSTOP)  # a worker that reads nothing: its queue fills (4096)
    try:
        joins = [tcp(f"10.0.2.{100 + i % 100}", VIP, 2000 + i, PORT, SYN, mp_join_syn(0x20000000 + i))
                 for i in range(5000)]
        assert inject(topo, joins) == 5000
        results = fetch(topo, MB)  # its handshake finds the queue full: it passes, fail-open
        assert [r["received"] for r in results] == [MB]
        fields = open(f"/proc/{w.proc.pid}/net/netfilter/nfnetlink_queue").read().split()
        assert (int(fields[5]), int(fields[6])) == (0, 0)  # nothing dropped: queue full, socket full
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    assert wait_for(lambda: handled(topo, w) >= 4096, 20)  # the backlog decided, the worker alive
    assert w.proc.poll() is None


def test_a_full_token_map_degrades_to_queued_joins_not_misrouted_ones(topo, worker):
    w = worker("mplb", extra="[limits]\ntoken_capacity = 2\n")
    topo.exec("lb", "nft", "add element inet mplb tokens { 0x01010101 : 0x08000100, 0x02020202 : 0x08000100 }")
    before = counters(topo)
    assert [r["received"] for r in fetch(topo, MB)] == [MB]
    stats = worker_stats(topo, w)
    assert stats["packets"]["token_install_errors"] >= 1  # the map is full
    assert stats["packets"]["kinds"].get("join_hit", 0) >= 1  # the join was queued, and the core knew it
    assert wrong_joins(before, counters(topo)) == NO_WRONG_JOINS


def test_a_crafted_join_opens_nothing_on_a_drained_backend_and_a_real_one_still_gets_there(topo, worker):
    w = worker("mplb")
    with one_path_download(topo, 60 * MB) as download:  # long enough to still run when its join comes
        wait_for(lambda: token_map(topo), 5)  # learned from its handshake's copy
        ((token, (mark, _)),) = token_map(topo).items()
        home = download.home
        topo.exec("lb", sys.executable, "-m", "mplb_nfq", "drain", home, "-c", str(w.config_path))
        assert wait_for(lambda: f"0x{mark & BACKEND_MASK:08x}" in topo.exec(
            "lb", "nft", "list", "set", "inet", "mplb", "unavailable", capture_output=True).stdout, 5)
        # nftables reads the join past an end of options, and only the first MPTCP option: both
        # SYNs meet the token map, which sends them to the worker, their backend being drained
        past_the_end = b"\x00\x00\x00\x00" + mp_join_syn(token)  # every kernel stops at the end: plain TCP
        both = mp_join_syn(token) + mp_capable()  # plain TCP to some kernels, a join to others (6.18)
        before = counters(topo)
        inject(topo, [tcp("10.0.1.53", VIP, port, PORT, SYN, options)
                      for port, options in ((53001, past_the_end), (53002, both))])
        wait_for(lambda: nft_counters(topo)["queued_join_unavailable"] == 2
                 and worker_stats(topo, w)["packets"]["kinds"].get("malformed", 0) == 1, 5)
        (ct_mark,) = ct_marks(topo, "10.0.1.53", 53001)
        assert ct_mark & BACKEND_MASK not in (0, mark & BACKEND_MASK)  # scheduled, not on the drained one
        assert ct_marks(topo, "10.0.1.53", 53002) == []  # dropped: the one verdict safe under either reading
        assert sum(delta(before, counters(topo), "joins").values()) == 0  # no backend received a join
        topo.subflow_endpoint(True)  # a real join of the live connection: to its drained backend
        assert json.loads(download.process.communicate(timeout=60)[0])["received"] == 60 * MB
        end = counters(topo)
        joins = {key: delta(download.before, end, key) for key in ("MPTcpExtMPJoinSynRx", "MPTcpExtMPJoinAckRx")}
        assert joins["MPTcpExtMPJoinAckRx"][home] == 1, (joins, worker_stats(topo, w)["packets"]["kinds"])
        assert wrong_joins(download.before, end) == NO_WRONG_JOINS


def test_a_token_lives_as_long_as_its_connection(topo, worker):
    """The token leaves the map when conntrack destroys its connection's entry: here deleted, as
    its timeout does once conntrack's garbage collector comes by (within a minute on this kernel)."""
    w = worker("mplb", kernel="conntrack_interval = 0.3")
    assert [r["received"] for r in fetch(topo, MB)] == [MB]
    held = token_map(topo)
    assert len(held) == 1 and list(held.values())[0][1].endswith(f">{VIP}:{PORT}")  # the element names its connection
    wait_for(lambda: worker_stats(topo, w)["conntrack"].get("watched") == 1, 5)  # the follower watches its connection
    forget_connections(topo)
    try:
        wait_for(lambda: not token_map(topo), 5)
    except AssertionError:
        raise AssertionError(f"the token stayed: {token_map(topo)}; the worker said: "
                             f"{w.log_path.read_text()[-2000:]}") from None
    assert worker_stats(topo, w)["packets"]["tokens_removed"] == 1


def test_marks_on_other_traffic_are_not_ours_to_act_on(topo, worker):
    worker("mplb")
    real = backend_address(0)
    topo.exec("lb", "nft", "add table inet foreign; add chain inet foreign pre "
                           "{ type filter hook prerouting priority mangle - 20; }; "
                           f"add rule inet foreign pre ip daddr {real} tcp dport {PORT} meta mark set 0x20000000")
    try:
        out = topo.exec("client", sys.executable, "-m", "mplb_nfq.lab.transfer", "fetch", real, "--port",
                        str(PORT), "--size", str(MB), capture_output=True).stdout
        assert json.loads(out)["received"] == MB  # our reject bit on it, yet not reset by us
        assert nft_counters(topo)["rejected"] == 0
    finally:
        topo.exec("lb", "nft", "delete table inet foreign")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["systemd-stop", "kill-9"])
def test_a_restart_mid_transfer_leaves_the_transfer_whole_and_the_token_adopted(topo, worker, tmp_path, stop):
    w = worker("mplb")
    with one_path_download(topo, 30 * MB) as download:
        wait_for(lambda: token_map(topo), 5)  # learned before the restart: the new worker adopts it
        w.proc.send_signal(stop)
        w.proc.wait(timeout=30)
        again = WorkerProcess(topo, w.config_path, tmp_path / "restarted.log")
        try:
            # the open connection's token: from the snapshot a graceful stop leaves, or the kernel map
            assert again.ready["adopted"] == 1
            assert again.ready["adopted_from"] == ("snapshot" if stop == signal.SIGTERM else "map")
            topo.subflow_endpoint(True)  # a new subflow of the connection opened before the restart
            assert json.loads(download.process.communicate(timeout=60)[0])["received"] == 30 * MB
            end = counters(topo)
            assert delta(download.before, end, "MPTcpExtMPJoinAckRx")[download.home] == 1
            assert wrong_joins(download.before, end) == NO_WRONG_JOINS
            forget_connections(topo)  # its conntrack entry goes: the restarted worker watches it
            wait_for(lambda: not token_map(topo), 5)
        finally:
            again.stop()


def test_replays_of_a_live_token_reach_its_backend_16_a_second_and_other_joins_all_get_through(topo, worker):
    """Joins carrying a live connection's token (its client, or someone on its path, replaying
    it) are steered by the token map like real ones; past 16 a second for one token, the kernel
    drops them, so its backend's SYN queue stays free for everyone else's joins."""
    worker("mplb")
    live = fetch_in_background(topo, 200 * MB)
    try:
        wait_for(lambda: token_map(topo), 5)
        (token,) = token_map(topo)
        before = counters(topo)
        with flooding(topo, "replay", token=token):
            started = time.monotonic()
            wait_for(lambda: nft_counters(topo)["join_rate_limited"] >= 2000, 10)
            (result,) = fetch(topo, 4 * MB)
            after, elapsed = counters(topo), time.monotonic() - started
    finally:
        live.kill()
        live.communicate()
        forget_connections(topo)
    assert result["received"] == 4 * MB
    joined = sum(delta(before, after, "joins").values())
    assert joined <= 16 * (elapsed + 2) + 1, (joined, elapsed)  # the replays let through, and the fetch's join
    assert sum(delta(before, after, "MPTcpExtMPJoinAckRx").values()) >= 1  # the fetch's join completed
    assert wrong_joins(before, after)["misrouted"] == 0
