"""The data path on the real kernel: nftables, NFQUEUE, conntrack, policy routing and Linux MPTCP,
in network namespaces made (and removed) here. Needs root."""
import ipaddress
import json
import signal
import sys
import time

import pytest
from conftest import lab_topology
from netlab import (
    KERNEL,
    MB,
    NO_WRONG_JOINS,
    counters,
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
from mplb_nfq.lab.packets import ACK, CLIENT_KEY, COLLIDING, SYN, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.jhash import flow_key, slot
from mplb_nfq.core.marks import DISPLACEABLE, REJECT
from mplb_nfq.core.packet import token_of_key
from mplb_nfq.lab.lab import PORT, WorkerProcess, config_text
from mplb_nfq.lab.netns import VIP, VIP6, backend_address

pytestmark = KERNEL


@pytest.fixture(scope="module", params=["routed", "dsr"])
def topo(request):
    """Both return paths: through the LB, and direct server return (the backends answer the
    client through the switch; the LB sees one direction only)."""
    yield from lab_topology(direct_return=request.param == "dsr")


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request, topo):
    """Run a test over IPv4 and over IPv6: the client's second address of that family opens the subflows."""
    topo.subflow_endpoint(True, request.param)
    yield request.param
    topo.subflow_endpoint(True, 4)


def test_both_subflows_of_a_connection_land_on_one_backend(topo, worker, family):
    worker("mplb")
    before = counters(topo)
    (result,) = fetch(topo, 5 * MB, family=family)
    after = counters(topo)
    assert result["received"] == 5 * MB
    capable = delta(before, after, "MPTcpExtMPCapableSYNRX")
    joined = delta(before, after, "MPTcpExtMPJoinAckRx")
    (backend,) = [name for name, n in capable.items() if n == 1]
    assert joined[backend] == 1, f"the join did not complete on {backend}: {joined}"
    assert sum(capable.values()) == 1 and sum(joined.values()) == 1
    assert wrong_joins(before, after) == NO_WRONG_JOINS


def test_unaware_balancer_sends_the_join_elsewhere_and_it_is_reset(topo, worker, family):
    worker("unaware")
    before = counters(topo)
    (result,) = fetch(topo, 2 * MB, family=family)
    after = counters(topo)
    assert result["received"] == 2 * MB  # the connection survives on its first subflow
    capable = delta(before, after, "MPTcpExtMPCapableSYNRX")
    missed = delta(before, after, "misrouted")
    (home,) = [name for name, n in capable.items() if n == 1]
    (other,) = [name for name in capable if name != home]
    assert missed[other] >= 1 and missed[home] == 0
    assert sum(delta(before, after, "MPTcpExtMPJoinAckRx").values()) == 0


def test_only_handshake_packets_reach_the_worker(topo, worker, family):
    w = worker("mplb")
    connections = 4
    rx_before = int(topo.exec("lb", "cat", "/sys/class/net/l1/statistics/rx_packets", capture_output=True).stdout) + \
        int(topo.exec("lb", "cat", "/sys/class/net/l2/statistics/rx_packets", capture_output=True).stdout)
    results = fetch(topo, *[3 * MB] * connections, pause=0.1, family=family)
    assert [r["received"] for r in results] == [3 * MB] * connections
    rx_after = int(topo.exec("lb", "cat", "/sys/class/net/l1/statistics/rx_packets", capture_output=True).stdout) + \
        int(topo.exec("lb", "cat", "/sys/class/net/l2/statistics/rx_packets", capture_output=True).stdout)
    nft = nft_counters(topo)
    stats = w.stop()
    queued = sum(n for name, n in nft.items() if name.startswith("queued_"))
    assert stats["packets"] == queued, (stats, nft)
    kinds = stats["kinds"]
    # every SYN is decided in the kernel; the worker learns each token from a copy of the packet
    # that carries the server's key, and sees a join only if it raced that copy
    assert nft["queued_syn"] == 0, (stats, nft)
    if topo.direct_return:
        # the LB sees no SYN-ACK: the third ACK (both keys) is copied, and the connection's next
        # MPTCP packet, which proves its token. A join's SYN is not tracked: one the token map
        # steers leaves its flow for its first ACK, in the kernel too; one that raced its token's
        # copy is steered by the worker, and so is its first ACK
        assert stats["copies"] == 2 * connections and nft["copied_proof"] == connections, (stats, nft)
        assert nft["copied_capable"] == connections and kinds["third_ack"] == connections
        # each token proven: renewed in the map, or added whole if taught and proven in one batch
        assert kinds["token_proven"] == connections == stats["tokens_proven"] + stats["tokens_installed"], stats
        assert nft["join_kernel_hit"] + nft["queued_join"] == connections
        assert nft["join_first_ack"] == nft["join_kernel_hit"] and nft["queued_first"] == nft["queued_join"], \
            (kinds, nft)  # (1 == 2 once in a suite run: a join SYN retransmitted, or its first ACK settled elsewhere?)
        assert kinds.get("join_hit", 0) == kinds.get("first_packet", 0) == nft["queued_join"], (kinds, nft)
        assert queued == 2 * nft["queued_join"], (kinds, nft)
    else:
        assert stats["copies"] == connections and nft["copied_proof"] == 0, (stats, nft)
        assert nft["copied_synack"] == connections and kinds["syn_ack"] == connections
        assert nft["join_kernel_hit"] + nft["queued_join"] == connections
        assert queued == nft["queued_join"] == kinds.get("join_hit", 0), (kinds, nft)
    # the exact counts above are the proof; this only checks that bulk traffic did flow (the
    # client's ACKs, a few hundred per 3 MB once coalesced), none of it queued
    client_packets = rx_after - rx_before
    assert client_packets > 50 * queued, f"{client_packets} packets from the client, {queued} queued"


