"""A cluster of balancers, for real: a router namespace running BIRD takes each balancer's BGP
announcements (IPv4 and IPv6 VIPs) into ECMP routes hashed on L4; each balancer runs BIRD and a
worker; Redis (an ACL user and password per balancer; over TLS for the shared cluster) is shared. The client has two addresses: its connections' joins reach
either balancer. Every join must reach its connection's backend (the backends'
judge counts no misrouted, foreign or late join) through balancer deaths, a Redis outage and a balancer added."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from netlab import KERNEL, MB, fetch, fetch_in_background, token_map, wait_for

from mplb_nfq.core.news import Keys
from mplb_nfq.lab.ecmp import STORE, ClusterTopology, balancer_address
from mplb_nfq.lab.judge import Judge
from mplb_nfq.lab.lab import FLAP_BLOCK, PORT, WorkerProcess, config_text
from mplb_nfq.lab.netns import CLIENT, leftover_namespaces

pytestmark = KERNEL


class Cluster:
    def __init__(self, topo: ClusterTopology, run_dir):
        self.topo, self.run_dir, self.workers = topo, run_dir, {}

    def start(self, role: str, metrics: str = "127.0.0.1:9842", workers: int = 1) -> WorkerProcess:  # a namespace each
        (self.run_dir / role).mkdir(exist_ok=True)
        config = self.run_dir / role / "mplb.toml"
        config.write_text(config_text("mplb", self.topo.backends, self.run_dir / role, metrics=metrics,
                                      direct_return=True, cluster=self.topo.cluster_config(role, "test"),
                                      kernel=f"conntrack_interval = 0.5\nworkers = {workers}"))
        self.workers[role] = WorkerProcess(self.topo, config, self.run_dir / role / "worker.log", role)
        return self.workers[role]

    def full_status(self, role: str) -> dict:
        out = self.topo.exec(role, sys.executable, "-m", "mplb_nfq", "status", "--json", "-c",
                             str(self.workers[role].config_path), capture_output=True).stdout
        return json.loads(out)

    def status(self, role: str) -> dict:
        return self.full_status(role)["packets"]["cluster"]

    def crossed(self) -> int:
        return sum(self.status(role)["joins_crossed"] for role, w in self.workers.items() if w.proc.poll() is None)

    def stop_all(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.stop()


def build_cluster(run_dir, tls=False, redis="single"):
    """Two balancers, each with its worker, both announced; the judge on the backends."""
    topo = ClusterTopology(backends=2, balancers=2, run_dir=run_dir, tls=tls, redis=redis)
    topo.build()
    c = Cluster(topo, run_dir)
    try:
        c.servers = [topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in topo.backend_names]
        wait_for(lambda: all(topo.exec(n, "ss", "-Hltn", f"sport = :{PORT}", capture_output=True).stdout.strip()
                             for n in topo.backend_names), 5)
        with Judge(topo) as topo.judge:
            for role in topo.balancer_names:
                c.start(role)
            topo.wait_announced(2)
            yield c
    finally:
        c.stop_all()
        for s in getattr(c, "servers", []):
            s.kill()
        topo.destroy()
    assert not [n for n in leftover_namespaces() if topo.tag in n]


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """Redis over TLS (a CA of the run's own): the clear-text path is the cluster lab's (test_lab.py)."""
    yield from build_cluster(tmp_path_factory.mktemp("cluster"), tls=True)


@pytest.fixture
def cluster(shared_cluster):
    """The module's cluster, for a test that leaves it whole: both balancers announced, Redis connected."""
    topo = shared_cluster.topo
    topo.wait_announced(2)
    wait_for(lambda: all(shared_cluster.status(r)["redis"] == "connected" for r in topo.balancer_names), 15)
    return shared_cluster


@pytest.fixture(scope="module")
def sentinel_cluster(tmp_path_factory):
    """A second cluster, whose Redis is a primary and a replica under three sentinels, for the
    module's last tests: they break it (its Redis primary killed, then a balancer)."""
    yield from build_cluster(tmp_path_factory.mktemp("sentinel"), redis="sentinel")


def wrong_joins(topo) -> dict[str, int]:
    """The judge's count of joins that reached a backend not their connection's, or were refused there."""
    counts = topo.judge.total()
    return {key: counts[key] for key in ("misrouted", "foreign", "late")}


def joins_seen(cluster, role) -> dict:
    """What a balancer's worker decided (every kind: a join may be decided as a retransmitted SYN of
    a known flow), and how late its peers' news came."""
    packets = cluster.full_status(role)["packets"]
    return {"kinds": packets.get("kinds", {}),
            "held": {k: v for k, v in packets.items() if k.startswith("held") or k.startswith("copies")},
            "propagation_ms_p99": packets.get("cluster", {}).get("propagation_ms_p99"),
            "tokens_after_held_joins_gave_up": packets.get("cluster", {}).get("tokens_after_held_joins_gave_up")}


def why_wrong(cluster) -> dict:
    """For a failed check: each wrong join (its verdict, token, flow, the backend it reached and
    its answer, the one that issued its token, and what each balancer's token map holds for it), and what each
    balancer did with the joins that reached its worker."""
    topo, ledger = cluster.topo, cluster.topo.judge.sync()
    wrong = [{"verdict": verdict, "token": f"{join.token:08x}", "flow": flow, "reached": backend, "at": join.at,
              "answer": join.answer, "issued_by": [b for b, tokens in ledger.issued.items() if join.token in tokens],
              "maps": {role: token_map(topo, role).get(join.token) for role in topo.balancer_names}}
             for backend, flows in ledger.latest.items() for flow, join in flows.items()
             if (verdict := ledger.verdict(backend, join))]
    found = {"wrong": wrong, "now": time.monotonic(),
             "balancers": {role: joins_seen(cluster, role) for role in topo.balancer_names
                           if cluster.workers[role].proc.poll() is None}}
    print("wrong joins:", json.dumps(found, default=str))  # whole: pytest cuts a long assertion message
    return found


def following_each_other(topo) -> bool:
    """Each balancer follows every other's news: Redis being back ("connected") is not enough, a
    balancer meets a peer whose keys were not there yet at its next look (half a second later),
    and a join that crosses meanwhile finds no token."""
    roles = topo.balancer_names
    for role in roles:
        out = topo.exec("store", *topo.redis_cli(role), "smembers", Keys("test").of(role, "following"),
                        capture_output=True, check=False).stdout.split()
        if set(roles) - {role} - set(out):
            return False
    return True


def joins_established(topo) -> int:
    return sum(topo.nstat(name).get("MPTcpExtMPJoinAckRx", 0) for name in topo.backend_names)


def resets(topo) -> int:
    """Resets the backends sent for a packet no socket of theirs owned: a subflow that reached
    the wrong backend (all their resets, less those MPTCP sent on purpose: MP_TCPRST, MP_FASTCLOSE)."""
    total = 0
    for name in topo.backend_names:
        out = topo.exec(name, "nstat", "-asz", "TcpOutRsts", "MPTcpExtMPRstTx", "MPTcpExtMPFastcloseTx",
                        capture_output=True, text=True,
                        env={"NSTAT_HISTORY": "/dev/null", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).stdout
        counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if not line.startswith("#")}
        total += counts.get("TcpOutRsts", 0) - counts.get("MPTcpExtMPRstTx", 0) - counts.get("MPTcpExtMPFastcloseTx", 0)
    return total


def downloads(topo, count, size, family=4):
    results = fetch(topo, *[size] * count, pause=0.05, family=family)
    assert len(results) == count
    assert all(r.get("received") == size and r["intact"] for r in results), results
    return results


def test_joins_cross_balancers_and_every_one_reaches_its_connections_backend(cluster):
    topo = cluster.topo
    established, wrong = joins_established(topo), wrong_joins(topo)
    # 2 MB: a join held for its peer's token (milliseconds) must not come after its connection
    # ended, which the backend would count as a join for an unknown token too
    downloads(topo, 20, 2 * MB)
    downloads(topo, 10, 2 * MB, family=6)
    assert wrong_joins(topo) == wrong, why_wrong(cluster)
    # wait for the last joins' counts: a status answers between two packets
    crossed = cluster.crossed()
    assert crossed > 0, "no join reached another balancer than its connection: nothing was shown"
    assert joins_established(topo) - established >= 27  # a join may lose the race with a 1 MB download's end
    for role in topo.balancer_names:
        state = cluster.status(role)
        assert state["redis"] == "connected" and state["announced"] is True
        assert state["propagation_ms_p50"] is not None and state["rejected"] == {}
        (peer,) = set(topo.balancer_names) - {role}
        assert state["peers"][peer]["fingerprint"] == state["fingerprint"]
    config = str(cluster.workers["lb1"].config_path)
    text = topo.exec("lb1", sys.executable, "-m", "mplb_nfq", "status", "-c", config, capture_output=True).stdout
    assert "Cluster: this balancer lb1, VIPs announced, Redis connected" in text
    assert "  -> lb2" in text and "same" in text
    check = topo.exec("lb1", sys.executable, "-m", "mplb_nfq", "check", "-c", config, capture_output=True).stdout
    assert "ok  cluster Redis" in check and "ok  announcement device" in check
    # the balancers spoke TLS: Redis would not have talked in clear
    plain = topo.exec("store", "redis-cli", "-h", "10.0.9.250", "--user", "lb1", "--pass", topo.redis_passwords["lb1"],
                      "--no-auth-warning", "ping", capture_output=True, check=False)
    assert topo.tls and "PONG" not in plain.stdout


def test_an_ipv6_join_of_an_ipv4_connection_reaches_its_backend_through_either_balancer(cluster):
    """Dual stack: each connection opens over IPv4 and its one extra subflow goes to the IPv6 VIP
    its backend announces; the router hashes that join to either balancer, which steers it by the
    token, whichever family taught it."""
    topo = cluster.topo
    topo.dual_stack_paths()
    try:
        established, wrong, crossed = joins_established(topo), wrong_joins(topo), cluster.crossed()
        results = fetch(topo, *[2 * MB] * 12, pause=0.05, mapped=True)  # AF_INET6 sockets, IPv4 first
        assert len(results) == 12 and all(r.get("received") == 2 * MB and r["intact"] for r in results), results
        assert wrong_joins(topo) == wrong, why_wrong(cluster)
        assert joins_established(topo) - established >= 11  # over IPv6: the client has no other second path
        assert cluster.crossed() > crossed, "no IPv6 join reached another balancer than its connection"
    finally:
        topo.dual_stack_paths(on=False)
        topo.exec("client", "ip", "mptcp", "endpoint", "add", CLIENT[6][1], "subflow")  # as the build left it


def in_token_map(topo, role, token: int) -> bool:
    return token in token_map(topo, role)


def test_entries_from_redis_that_are_malformed_or_name_an_unknown_backend_are_counted_not_installed(cluster):
    topo = cluster.topo
    cli, keys = topo.redis_cli("lb7"), Keys("test")  # a balancer's user: anyone holding its password
    rejected = lambda kind: cluster.status("lb1")["rejected"].get(kind, 0)  # noqa: E731
    unknown, malformed = rejected("unknown_backend"), rejected("malformed")
    topo.exec("store", *cli, "HSET", keys.of("lb7", "tokens"), "0badc0de", "1 nobody", capture_output=True)
    topo.exec("store", *cli, "HSET", keys.of("lb7", "tokens"), "12345678", "soon b1", capture_output=True)
    # its stream no longer holds all it published (trimmed): met for the first time, what it keeps is read
    topo.exec("store", *cli, "XADD", keys.of("lb7", "news"), "MAXLEN", "0", "*", "at", "1", capture_output=True)
    wait_for(lambda: rejected("unknown_backend") > unknown and rejected("malformed") > malformed, 10)
    malformed = rejected("malformed")
    topo.exec("store", *cli, "XADD", keys.of("lb7", "news"), "*", "at", "1", "t", "zz=b1 12345678=b1;", "s", "nonsense",
              capture_output=True)
    wait_for(lambda: rejected("malformed") >= malformed + 3, 10)
    for role in topo.balancer_names:
        assert not in_token_map(topo, role, 0x0BADC0DE) and not in_token_map(topo, role, 0x12345678)


def test_a_balancers_redis_user_writes_its_own_keys_only_and_no_entry_speaks_for_another(cluster):
    """All balancers shared one Redis user: anyone holding it could write `o=lb1` and end lb1's
    tokens on every peer. Now a stolen password (lb8's) speaks for lb8 only."""
    topo, keys, taught = cluster.topo, Keys("test"), 0x0A0B0C0D
    lb1, thief = topo.redis_cli("lb1"), topo.redis_cli("lb8")
    topo.exec("store", *lb1, "XADD", keys.of("lb1", "news"), "*", "at", "1", "t", f"{taught:08x}=b1", capture_output=True)
    wait_for(lambda: in_token_map(topo, "lb2", taught), 10)
    for command in (["XADD", keys.of("lb1", "news"), "*", "at", "1", "d", f"{taught:08x}"],
                    ["HSET", keys.of("lb1", "tokens"), "00000001", "1 b1"], ["DEL", keys.of("lb1", "tokens")],
                    ["SET", keys.of("lb1", "beat"), "{}"], ["FLUSHDB"]):
        answer = topo.exec("store", *thief, *command, capture_output=True).stdout
        assert "NOPERM" in answer, (command, answer)

    def followed(token: int) -> bool:  # the thief's stream is followed once lb2 meets it (every 2 s)
        topo.exec("store", *thief, "XADD", keys.of("lb8", "news"), "*", "at", "1", "t", f"{token:08x}=b1",
                  capture_output=True)
        return in_token_map(topo, "lb2", token)

    wait_for(lambda: followed(0x0B0B0B0B), 10, step=0.5)
    topo.exec("store", *thief, "XADD", keys.of("lb8", "news"), "*", "o", "lb1", "at", "1", "d", f"{taught:08x}",
              "t", "0c0c0c0c=b1", capture_output=True)
    wait_for(lambda: in_token_map(topo, "lb2", 0x0C0C0C0C), 10)  # the same entry: its end was read too
    assert in_token_map(topo, "lb2", taught)
    topo.exec("store", *lb1, "XADD", keys.of("lb1", "news"), "*", "at", "1", "d", f"{taught:08x}", capture_output=True)
    wait_for(lambda: not in_token_map(topo, "lb2", taught), 10)  # its teacher's end takes it out
    topo.exec("store", *thief, "XADD", keys.of("lb8", "news"), "*", "at", "1", "d", "0b0b0b0b 0c0c0c0c",
              capture_output=True)
    wait_for(lambda: not in_token_map(topo, "lb2", 0x0B0B0B0B) and not in_token_map(topo, "lb2", 0x0C0C0C0C), 10)


def link_pid(topo, role) -> int:
    """The worker's link to Redis (the one spawned process of the balancer's namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", topo.ns(role)], capture_output=True, text=True).stdout.split()
    (pid,) = [int(p) for p in pids
              if os.path.exists(f"/proc/{p}") and b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
    return pid


def test_a_link_process_that_dies_is_started_again_and_the_balancer_catches_up(cluster):
    topo = cluster.topo
    first = link_pid(topo, "lb1")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: cluster.status("lb1")["redis"] == "down", 5)
    wait_for(lambda: cluster.status("lb1")["redis"] == "connected", 10)
    assert link_pid(topo, "lb1") != first and cluster.status("lb1")["resyncs"] >= 1
    wrong, crossed = wrong_joins(topo), cluster.crossed()
    downloads(topo, 12, MB)
    assert wrong_joins(topo) == wrong, why_wrong(cluster)
    assert cluster.crossed() > crossed


def issued_tokens(topo) -> set[int]:
    return {token for tokens in topo.judge.sync().issued.values() for token in tokens}


def tokens_shared(topo, tokens: set[int], count: int) -> bool:
    return len(tokens) >= count and all(tokens <= token_map(topo, role).keys() for role in topo.balancer_names)


@contextmanager
def transfers_intact(cluster, event):
    """Six 6 MB downloads across `event` (the with block, once every one of them is under way and
    known to every balancer): each must complete with every byte as sent, no backend may reset a
    subflow or refuse a join."""
    topo = cluster.topo
    before_resets, before_wrong, before_issued = resets(topo), wrong_joins(topo), issued_tokens(topo)
    running = [fetch_in_background(topo, 6 * MB) for _ in range(6)]
    # every transfer under way, its token in every balancer's map: a token its balancer had no
    # time to publish before `event` leaves its joins to the unknown-join policy (README, Limits)
    wait_for(lambda: tokens_shared(topo, issued_tokens(topo) - before_issued, 6), 15)
    yield
    results = [json.loads(p.communicate(timeout=120)[0]) for p in running]
    assert all(r.get("received") == 6 * MB and r["intact"] for r in results), results
    lost = resets(topo) - before_resets
    print(f"subflows reset by a backend after {event}: {lost}")
    assert lost == 0, why_wrong(cluster)
    assert wrong_joins(topo) == before_wrong, why_wrong(cluster)


def unavailable(topo, role) -> set[int]:
    """The marks of the backends a balancer's kernel takes no new connection to."""
    listing = json.loads(topo.exec(role, "nft", "-j", "list", "set", "inet", "mplb", "unavailable",
                                   capture_output=True).stdout)
    (elements,) = [item["set"].get("elem", []) for item in listing["nftables"] if "set" in item]
    return set(elements)


def b1_as_seen(cluster, role) -> tuple[bool, bool]:
    """(healthy as the balancer uses it, its own check) of b1."""
    (b1,) = [b for b in cluster.full_status(role)["services"][0]["backends"] if b["name"] == "b1"]
    return b1["healthy"], b1["checked"]


@contextmanager
def checks_failing(topo, backend, *roles):
    """These balancers' health checks of `backend` fail at the backend (their SYNs to its port
    dropped there); clients' connections go on."""
    sources = "{ " + ", ".join(balancer_address(int(role[2:])) for role in roles) + " }"
    topo.exec(backend, "nft", "-f", "-", input=FLAP_BLOCK.format(port=PORT, sources=sources))
    try:
        yield
    finally:
        topo.exec(backend, "nft", "delete", "table", "inet", "mplb_lab_flap")


def test_balancers_build_their_tables_from_one_view_of_the_backends_and_one_cut_off_goes_by_its_own(cluster):
    """b1 is down in the cluster's view when more than half of the balancers see it down. Only lb1
    failing to check it (1 of 2) keeps it in both tables, so the flows the router moves from lb2
    to lb1 keep their backend; both failing takes it out of both; lb1 cut off from Redis goes by
    its own checks, and says so."""
    topo = cluster.topo
    marks = {b["name"]: int(b["mark"], 16) for b in cluster.full_status("lb1")["services"][0]["backends"]}
    b1_mark, b2_mark = marks["b1"], marks["b2"]
    with checks_failing(topo, "b1", "lb1"):
        with transfers_intact(cluster, "lb1 could not check b1 and the router moved every flow to lb1"):
            wait_for(lambda: b1_as_seen(cluster, "lb1") == (True, False), 10)  # down for lb1, up for the cluster
            assert b1_as_seen(cluster, "lb2") == (True, True)
            assert b1_mark not in unavailable(topo, "lb1") | unavailable(topo, "lb2")
            topo.stop_bird("lb2")
            wait_for(lambda: topo.nexthops() == [balancer_address(1)], 10)
        topo.start_bird("lb2")
        with checks_failing(topo, "b2", "lb1", "lb2"):  # b2: both see it down
            wait_for(lambda: all(b2_mark in unavailable(topo, role) for role in topo.balancer_names), 10)
        wait_for(lambda: all(not unavailable(topo, role) for role in topo.balancer_names), 10)
        cut = f"table inet redis_cut {{\n chain output {{\n type filter hook output priority 0; ip daddr {STORE} drop\n }}\n}}\n"
        topo.exec("lb1", "nft", "-f", "-", input=cut)
        try:
            wait_for(lambda: cluster.full_status("lb1")["backend_view"]["source"] == "own checks", 10)
            wait_for(lambda: b1_mark in unavailable(topo, "lb1"), 5)
            assert b1_mark not in unavailable(topo, "lb2")
        finally:
            topo.exec("lb1", "nft", "delete", "table", "inet", "redis_cut")
        wait_for(lambda: cluster.full_status("lb1")["backend_view"] == {"source": "cluster", "voters": 2,
                                                                      "votes_here": True}, 15)
        wait_for(lambda: b1_mark not in unavailable(topo, "lb1"), 5)
    wait_for(lambda: all(b1_as_seen(cluster, role) == (True, True) for role in topo.balancer_names), 10)
    topo.wait_announced(2)


def test_redis_stopped_mid_run_balancers_keep_going_and_steer_crossing_joins_again_once_back(cluster):
    topo = cluster.topo
    topo.stop_redis()
    wait_for(lambda: all(cluster.status(r)["redis"] == "down" for r in topo.balancer_names), 15)
    downloads(topo, 3, MB)  # connections complete; a join that crosses now meets the unknown-join policy
    cluster.workers["lb2"].stop()  # a balancer (re)started while Redis is away announces all the same
    wait_for(lambda: topo.nexthops() == ["10.0.9.2"], 5)
    cluster.start("lb2")
    topo.wait_announced(2, timeout=15)
    downloads(topo, 2, MB)
    topo.start_redis()
    wait_for(lambda: all(cluster.status(r)["redis"] == "connected" for r in topo.balancer_names), 15)
    wait_for(lambda: following_each_other(topo), 10)
    wrong, crossed = wrong_joins(topo), cluster.crossed()
    downloads(topo, 12, MB)
    assert cluster.crossed() > crossed, "no join crossed balancers after Redis came back"
    assert wrong_joins(topo) == wrong, why_wrong(cluster)
    assert cluster.status("lb1")["outages"] >= 1


def test_every_cluster_panel_of_the_dashboard_returns_data_from_a_real_prometheus(cluster, tmp_path):
    from test_dashboard import assert_panels_answer, dashboard_queries

    queries = dashboard_queries(cluster=True)
    assert len(queries) >= 6
    assert_panels_answer(cluster.topo, "lb1", tmp_path, queries, lambda: downloads(cluster.topo, 3, MB))


def test_a_balancer_withdraws_when_its_worker_stops_or_dies_and_while_no_backend_is_healthy(cluster):
    topo = cluster.topo
    cluster.workers["lb2"].stop()  # SIGTERM, as systemd stops it
    wait_for(lambda: topo.nexthops() == ["10.0.9.2"], 5)
    cluster.start("lb2")
    topo.wait_announced(2)
    cluster.workers["lb2"].proc.send_signal(signal.SIGKILL)  # no handler runs: the kernel drops its device
    wait_for(lambda: topo.nexthops() == ["10.0.9.2"], 5)
    downloads(topo, 2, MB)  # its BIRD is alive, its data path in place: only the route went
    cluster.start("lb2")
    topo.wait_announced(2)
    for server in cluster.servers:  # every backend fails its health check
        server.kill()
    # each withdraws once the cluster's view has every backend down: a balancer whose checks see
    # it first, before its peer's vote has reached it, may withdraw and announce again meanwhile
    wait_for(lambda: topo.nexthops() == [] and
             all(cluster.status(role)["announced"] is False for role in topo.balancer_names), 10)
    cluster.servers = [topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in topo.backend_names]
    topo.wait_announced(2, timeout=15)
    downloads(topo, 2, MB)


def test_a_flow_the_router_moves_keeps_its_token_after_the_balancer_that_learned_it_forgets_it(cluster):
    """A token lived as long as its teacher's conntrack entry: when the router moved the flow (a
    balancer drained or added), that entry idled out, the teacher ended the token, and every peer
    dropped it while its connection lived on: its next subflow failed. Now the balancer whose
    conntrack has the connection takes the token over."""
    topo = cluster.topo
    known = {role: set(token_map(topo, role)) for role in topo.balancer_names}
    wrong, joins = wrong_joins(topo), joins_established(topo)
    topo.subflow_endpoint(False)  # one subflow until the flow has moved
    download, teacher = fetch_in_background(topo, 60 * MB), None
    try:
        def learned() -> set:
            return {(role, token) for role in topo.balancer_names for token, (_, comment) in token_map(topo, role).items()
                    if token not in known[role] and comment and not comment.startswith("peer")}

        wait_for(lambda: len(learned()) == 1, 10)
        ((teacher, token),) = learned()
        (other,) = set(topo.balancer_names) - {teacher}
        wait_for(lambda: token in token_map(topo, other), 5)
        topo.stop_bird(teacher)  # the router moves every flow to the other balancer
        wait_for(lambda: topo.nexthops() == [balancer_address(int(other[2:]))], 10)
        topo.exec(teacher, sys.executable, "-c", "from pyroute2 import NFCTSocket\nwith NFCTSocket() as ct: ct.flush()")

        def teacher_holds_its_own() -> bool:
            _, comment = token_map(topo, teacher).get(token, (0, "peer"))
            return not (comment or "").startswith("peer")

        # its entry gone, the teacher ends the token; the other balancer may take it over and
        # teach it back ("peer ...") before a listing sees the teacher's map without it
        wait_for(lambda: not teacher_holds_its_own(), 10)
        wait_for(lambda: not (token_map(topo, other).get(token, (0, "peer"))[1] or "").startswith("peer"), 10)
        topo.subflow_endpoint(True)  # a new subflow of the live connection, through the other balancer
        wait_for(lambda: joins_established(topo) > joins, 10)
        result = json.loads(download.communicate(timeout=60)[0])
        assert result.get("received") == 60 * MB and result["intact"], result
        assert wrong_joins(topo) == wrong, why_wrong(cluster)
        topo.start_bird(teacher)
        topo.wait_announced(2)
        wait_for(lambda: (token_map(topo, teacher).get(token, (0, ""))[1] or "").startswith(f"peer {other}"), 5)
    finally:
        if download.poll() is None:
            download.kill()
            download.communicate()
        topo.subflow_endpoint(True)
        if teacher and f"bird-{teacher}" not in topo.processes:
            topo.start_bird(teacher)


def test_a_balancer_added_while_traffic_flows_breaks_no_connection(cluster):  # last: it leaves three
    topo = cluster.topo
    with transfers_intact(cluster, "a balancer was added"):
        role = topo.add_balancer()
        cluster.start(role)
        topo.wait_announced(3)
    assert cluster.status(role)["resyncs"] >= 1
    downloads(topo, 6, MB)


def test_a_balancer_with_two_workers_steers_and_shares_as_one(sentinel_cluster):
    """On the Sentinel cluster, first: lb2 runs two workers from here on (the failover test after
    this one goes through them). Its first worker reads the copies and talks to the cluster; joins
    that race their token may reach the second's queue, which passes those it steers to the first."""
    cluster, topo = sentinel_cluster, sentinel_cluster.topo
    cluster.workers["lb2"].stop()
    wait_for(lambda: topo.nexthops() == [balancer_address(1)], 5)
    cluster.start("lb2", workers=2)
    topo.wait_announced(2)
    wait_for(lambda: following_each_other(topo), 10)
    wrong, crossed = wrong_joins(topo), cluster.crossed()
    downloads(topo, 12, MB)
    assert cluster.full_status("lb2")["packets"]["workers"] == 2
    assert wrong_joins(topo) == wrong, why_wrong(cluster)
    assert cluster.crossed() > crossed, "no join crossed balancers"


def test_the_redis_primary_killed_mid_run_its_replica_takes_over_and_crossing_joins_are_steered_again(
        sentinel_cluster):
    """The sentinels promote the replica; each balancer's link finds it through them, publishes
    again what it holds (the replica may have missed the last writes) and follows its peers' streams
    from the last entry it read. No transfer breaks, no join goes astray."""
    cluster, topo = sentinel_cluster, sentinel_cluster.topo
    wait_for(lambda: all(cluster.status(r)["redis"] == "connected" for r in topo.balancer_names), 15)
    with transfers_intact(cluster, "the Redis primary was killed"):
        killed = topo.kill_redis_primary()
        wait_for(lambda: topo.primary_port() != killed, 15)
        wait_for(lambda: all(cluster.status(r)["outages"] >= 1 and cluster.status(r)["redis"] == "connected"
                             for r in topo.balancer_names), 20)
        wait_for(lambda: following_each_other(topo), 10)
    wrong, crossed = wrong_joins(topo), cluster.crossed()
    downloads(topo, 12, MB)
    assert cluster.crossed() > crossed, "no join crossed balancers through the new primary"
    assert wrong_joins(topo) == wrong, why_wrong(cluster)
    topo.restart_redis_node(killed)  # back as a replica of the new primary (the next test kills a balancer)


def test_a_balancer_killed_mid_transfer_moves_its_flows_to_the_other_intact(sentinel_cluster):
    """After the failover test, on its cluster: the machine of a balancer dies."""
    cluster = sentinel_cluster
    topo = cluster.topo
    survivors = [hop for hop in topo.nexthops() if hop != balancer_address(1)]
    with transfers_intact(cluster, "the balancer died"):
        # the machine dies: its worker, its BIRD and its link; the router withdraws it when
        # BGP's hold time (3 s) runs out
        cluster.workers["lb1"].proc.send_signal(signal.SIGKILL)
        topo.stop_bird("lb1")
        topo.exec("lb1", "ip", "link", "set", "s0", "down")
        wait_for(lambda: topo.nexthops() == survivors, 10)
    downloads(topo, 4, MB)  # the survivor serves alone
