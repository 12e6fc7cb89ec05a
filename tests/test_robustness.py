"""Robustness on the real kernel: worker restarts, malformed packets, token collisions, floods."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from netlab import (
    KERNEL,
    MB,
    NO_WRONG_JOINS,
    counters,
    ct_marks,
    delta,
    fetch,
    inject,
    nft_counters,
    one_path_download,
    token_map,
    wait_for,
    worker_stats,
    wrong_joins,
)
from mplb_nfq.lab.packets import SYN, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.marks import BACKEND_MASK, JOIN
from mplb_nfq.lab.lab import PORT
from mplb_nfq.lab.netns import VIP

pytestmark = KERNEL
FAST = "conntrack_interval = 0.3\n"


def kinds(topo, w):
    return worker_stats(topo, w)["packets"]["kinds"]


@pytest.mark.parametrize("handshakes, reach_the_worker", [("kernel", 1), ("queue", 4)])
def test_malformed_packets_get_a_verdict_that_respects_drain_are_counted_and_the_worker_lives_on(
        topo, worker, handshakes, reach_the_worker):
    """In the kernel, only the SYN whose option nftables reads as a join reaches the worker (no
    token: it is queued); held in the queue, every one nftables can read."""
    w = worker("mplb", kernel=f'handshakes = "{handshakes}"\n')
    topo.exec("lb", sys.executable, "-m", "mplb_nfq", "drain", "b2", "-c", str(w.config_path))
    bad_options = [bytes([30, 2]), bytes([30, 8, 0x01, 0x81, 1, 2, 3, 4]), bytes([30, 13, 0x10, 1]) + bytes(9),
                   bytes([30, 3, 0x20]), bytes([2, 1, 0, 0]), bytes([30, 12, 0x05, 0x81]) + bytes(8)]
    base = 20000 + 100 * reach_the_worker  # connections of their own: conntrack remembers the other run's
    packets = [tcp("10.0.1.60", VIP, base + i, PORT, SYN, options) for i, options in enumerate(bad_options)]
    assert inject(topo, packets) == len(bad_options)
    time.sleep(0.5)
    stats = worker_stats(topo, w)
    assert stats["packets"]["kinds"].get("malformed", 0) >= reach_the_worker  # (option length 1 nftables cannot read)
    assert stats["packets"].get("errors", 0) == 0 and w.proc.poll() is None
    for i in range(len(bad_options)):  # taken as Linux takes them: plain SYNs, scheduled, drain respected
        assert all(mark & BACKEND_MASK in (0, 0x100) for mark in ct_marks(topo, "10.0.1.60", base + i)), i
    assert [r["received"] for r in fetch(topo, MB)] == [MB]


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def test_syn_and_join_floods_keep_memory_bounded_and_let_real_connections_through(topo, worker):
    w = worker("mplb", extra="[limits]\nflow_capacity = 2000\ntoken_capacity = 2000\n")
    rss_before = rss_kib(w.proc.pid)
    syns = [tcp(f"10.0.1.{100 + i % 100}", VIP, 1024 + i, PORT, SYN, mp_capable()) for i in range(5000)]
    joins = [tcp(f"10.0.2.{100 + i % 100}", VIP, 1024 + i, PORT, SYN, mp_join_syn(0x10000000 + i * 7919))
             for i in range(5000)]
    flood = threading.Thread(target=inject, args=(topo, syns + joins), kwargs={"repeat": 3, "seconds": 8})
    flood.start()
    time.sleep(0.2)
    results = fetch(topo, MB, MB)  # real clients, during the flood
    flood.join()
    time.sleep(0.5)
    assert [r.get("received") for r in results] == [MB, MB]
    stats = worker_stats(topo, w)
    assert stats["flows_tracked"] <= 2000 and stats["tokens_tracked"] <= 2000
    handled = stats["packets"]["packets"]
    dropped = stats["queue_drops"]["queue_full"] + stats["queue_drops"]["socket_full"]
    nft = nft_counters(topo)
    assert nft["queued_syn"] == 0 and nft["decided"] >= 5000  # the SYN flood never reached the worker
    assert handled + dropped >= 5000, (handled, dropped)  # every flood join was either decided or counted
    grown = rss_kib(w.proc.pid) - rss_before
    print(f"flood: {handled} decided, {dropped} dropped at the queue, worker RSS +{grown} KiB")
    assert grown < 50_000, "the worker's memory grew by more than 50 MB"
    assert w.proc.poll() is None


def queue_counts(pid):
    """Packets each queue handed out (id_sequence), in the namespace of process pid."""
    lines = open(f"/proc/{pid}/net/netfilter/nfnetlink_queue").read().splitlines()
    return {int(line.split()[0]): int(line.split()[7]) for line in lines}


def test_with_two_workers_ready_means_both_queues_have_their_reader(topo, worker):
    """Else a packet fanned out to a queue not yet bound passes unbalanced (the queue is bypassed)."""
    worker("mplb", kernel="workers = 2\n" + FAST)
    assert len(queues_bound(topo)) == 2


def test_two_workers_share_tokens_through_the_kernel_map_and_misroute_no_join(topo, worker):
    """The queue fan-out hashes addresses, not ports: a join from the client's second address
    may reach the other worker. The first worker learns the tokens from copies and puts them in
    the kernel map; a join that raced its token is held by whichever worker it reaches, until
    the map has it."""
    w = worker("mplb", kernel="workers = 2\n" + FAST)
    before = counters(topo)
    results = fetch(topo, *[MB] * 8, pause=0.1)
    time.sleep(0.5)
    after = counters(topo)
    assert [r["received"] for r in results] == [MB] * 8
    capable = delta(before, after, "MPTcpExtMPCapableSYNRX")
    assert delta(before, after, "MPTcpExtMPJoinAckRx") == capable  # every join on its connection's backend
    assert wrong_joins(before, after) == NO_WRONG_JOINS
    nft = nft_counters(topo)
    raced = nft["queued_join"]
    assert sum(queue_counts(w.proc.pid).values()) == raced and nft["join_kernel_hit"] + raced == 8
    wait_for(lambda: worker_stats(topo, w)["packets"]["packets"] == raced, 5)  # the second worker's report is in
    stats = worker_stats(topo, w)["packets"]
    assert stats["workers"] == 2 and stats.get("held_expired", 0) == 0 and stats["copies"] == 8
    joins = [tcp(f"10.0.2.{50 + i}", VIP, 50005, PORT, SYN, mp_join_syn(0x5EED0000 + i)) for i in range(16)]
    inject(topo, joins)  # unknown tokens, from 16 addresses: both queues get some (all in one: p = 2**-15)
    wait_for(lambda: worker_stats(topo, w)["packets"].get("held_dropped_once") == 16, 5)  # both workers', summed
    per_queue = queue_counts(w.proc.pid)
    assert min(per_queue.values()) > 0 and sum(per_queue.values()) == raced + 16, per_queue
    inject(topo, joins)  # as their clients would send them again: held again, then the policy
    wait_for(lambda: worker_stats(topo, w)["packets"]["kinds"].get("join_miss") == 16, 5)
    w.proc.send_signal(signal.SIGKILL)  # the others follow the first worker, and the queues are bypassed
    w.proc.wait()
    time.sleep(1.0)
    assert queues_bound(topo) == []
    assert [r["received"] for r in fetch(topo, MB)] == [MB]


def queues_bound(topo):
    """The queues some process still listens on in the LB namespace."""
    out = topo.exec("lb", "cat", "/proc/net/netfilter/nfnetlink_queue", capture_output=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()]


def test_with_two_workers_a_join_ahead_of_its_token_is_held_until_the_kernel_map_has_it(topo, worker):
    w = worker("mplb", kernel="workers = 2\nhold_ms = 10000\n" + FAST)
    before = counters(topo)
    inject(topo, [tcp("10.0.2.50", VIP, 50006, PORT, SYN, mp_join_syn(0x5EED1234))])  # not a connection of the test before
    wait_for(lambda: worker_stats(topo, w)["packets"]["kinds"].get("join_held") == 1, 10)
    second = 0x100 + 1  # the second backend's mark
    topo.exec("lb", "nft", f"add element inet mplb tokens {{ 0x5eed1234 timeout 60s : 0x{second | JOIN:08x} }}")
    wait_for(lambda: worker_stats(topo, w)["packets"].get("held_found") == 1, 4)
    assert delta(before, counters(topo), "MPTcpExtMPJoinSynRx") == dict(zip(topo.backend_names, (0, 1)))


def test_a_worker_whose_conntrack_follower_dies_stops_with_the_reason_and_the_next_one_reads_the_map_back(topo, worker):
    """Without its follower no token would end with its connection: the worker stops (the service
    manager starts another), and the data path stays meanwhile."""
    w = worker("mplb")
    with one_path_download(topo, 20 * MB) as download:
        wait_for(lambda: token_map(topo), 5)
        tokens = set(token_map(topo))
        (follower,) = {int(child) for task in Path(f"/proc/{w.proc.pid}/task").iterdir()
                       for child in (task / "children").read_text().split()}
        os.kill(follower, signal.SIGKILL)
        assert w.proc.wait(timeout=10) == 1
        assert "the conntrack follower exited (code -9)" in w.log_path.read_text()
        assert set(token_map(topo)) == tokens
        restarted = worker("mplb")
        assert (restarted.ready["adopted_from"], restarted.ready["adopted"]) == ("map", len(tokens))
        result = json.loads(download.process.communicate(timeout=60)[0])
    assert result["received"] == 20 * MB and result["intact"]