def test_killing_the_worker_mid_transfer_does_not_break_the_transfer(topo, worker, family):
    w = worker("mplb")
    before = counters(topo)
    download = fetch_in_background(topo, 20 * MB, family=family)
    time.sleep(0.8)
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait()
    out, _ = download.communicate(timeout=60)
    result = json.loads(out)
    assert result["received"] == 20 * MB, result
    assert wrong_joins(before, counters(topo)) == NO_WRONG_JOINS
    # with no worker listening, the queue is bypassed: new connections still get through
    (later,) = fetch(topo, 1 * MB, family=family)
    assert later["received"] == 1 * MB


def test_with_the_worker_killed_a_join_whose_token_was_learned_is_still_steered_in_the_kernel(topo, worker):
    """Under direct server return too: the join's SYN is steered by the token map and leaves its
    flow for its first ACK, which carries no token."""
    w = worker("mplb")
    with one_path_download(topo, 30 * MB) as download:
        wait_for(lambda: token_map(topo), 5)  # its token learned from the copy, in the kernel map
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        topo.subflow_endpoint(True)  # the join of the live connection, with no worker anywhere
        result = json.loads(download.process.communicate(timeout=60)[0])
    assert result["received"] == 30 * MB and result["intact"]
    end = counters(topo)
    assert delta(download.before, end, "MPTcpExtMPJoinAckRx")[download.home] == 1
    assert wrong_joins(download.before, end) == NO_WRONG_JOINS


def test_with_the_worker_killed_new_connections_are_still_spread_over_every_backend(topo, worker):
    """The kernel decides: with no worker, the scheduler tables stay and keep balancing; only
    learning stops (joins then take the queue's fail-open path)."""
    w = worker("mplb")
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait()
    before = counters(topo)
    results = fetch(topo, *[64 * 1024] * 8, pause=0.05)
    assert [r["received"] for r in results] == [64 * 1024] * 8
    capable = delta(before, counters(topo), "MPTcpExtMPCapableSYNRX")
    assert sum(capable.values()) == 8 and all(n > 0 for n in capable.values()), capable
    assert len(capable) == topo.backends
    # a join no token map entry steers has nobody to wait for: dropped, not sent to a guess (the
    # client's next SYN finds a worker, or is dropped again)
    before = counters(topo)
    inject(topo, [tcp("10.0.2.60", VIP, 50077, PORT, SYN, mp_join_syn(0x7E570001))] * 2)
    time.sleep(0.3)
    assert sum(delta(before, counters(topo), "MPTcpExtMPJoinSynRx").values()) == 0


def test_stopping_the_worker_keeps_the_data_path_and_cleanup_removes_exactly_ours(topo, worker, tmp_path):
    def state():
        return (topo.exec("lb", "nft", "list", "tables", capture_output=True).stdout,
                topo.exec("lb", "ip", "rule", capture_output=True).stdout,
                topo.exec("lb", "ip", "route", "show", "table", "all", capture_output=True).stdout)

    topo.exec("lb", "nft", "add table inet operator_table")  # not ours: must survive
    try:
        pristine = state()
        w = worker("mplb")
        running = state()
        tables, rules, routes = running
        assert "inet mplb" in tables and "fwmark 0x100/0xffff lookup 1000" in rules and "table 1001" in routes
        second = topo.exec("lb", sys.executable, "-m", "mplb_nfq", "run", "-c", str(w.config_path),
                           capture_output=True, check=False)  # by mistake: refused, nothing touched
        assert second.returncode == 1 and "another mplb-nfq runs" in second.stderr and state() == running
        refused = topo.exec("lb", sys.executable, "-m", "mplb_nfq", "cleanup", "-c", str(w.config_path),
                            capture_output=True, check=False)
        assert refused.returncode == 1 and state() == running  # not under a running worker
        assert [r["received"] for r in fetch(topo, MB)] == [MB]  # it still serves
        w.stop(cleanup=False)
        assert state() == running  # as systemd stops it: the data path stays for the next one
        assert [r["received"] for r in fetch(topo, MB)] == [MB]  # no worker: the fail-open route serves
        topo.exec("lb", sys.executable, "-m", "mplb_nfq", "cleanup", "-c", str(w.config_path))
        assert state() == pristine
    finally:
        topo.exec("lb", "nft", "delete table inet operator_table")


def test_a_backend_keeps_its_mark_across_a_restart_after_a_reload_removed_another(topo, worker, tmp_path):
    """Marks follow the order of the file; a restart reads them back from the kernel instead, so
    that conntrack's marks keep naming the same backends. The removed backend's leftovers go too."""
    w = worker("mplb")
    text = w.config_path.read_text()
    first_backend = text.index("[[backends]]")
    second_backend = text.index("[[backends]]", first_backend + 1)
    without_b1 = text[:first_backend] + text[second_backend:]
    without_b1 = without_b1.replace('backends = ["b1", "b2"]', 'backends = ["b2"]')
    w.config_path.write_text(without_b1)
    assert topo.exec("lb", sys.executable, "-m", "mplb_nfq", "reload", "-c", str(w.config_path),
                     capture_output=True).returncode == 0
    w.stop(cleanup=False)
    again = WorkerProcess(topo, w.config_path, tmp_path / "again.log")
    try:
        status = json.loads(topo.exec("lb", sys.executable, "-m", "mplb_nfq", "status", "--json", "-c",
                                      str(w.config_path), capture_output=True).stdout)
        (b2,) = status["services"][0]["backends"]
        assert b2["name"] == "b2" and b2["mark"] == "0x101"  # not 0x100, the first mark, as the file now says
    finally:
        again.stop()
    rules = topo.exec("lb", "ip", "rule", capture_output=True).stdout
    assert "lookup 1000" not in rules and "lookup 1001" not in rules  # cleanup found b1's leftovers too


def test_render_nft_output_loads_with_plain_nft(topo, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(config_text("mplb", 2, tmp_path))
    rendered = topo.exec("lb", sys.executable, "-m", "mplb_nfq", "render-nft", "-c", str(config),
                         capture_output=True).stdout
    path = tmp_path / "mplb.nft"
    path.write_text(rendered)
    try:
        topo.exec("lb", "nft", "-f", str(path))
        listing = topo.exec("lb", "nft", "list", "table", "inet", "mplb", capture_output=True).stdout
        assert f"{VIP} . {PORT}" in listing and "map tokens" in listing
    finally:
        topo.exec("lb", "nft", "delete", "table", "inet", "mplb")


TOKEN_MAP_WRITES = """
from mplb_nfq.kernel.tokenmap import TokenMap
tokens = TokenMap("mplb")
print(tokens.add([(0x11223344, 0x48000100), (0xDEADBEEF, 0x48000101)], 600))
print(tokens.add([(0x11223344, 0x48000100)], 600))  # the same again: nothing to do
print(tokens.add([(0x0BADCAFE, 0x48000100), (0xDEADBEEF, 0x48000100)], 600))  # another mark: refused alone
"""


def test_the_token_map_socket_adds_what_nft_reads_back_and_refuses_a_changed_mark_alone(topo, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(config_text("mplb", 2, tmp_path))
    rendered = topo.exec("lb", sys.executable, "-m", "mplb_nfq", "render-nft", "-c", str(config),
                         capture_output=True).stdout
    (tmp_path / "mplb.nft").write_text(rendered)
    topo.exec("lb", "nft", "-f", str(tmp_path / "mplb.nft"))
    try:
        refused = topo.exec("lb", sys.executable, "-c", TOKEN_MAP_WRITES, capture_output=True).stdout.split()
        assert refused == ["[]", "[]", f"[{0xDEADBEEF}]"]
        listing = json.loads(topo.exec("lb", "nft", "-j", "list", "map", "inet", "mplb", "tokens",
                                       capture_output=True).stdout)
        (elements,) = [item["map"]["elem"] for item in listing["nftables"] if "map" in item]
        found = {key["elem"]["val"]: (mark, key["elem"]["timeout"]) for key, mark in elements}
        assert found == {0x11223344: (0x48000100, 600), 0xDEADBEEF: (0x48000101, 600), 0x0BADCAFE: (0x48000100, 600)}
    finally:
        topo.exec("lb", "nft", "delete", "table", "inet", "mplb")


def test_check_reports_the_queue_mode(topo):
    """What `check` says of the queue statement agrees with nft itself, asked here directly."""
    report = json.loads(topo.exec("lb", sys.executable, "-m", "mplb_nfq", "check", "--json",
                                  capture_output=True, check=False).stdout)
    assert report["features"]["nft token map"]["ok"] and report["features"]["conntrack events and labels"]["ok"]
    probe = topo.exec("lb", "nft", "add table inet qprobe; add chain inet qprobe c; "
                                   "add rule inet qprobe c queue num 0 bypass", capture_output=True, check=False)
    topo.exec("lb", "nft", "delete table inet qprobe", check=False, capture_output=True)
    native = probe.returncode == 0
    assert report["features"]["nft queue statement"]["ok"] == native
    assert report["queue_mode"] == ("native nft queue" if native else "xtables NFQUEUE on mark bit")


def test_a_ruleset_the_operator_installed_is_filled_and_never_deleted(topo, worker, tmp_path):
    config = tmp_path / "operator.toml"
    config.write_text(config_text("mplb", 2, tmp_path, direct_return=topo.direct_return).replace(
        f'vips = ["{VIP}", "{VIP6}"]', f'vips = ["{VIP}"]'))  # the file the operator rendered: IPv4 only
    rendered = topo.exec("lb", sys.executable, "-m", "mplb_nfq", "render-nft", "-c", str(config),
                         capture_output=True).stdout
    (tmp_path / "mplb.nft").write_text(rendered)
    topo.exec("lb", "nft", "-f", str(tmp_path / "mplb.nft"))  # as the distribution's nftables service would
    try:
        w = worker("mplb")  # its config has the IPv6 VIP too: the worker fills the sets in
        (result,) = fetch(topo, MB, family=6)
        assert result["received"] == MB
        w.stop()
        listing = topo.exec("lb", "nft", "list", "table", "inet", "mplb", capture_output=True).stdout
        assert "installed by the operator" in listing and f"{VIP} . {PORT}" in listing
        assert f"{VIP6} . {PORT}" in listing
    finally:
        topo.exec("lb", "nft", "delete", "table", "inet", "mplb")


def on_other_slot(client: str, port: int, other: int) -> bool:
    """The two connections from client to the VIP take different slots of a two-backend table
    indexed by a hash of the connection (kernel.ruleset, core.jhash)."""
    def position(sport):
        return slot(flow_key(ipaddress.ip_address(client).packed, sport, ipaddress.ip_address(VIP).packed, PORT), 2)
    return position(port) != position(other)


ADD_TOKEN = """
import sys
from mplb_nfq.kernel.tokenmap import TokenMap
TokenMap("mplb").add([(int(sys.argv[1]), int(sys.argv[2]))], 600)
"""


def test_the_ruleset_model_that_inspect_replays_matches_the_real_ruleset_rule_by_rule(topo, tmp_path):
    """Each packet goes through the real ruleset (no worker: what would be queued passes, bypassed);
    the counters it moves must be those the model names."""
    from mplb_nfq.lab.packets import SERVER_KEY

    from mplb_nfq.core.marks import JOIN
    from mplb_nfq.core.packet import Malformed, parse_ip
    from mplb_nfq.kernel.ruleset import Decider, classify
    from mplb_nfq.ops.config import load

    def as_nft_reads(packet):  # the headers as on the wire, however a backend would take them
        parsed = parse_ip(packet)
        return parsed.segment if isinstance(parsed, Malformed) else parsed

    config = tmp_path / "c.toml"
    config.write_text(config_text("mplb", 2, tmp_path, direct_return=topo.direct_return))
    rendered = topo.exec("lb", sys.executable, "-m", "mplb_nfq", "render-nft", "-c", str(config),
                         capture_output=True).stdout
    (tmp_path / "mplb.nft").write_text(rendered)
    topo.exec("lb", "nft", "-f", str(tmp_path / "mplb.nft"))
    known, mark = 0x7A9913B1, 0x101 | JOIN
    drained, drained_mark = 0x0D0D0D0D, 0x102 | JOIN
    topo.exec("lb", sys.executable, "-c", ADD_TOKEN, str(known), str(mark))
    topo.exec("lb", sys.executable, "-c", ADD_TOKEN, str(drained), str(drained_mark))
    topo.exec("lb", "nft", "add element inet mplb unavailable { 0x102 }")
    # Without a worker no route to the VIP is installed; a SYN routed nowhere leaves no conntrack
    # entry, and its SYN-ACK would be invalid. One route to the first backend stands in.
    first = backend_address(0)
    topo.exec("lb", "ip", "route", "replace", f"{VIP}/32", "via", first)
    client = "10.0.1.70"  # no host owns it: a backend's answer dies at the LB
    vips = {(ipaddress.ip_address(VIP).packed, PORT)}
    cfg = load(config)
    (table,) = cfg.balancer().lookup_tables().values()
    deciders = {key: Decider(table, True) for key in vips}
    cases = [
        ("plain SYN", tcp(client, VIP, 51001, PORT, SYN), []),
        ("MP_CAPABLE SYN", tcp(client, VIP, 51002, PORT, SYN, mp_capable()),
         # its SYN-ACK, from the backend (under DSR none passes the LB)
         [] if topo.direct_return else [tcp(VIP, client, PORT, 51002, SYN | ACK, mp_capable(1, 1, SERVER_KEY),
                                            seq=5000, ack=1001)]),
        ("join, token in the map", tcp(client, VIP, 51003, PORT, SYN, mp_join_syn(known)), []),
        ("join, unknown token", tcp(client, VIP, 51004, PORT, SYN, mp_join_syn(0x01020304)), []),
        ("join then capable", tcp(client, VIP, 51005, PORT, SYN, mp_join_syn(known) + mp_capable()), []),
        ("end of options, then a join", tcp(client, VIP, 51008, PORT, SYN, b"\x00\x00\x00\x00" + mp_join_syn(known)), []),
        ("join to a drained backend", tcp(client, VIP, 51009, PORT, SYN, mp_join_syn(drained)), []),
        ("capable ACK, no SYN seen", tcp(client, VIP, 51006, PORT, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY),
                                         seq=1001, ack=1), []),
        ("plain ACK, no SYN seen", tcp(client, VIP, 51007, PORT, ACK, seq=1001, ack=1), []),
    ]
    try:
        for name, packet, replies in cases:
            expected = []
            tokens = {known: mark, drained: drained_mark}
            outcome = classify(as_nft_reads(packet), 0, True, True, vips, tokens, {0x102}, deciders)
            expected += [outcome.queued] if outcome.queued else []
            expected += ["join_kernel_hit"] if outcome.kernel_hit or outcome.queued == "queued_join_unavailable" else []
            expected += [outcome.copied] if outcome.copied else []
            expected += ["decided"] if outcome.decided else []
            for reply in replies:  # its SYN's backend, as conntrack keeps it
                answer = classify(as_nft_reads(reply), outcome.mark, False, False, vips, {}, deciders=deciders)
                expected += [answer.queued or answer.copied]
            assert expected, name  # every case moves a counter: a ruleset that moves none fails
            before = nft_counters(topo)
            inject(topo, [packet])
            if replies:  # the backend's own answer may be quicker, or lost: this one is sure to come
                inject(topo, replies, namespace=topo.backend_names[0])
            after = nft_counters(topo)
            moved = sorted(k for k in after if after[k] != before.get(k, 0) and k != "rejected")
            assert moved == sorted(expected), name
    finally:
        topo.exec("lb", "ip", "route", "del", f"{VIP}/32", "via", first)
        topo.exec("lb", "nft", "delete", "table", "inet", "mplb")


def test_a_client_cannot_make_a_collision_its_claim_on_a_held_token_is_refused_in_the_kernel_too(topo, worker):
    """Under direct server return the LB never sees a SYN-ACK: tokens come from the clients'
    third ACKs. Two forged ones whose keys give one token: the first connection keeps it (a
    client's word, marked so in the map), the second's claim is refused; nothing is reset."""
    if not topo.direct_return:
        pytest.skip("with replies through the LB, tokens come from the backends' SYN-ACKs")
    w = worker("mplb")
    topo.exec("lb", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_be_liberal=1")  # our ACKs are forged
    try:
        client = "10.0.1.50"  # no host owns it: the backends' answers die at the LB, no RST comes back
        # two connections on different backends: the round robin table is hashed by connection here
        first, second = 50001, next(port for port in range(50002, 50100) if on_other_slot(client, 50001, port))
        inject(topo, [tcp(client, VIP, first, PORT, SYN, mp_capable()),
                      tcp(client, VIP, second, PORT, SYN, mp_capable())])
        time.sleep(0.3)
        for port, key in ((first, COLLIDING[1][0]), (second, COLLIDING[1][1])):  # two batches: installed, then refused
            inject(topo, [tcp(client, VIP, port, PORT, ACK, mp_capable(1, 0x01, CLIENT_KEY, key), seq=1001, ack=1)])
            time.sleep(0.3)
        seen = worker_stats(topo, w)["packets"]["kinds"]
        assert seen.get("third_ack") == 1 and seen.get("token_refused") == 1 and "token_collision" not in seen
        token = token_of_key(COLLIDING[1][0], 1)
        listing = json.loads(topo.exec("lb", "nft", "-j", "list", "map", "inet", "mplb", "tokens",
                                       capture_output=True).stdout)
        (elements,) = [item["map"]["elem"] for item in listing["nftables"] if "map" in item]
        held = {key["elem"]["val"]: mark for key, mark in elements}
        assert list(held) == [token] and held[token] & DISPLACEABLE and not held[token] & REJECT
        hits = nft_counters(topo)["join_kernel_hit"]
        inject(topo, [tcp("10.0.2.50", VIP, 50003, PORT, SYN, mp_join_syn(token))])
        time.sleep(0.3)
        assert nft_counters(topo)["join_kernel_hit"] == hits + 1  # the first connection's backend, in the kernel
        assert nft_counters(topo)["rejected"] == 0
    finally:
        topo.exec("lb", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_be_liberal=0")


JHASH_PROBE = """
import json, socket, sys
from pyroute2 import NFCTSocket
connections = []
for family, address, port in ((socket.AF_INET, "127.0.0.1", 81), (socket.AF_INET, "127.0.0.1", 82),
                              (socket.AF_INET6, "::1", 83)):
    server = socket.socket(family)
    server.bind((address, port))
    server.listen()
    client = socket.socket(family)
    client.connect((address, port))
    connections += [(server, client)]
marks = {}
for family in (socket.AF_INET, socket.AF_INET6):
    with NFCTSocket(nfgen_family=family) as ct:
        for entry in ct.dump():
            port = entry.get_nested("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_DST_PORT")
            source = entry.get_nested("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_SRC_PORT")
            marks[port] = (source, entry.get_attr("CTA_MARK"))
print(json.dumps(marks))
"""


def test_the_cores_jhash_finds_the_slot_nft_finds(topo):
    """The kernel indexes hashed tables with nft's jhash; the core must pick the same slot for
    the same connection (queued packets, inspect, the tests' own predictions)."""
    from mplb_nfq.core.jhash import SEED

    rules = [f"tcp dport 81 ct mark set jhash ip saddr . tcp sport . ip daddr . tcp dport mod 65537 seed 0x{SEED:x}",
             f"tcp dport 82 ct mark set jhash ip saddr mod 7 seed 0x{SEED:x}",
             f"tcp dport 83 ct mark set jhash ip6 saddr . tcp sport . ip6 daddr . tcp dport mod 65537 seed 0x{SEED:x}"]
    ruleset = "table inet jhash_probe {\nchain out {\ntype filter hook output priority mangle; policy accept;\n" \
        + "\n".join(rules) + "\n}\n}\n"
    topo.exec("lb", "ip", "link", "set", "lo", "up")
    topo.exec("lb", "nft", "-f", "-", input=ruleset, text=True)
    try:
        marks = json.loads(topo.exec("lb", sys.executable, "-c", JHASH_PROBE, capture_output=True).stdout)
    finally:
        topo.exec("lb", "nft", "delete", "table", "inet", "jhash_probe")
    v4, v6 = ipaddress.ip_address("127.0.0.1").packed, ipaddress.ip_address("::1").packed
    for port, key, size in (("81", lambda sport: flow_key(v4, sport, v4, 81), 65537), ("82", lambda _: v4, 7),
                            ("83", lambda sport: flow_key(v6, sport, v6, 83), 65537)):
        sport, mark = marks[port]
        assert mark == slot(key(sport), size), port


def spoofed_third_acks(count):
    """Bare ACKs carrying MP_CAPABLE with keys of the sender's choosing, each from its own address
    (198.18.0.0/15: benchmarking), as a spoofing client sends them: one packet, no connection."""
    return [tcp(f"198.18.{i >> 8 & 0xFF}.{i & 0xFF}", VIP, 40000 + i % 1000, PORT, ACK,
                mp_capable(1, 1, CLIENT_KEY, i.to_bytes(8, "big")), seq=7, ack=7) for i in range(1, count + 1)]


def test_spoofed_third_acks_never_take_the_room_real_connections_tokens_need(topo, worker, tmp_path):
    """Each spoofed ACK teaches a token (under direct server return nothing else can); they fill
    only the provisional quarter of the map, and a real connection's token, proven by its next
    packet, joins the others: its joins reach its backend (a miss would be reset here)."""
    config = tmp_path / "small.toml"
    config.write_text(config_text("mplb", 2, tmp_path, extra="[limits]\ntoken_capacity = 400\n",
                                  direct_return=topo.direct_return).replace(
        "direct_return =", 'unknown_join = "reset"\ndirect_return ='))
    w = WorkerProcess(topo, config, tmp_path / "small.log")
    try:
        assert inject(topo, spoofed_third_acks(3000)) == 3000
        wait_for(lambda: seen(worker_stats(topo, w)["packets"]) >= 3000, 10)
        before = counters(topo)
        results = fetch(topo, *[2 * MB] * 3)
        after = counters(topo)
        stats = worker_stats(topo, w)["packets"]
    finally:
        w.stop()
        forget_connections(topo)
    assert [r["received"] for r in results] == [2 * MB] * 3
    assert sum(delta(before, after, "MPTcpExtMPJoinAckRx").values()) == 3, stats
    assert wrong_joins(before, after) == NO_WRONG_JOINS
    if topo.direct_return:
        assert stats["kinds"]["third_ack"] >= 3000 and stats["tokens_pushed_out"] >= 2900
    else:  # the LB sees the SYN-ACKs: a first packet without a SYN teaches nothing
        assert stats["kinds"]["first_without_flow"] >= 3000 and stats.get("tokens_provisional", 0) == 0
    assert stats["tokens_tracked"] <= 400 and stats["token_install_errors"] == 0


def seen(stats):
    """Packets the worker read: queued (a routed LB queues a first packet without a SYN) or copied."""
    return stats["packets"] + stats.get("copies", 0)


def test_a_flood_of_joins_with_made_up_tokens_leaves_every_real_join_its_backend(topo, worker):
    """10,000 joins a second, each with a token nobody issued: each waits hold_ms in the worker,
    then is dropped (the policy would meet it only when sent again, and a flood does not send
    again); the real joins (some of which race their token's copy under this load) all reach
    their connection's backend."""
    w = worker("mplb")
    with flooding(topo, "joins"):
        before = counters(topo)
        results = fetch(topo, *[4 * MB] * 3)
        after = counters(topo)
        stats = worker_stats(topo, w)["packets"]
    assert [r["received"] for r in results] == [4 * MB] * 3
    assert sum(delta(before, after, "MPTcpExtMPJoinAckRx").values()) == 3, json.dumps([stats, nft_counters(topo)])
    wrong = wrong_joins(before, after)
    assert wrong["misrouted"] == wrong["late"] == 0
    assert stats["held_dropped_once"] > 1000, json.dumps(stats)
    # only the joins that met the policy (random: pushed out of the hold budget) reach a backend
    assert wrong["foreign"] <= stats["kinds"].get("join_miss", 0), json.dumps(stats)

