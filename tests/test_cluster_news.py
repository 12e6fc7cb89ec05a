"""What balancers of a cluster tell each other (pure): the encoding through Redis, what a balancer
accepts from it (untrusted), and what the worker's side does with a peer's news, on a stand-in
for the kernel maps."""
import ipaddress
import logging
import time
from types import SimpleNamespace
from collections import Counter

from fakes import KernelMaps

from mplb_nfq.core.balancer import Backend, Balancer, Service
from mplb_nfq.core.news import (MAX_DOWN, MAX_HEARTBEAT, MAX_PEERS, Batch, Keys, accepted, decode, encode, from_kept, heartbeat, peer_beats,
                                   record, record_subflows)
from mplb_nfq.core.marks import BACKEND_MASK, DISPLACEABLE, JOIN, LEARNED
from mplb_nfq.ops.link import LinkState, Own, PeerNews
from mplb_nfq.ops.logs import ThrottledLog
from mplb_nfq.ops.peers import Peers
from mplb_nfq.ops.tokenstore import TokenStore

VIP = ipaddress.ip_address("10.0.100.1").packed
VIP6 = ipaddress.ip_address("fd00:100::1").packed
FLOW = (ipaddress.ip_address("10.0.2.2").packed, 40001, VIP, 8080)
FLOW6 = (ipaddress.ip_address("fd00:2::4").packed, 40002, VIP6, 8080)


def test_a_batch_goes_through_a_stream_entry_unchanged():
    batch = Batch("lb1", 1700000000.123, {0x7A9913B1: "b1", 0x00000001: "b2"},
                  {FLOW: (0x7A9913B1, "b1"), FLOW6: (0x00000001, "b2")}, [0xDEADBEEF], {0x00000001: FLOW6})
    fields = encode(batch)
    assert all(isinstance(v, str) for v in fields.values())
    rejected = Counter()
    assert decode(fields, "lb1", rejected) == batch and not rejected
    assert decode({**fields, "o": "lb2"}, "lb1", rejected).origin == "lb1"  # the stream's owner, not a claim


def test_what_is_malformed_is_counted_and_left_out_the_rest_kept():
    rejected = Counter()
    assert decode({"at": "soon"}, "lb1", rejected) is None
    batch = decode({"at": "1000", "t": "7a9913b1=b1 7A9913B1=b1 123=b1 00000002=b;1 00000003",
                    "s": "10.0.2.2:1>10.0.100.1:80=00000002=b1 nonsense 10.0.2.2:1>10.0.100.1:80=xyz=b1",
                    "d": "00000004 -1"}, "lb1", rejected)
    assert batch.tokens == {0x7A9913B1: "b1"}
    assert batch.subflows == {(FLOW[0], 1, VIP, 80): (2, "b1")} and batch.ended == [4]
    assert rejected["malformed"] == 1 + 4 + 2 + 1  # an entry; then four tokens, two subflows, one end
    flood = decode({"at": "1", "t": " ".join(["00000001=b1"] * 100_001)}, "lb1", rejected)
    assert flood.tokens == {}


def test_what_a_balancer_keeps_reads_back_as_its_batch():
    rejected = Counter()
    batch = from_kept("lb2", {"7a9913b1": record("b1", 1700000000.5), "00000001": "b1", "zz": "1 b1",
                              "00000002": record("b2", 1800000000, FLOW6), "00000003": "1 b1=10.0.2.2:x>y"},
                      {"7a9913b1": record_subflows({FLOW: "b1"}), "00000009": "nonsense",
                       "00000008": " ".join(["10.0.2.2:1>10.0.100.1:80=b1"] * 9)}, rejected)
    assert (batch.origin, batch.tokens, batch.subflows) == ("lb2", {0x7A9913B1: "b1", 2: "b2"},
                                                            {FLOW: (0x7A9913B1, "b1")})
    assert batch.at == 1700000000.5 and batch.connections == {2: FLOW6} and rejected["malformed"] == 5


def test_a_peers_map_element_names_its_teacher_and_its_connection():
    from mplb_nfq.core.news import peer_comment, teacher_of

    assert teacher_of(peer_comment("lb2", FLOW)) == ("lb2", FLOW)
    assert teacher_of(peer_comment("lb2", None)) == ("lb2", None)
    assert teacher_of(peer_comment("lb2", FLOW6)[:24]) == ("lb2", None)  # cut short by the room the kernel gives
    assert teacher_of("10.0.2.2:40001>10.0.100.1:8080") is None and teacher_of(None) is None


def test_a_balancers_keys_are_its_own_prefix_and_anything_else_is_no_key_of_the_cluster():
    keys = Keys("edge1")
    assert keys.of("lb1", "news") == "mplb:edge1:lb:lb1:news" and keys.every("beat") == "mplb:edge1:lb:*:beat"
    for name in ("lb1", "lb-2", "lb_3"):
        for kind in Keys.KINDS:
            assert keys.balancer_of(keys.of(name, kind), kind) == name
    for key in ("mplb:edge2:lb:lb1:news", "mplb:edge1:lb:lb2:x:lb:lb1:news", "mplb:edge1:lb:lb 1:news",
                "mplb:edge1:lb:lb1:news:x", "mplb:edge1:lb::news", "mplb:edge1:lb:lb1:beat", "mplb:edge1:log"):
        assert keys.balancer_of(key, "news") is None, key


def test_only_known_backends_and_served_vips_are_accepted():
    batch = Batch("lb2", 0.0, {1: "b1", 2: "ghost"},
                  {FLOW: (1, "b1"), (FLOW[0], 1, VIP, 9999): (1, "b1"), (FLOW[0], 2, VIP, 8080): (2, "ghost"),
                   (FLOW6[0], 3, VIP, 8080): (1, "b1")}, [7])
    rejected = Counter()
    kept = accepted(batch, {"b1": 0x101}, [(VIP, 8080)], rejected)
    assert kept.tokens == {1: "b1"} and kept.subflows == {FLOW: (1, "b1")} and kept.ended == [7]
    assert rejected == {"unknown_backend": 2, "unknown_service": 2}


def test_a_peers_connection_from_one_family_to_another_is_refused_and_its_token_kept():
    batch = Batch("lb2", 0.0, {1: "b1", 2: "b1"}, {}, [], {1: (FLOW[0], 40000, FLOW6[2], 8080), 2: FLOW})
    rejected = Counter()
    kept = accepted(batch, {"b1": 0x101}, [(VIP, 8080)], rejected)
    assert kept.tokens == {1: "b1", 2: "b1"} and kept.connections == {2: FLOW}
    assert rejected == {"malformed": 1}


def make_peers(held=()):
    b1, b2 = Backend("b1", ("10.0.9.11",), 0x101, 1001), Backend("b2", ("10.0.9.12",), 0x102, 1002)
    balancer = Balancer([Service("web", (VIP,), (8080,), [b1, b2], "maglev", direct_return=True)])
    maps = KernelMaps(held)
    errors = ThrottledLog(logging.getLogger("mplb_nfq.test"))
    return Peers("lb1", balancer, maps, TokenStore(balancer, maps, Counter(), errors), errors), balancer, maps


def test_a_peers_tokens_and_subflows_reach_the_kernel_maps_and_the_core():
    peers, balancer, maps = make_peers(held={5: 0x102 | JOIN})
    peers.news(PeerNews(Batch("lb2", time.time() - 0.004, {1: "b1", 5: "b1", 6: "ghost"}, {FLOW: (1, "b1")})))
    assert maps.tokens[1] == 0x101 | JOIN | DISPLACEABLE
    assert maps.tokens[5] == 0x102 | JOIN  # a token this balancer holds keeps what it holds
    assert 6 not in maps.tokens and peers.rejected["unknown_backend"] == 1
    assert maps.subflows == {FLOW: 0x101 | JOIN | LEARNED}
    assert balancer.flows.get(FLOW, time.perf_counter()) == 0x101 | JOIN  # for its first ACK, should it come here
    assert balancer.tokens.get(1, time.perf_counter()) is not None
    assert peers.received == {"lb2": 1} and 3.0 < peers.propagation_ms()["propagation_ms_p50"] < 1000
    peers.news(PeerNews(Batch("lb2", 0.001, {2: "b1"})))  # a hostile entry's time (or a republication): no delay
    assert sum(peers.delays.counts) == 1 and peers.propagation_ms()["propagation_ms_p99"] < 1000


def test_only_the_peer_that_taught_a_token_may_end_it_and_its_subflows_go_with_it():
    peers, balancer, maps = make_peers()
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"}, {FLOW: (1, "b1")})))
    peers.news(PeerNews(Batch("lb3", time.time(), ended=[1])))
    assert 1 in maps.tokens and FLOW in maps.subflows
    peers.news(PeerNews(Batch("lb2", time.time(), ended=[1])))
    assert 1 not in maps.tokens and maps.subflows == {}
    assert balancer.tokens.get(1, time.perf_counter()) is None


def test_what_this_balancer_learns_and_steers_goes_out_and_a_join_on_a_peers_token_counts_as_crossed():
    peers, _, _ = make_peers()
    peers.learned({9: 0x102 | JOIN}, {9: FLOW6})
    peers.steered(FLOW, 9, 0x102 | JOIN)  # its own token: the join came through this balancer too
    assert peers.stats["joins_crossed"] == 0
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"})))
    peers.steered(FLOW6, 1, 0x101 | JOIN)
    assert peers.stats["joins_crossed"] == 1
    peers.ended([9])
    sent = []

    class Link:
        def send(self, batch):
            sent.append(batch)

    peers.flush(Link())
    peers.flush(Link())  # nothing new: nothing sent
    (batch,) = sent
    assert batch.tokens == {9: "b2"} and batch.subflows == {FLOW: (9, "b2"), FLOW6: (1, "b1")} and batch.ended == [9]
    assert batch.connections == {9: FLOW6}


def sent_by(peers) -> Batch:
    sent = []
    peers.flush(SimpleNamespace(send=sent.append))
    return sent[0] if sent else Batch("none", 0.0)


def test_a_token_ended_by_its_teacher_is_taken_over_by_the_balancer_its_connection_moved_to():
    """In a cluster a token lived as long as its teacher's conntrack entry: when the router moved
    the flow to another balancer, the teacher's entry idled out, it ended the token, and every peer
    dropped it while its connection lived on: the next subflow failed."""
    peers, balancer, maps = make_peers()
    join = (FLOW[0], 40009, VIP, 8080)
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1", 2: "b2", 3: "b1"}, {join: (1, "b1")},
                              connections={1: FLOW, 2: FLOW6})))
    assert maps.comments[1] == "peer lb2 10.0.2.2:40001>10.0.100.1:8080"
    sent_by(peers)
    peers.news(PeerNews(Batch("lb2", time.time(), ended=[1, 2, 3])))
    assert 3 not in maps.tokens  # no connection named: ended at once, as before
    assert {1, 2} <= set(maps.tokens) and join in maps.subflows  # until the conntrack reader says
    assert peers.tokens.handed_over == [(1, FLOW), (2, FLOW6)]
    peers.handed_over_found(here=[1], elsewhere=[2])
    assert maps.tokens[1] == 0x101 | JOIN | DISPLACEABLE and maps.comments[1] == "10.0.2.2:40001>10.0.100.1:8080"
    assert join in maps.subflows and 2 not in maps.tokens
    batch = sent_by(peers)
    assert batch.tokens == {1: "b1"} and batch.connections == {1: FLOW} and 1 not in peers.taught
    peers.news(PeerNews(Batch("lb2", time.time(), ended=[1])))  # no longer lb2's to end
    assert 1 in maps.tokens


def test_a_token_handed_over_that_a_peer_took_over_meanwhile_stays_its():
    peers, _, maps = make_peers()
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"}, connections={1: FLOW})))
    peers.news(PeerNews(Batch("lb2", time.time(), ended=[1])))
    peers.news(PeerNews(Batch("lb3", time.time(), {1: "b1"}, connections={1: FLOW})))  # the connection is there
    peers.handed_over_found(here=[], elsewhere=[1])
    assert 1 in maps.tokens and peers.taught[1] == "lb3"
    peers.news(PeerNews(Batch("lb3", time.time(), {1: "b2"})))  # another backend: not a take-over, a conflict
    assert peers.taught[1] == "lb3" and maps.tokens[1] & 0xFFF == 0x101
    peers.news(PeerNews(Batch("lb3", time.time(), ended=[1])))
    peers.handed_over_found(here=[], elsewhere=[1])
    assert 1 not in maps.tokens


def test_conntrack_lifetimes_say_whether_a_handed_over_connection_is_here_then_watch_it_as_their_own():
    from mplb_nfq.kernel.conntrack import ABSENT_ASKS, Lifetimes
    from mplb_nfq.kernel.ctnetlink import CHANGED, DESTROYED, Entry

    lifetimes = Lifetimes()
    other = (FLOW[0], 1, VIP, 80)
    lifetimes.watch([(1, FLOW)])
    lifetimes.watch([(2, FLOW6), (3, other), (4, (FLOW[0], 4, VIP, 80))], handed_over=True)
    lifetimes.event(Entry(other, 0x101, 3, CHANGED), 0.0)  # its next packet reached this balancer
    asks = []
    for _ in range(ABSENT_ASKS):
        lifetimes.asked(lambda flow: flow == FLOW6)
        asks.append(lifetimes.take()[1])
    assert asks[0].here == [3, 2] and [h.elsewhere for h in asks] == [[]] * (ABSENT_ASKS - 1) + [[4]]
    lifetimes.event(Entry(FLOW6, 0x101, None, DESTROYED), 1.0)  # here, then its own end
    assert lifetimes.take()[0] == [2] and {t for _, t in lifetimes.teaching.items()} == {1, 3}


def test_a_starting_balancer_announces_once_caught_up_from_redis_and_followed_by_its_peers():
    """Each balancer writes its news under its own keys: a peer that has not met it yet would hold
    and then refuse the joins of its connections (the cluster lab: 1 of 2 joins misrouted)."""
    peers, _, _ = make_peers()
    assert not peers.ready_to_announce()
    peers.state = LinkState(True, 0, {}, {}, {"lb2": {}}, None, resyncs=1, outages=0, followed=False)
    assert not peers.ready_to_announce()
    peers.state = LinkState(True, 0, {}, {}, {"lb2": {}}, None, resyncs=1, outages=0, followed=True)
    assert peers.ready_to_announce()
    peers.state = LinkState(True, 0, {}, {}, {"lb2": {}, "lb3": {}}, None, resyncs=1, outages=0, followed=False)
    assert peers.ready_to_announce()  # lb3 started, and does not follow it yet: it stays announced
    peers, _, _ = make_peers()
    peers.started -= 10  # Redis never answered: it balances alone
    assert peers.ready_to_announce()


def test_what_a_balancer_published_is_published_again_after_an_outage_less_what_ended():
    own = Own()
    own.add(Batch("lb1", 10.0, {1: "b1", 2: "b2"}, {FLOW: (1, "b1"), FLOW6: (2, "b2")}))
    own.add(Batch("lb1", 11.0, ended=[2]))
    (batch,) = own.batches("lb1")
    assert batch.tokens == {1: "b1"} and batch.subflows == {FLOW: (1, "b1")} and batch.at == 10.0


def test_numbers_from_redis_are_ascii_digits_of_a_bounded_length_or_the_entry_is_malformed():
    """str.isdigit takes "²", int() refuses it; 5,000 digits pass isdigit and fail int(): one such
    value in a kept token stopped every balancer's catching up."""
    for at in ("²", "٣", "9" * 400, "9" * 5000, "1e999", "-1", ""):
        rejected = Counter()
        assert decode({"at": at, "t": "0a0b0c0d=b1"}, "lb1", rejected) is None
        assert not from_kept("lb1", {"0a0b0c0d": f"b1 {at}"}, {}, rejected)
        assert rejected["malformed"] == 2, at


def test_a_subflow_whose_port_is_not_a_port_is_left_out_and_the_rest_of_its_batch_kept():
    rejected = Counter()
    batch = decode({"at": "1", "s": "10.0.1.2:70000>10.0.100.1:80=0a0b0c0d=b1 "
                    "10.0.1.2:٣>10.0.100.1:80=0a0b0c0d=b1 10.0.1.2:4000>10.0.100.1:80=0a0b0c0d=b1"}, "lb1", rejected)
    assert list(batch.subflows.values()) == [(0x0A0B0C0D, "b1")] and rejected["malformed"] == 2


def test_heartbeats_are_parsed_strictly_and_at_most_so_many_peers_are_kept():
    good = heartbeat("0123456789ab", 5, 1000.0)
    rejected = Counter()
    beats = peer_beats([("lb2", good), ("lb3", '{"fingerprint": "0123456789ab", "at": 1e999}'),
                        ("lb4", '{"fingerprint": "0123456789ab", "at": true}'), ("lb5", "\ufffd"),
                        ("lb6", None), ("x" * 65, good), ("lb7", '{"fingerprint": "<script>", "at": 1}'),
                        ("lb8", "[]"), ("lb9", "[" * 100_000)], rejected)  # json's recursion limit
    assert beats == {"lb2": ("0123456789ab", 1000.0, None)} and rejected["malformed"] == 8
    many = peer_beats([(f"lb{i}", good) for i in range(MAX_PEERS + 10)], rejected)
    assert len(many) == MAX_PEERS and rejected["malformed"] == 18


def test_redis_over_tls_checks_the_servers_name_and_reads_bytes_that_are_not_utf8_as_malformed():
    from mplb_nfq.ops.link import client_options
    from mplb_nfq.core.settings import ClusterConfig

    tls = client_options(ClusterConfig("c", "lb1", "rediss://10.0.9.250:6379/0", "mplb", "pw", tls_ca="/ca.pem"))
    assert tls["ssl_check_hostname"] is True and tls["ssl_ca_certs"] == "/ca.pem"
    plain = client_options(ClusterConfig("c", "lb1", "redis://10.0.9.250:6379/0", "mplb", "pw"))
    assert not any(key.startswith("ssl") for key in plain)
    assert tls["encoding_errors"] == plain["encoding_errors"] == "replace" and plain["decode_responses"]


def test_a_follower_goes_on_after_the_last_entry_it_read_unless_the_stream_lost_what_followed():
    from mplb_nfq.core.news import resume_from

    assert resume_from(None, None, None) == ("0-0", True)  # a peer met before its first entry: its hashes
    assert resume_from(None, "1-0", "9-0") == ("9-0", True)  # met: what it keeps, then its newest entry on
    assert resume_from("7-1", "5-0", "9-0") == ("7-1", False)  # what came after 7-1 is all there
    assert resume_from("9-0", "5-0", "9-0") == ("9-0", False)
    assert resume_from("4-9", "5-0", "9-0") == ("9-0", True)  # trimmed past it
    assert resume_from("7-1", None, None) == ("0-0", True)  # Redis came back empty
    assert resume_from("7-1", "1-0", "3-0") == ("3-0", True)  # Redis came back from an older copy
    assert resume_from("10-0", "9-5", "11-0") == ("10-0", False)  # IDs order as numbers, not as text


def test_joins_repeated_or_forged_with_a_known_token_are_published_and_installed_once_and_at_most_8_a_connection():
    """Every join SYN the token map steers is copied to the worker: a client repeating one, or
    forging many with a token it knows, must not grow what balancers publish and install."""
    from mplb_nfq.core.news import MAX_SUBFLOWS

    def flow(port):
        return (ipaddress.ip_address("10.0.2.2").packed, port, ipaddress.ip_address(VIP).packed, 8080)

    peers, _, maps = make_peers()
    for _ in range(3):
        peers.steered(flow(40000), 9, 0x102 | JOIN)
    for port in range(40001, 40100):
        peers.steered(flow(port), 9, 0x102 | JOIN)
    assert len(peers.outgoing.subflows) == MAX_SUBFLOWS and peers.stats["subflows_not_published"] == 2 + 99 - 7
    forged = {flow(port): (1, "b1") for port in range(50000, 50100)}
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"}, forged)))
    assert len(maps.subflows) == MAX_SUBFLOWS and peers.rejected["subflow_full"] == 100 - MAX_SUBFLOWS
    peers.news(PeerNews(Batch("lb2", time.time(), {}, {flow(50000): (1, "b1"), flow(40000): (2, "b1")})))
    assert len(maps.subflows) == MAX_SUBFLOWS + 1  # the repeated one once, another connection's too
    peers.news(PeerNews(Batch("lb3", time.time(), {}, {flow(50000): (2, "b1")})))  # a flow of token 1's under 2
    assert peers.rejected["subflow_conflict"] == 1 and len(maps.subflows) == MAX_SUBFLOWS + 1
    peers.news(PeerNews(Batch("lb2", time.time(), ended=[1])))
    assert list(maps.subflows) == [flow(40000)] and len(peers.installed) == 1


def test_a_restarted_worker_knows_which_peer_taught_the_tokens_it_adopts_and_that_peers_end_still_counts():
    """It adopted them without their teacher, so the teacher's later end was ignored: every
    upgrade leaked the peers' tokens until their timeout."""
    peers, balancer, maps = make_peers()
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"})))
    assert maps.comments[1] == "peer lb2"
    restarted, balancer, _ = make_peers()
    restarted.dataplane = restarted.tokens.dataplane = maps
    store = restarted.tokens
    store.peers = restarted
    assert store.adopt() == 1 and restarted.taught == {1: "lb2"}
    restarted.news(PeerNews(Batch("lb3", time.time(), ended=[1])))  # not its teacher
    assert 1 in maps.tokens
    restarted.news(PeerNews(Batch("lb2", time.time(), ended=[1])))
    assert 1 not in maps.tokens and balancer.tokens.get(1, time.perf_counter()) is None


def test_a_join_steered_on_a_peers_token_is_forgotten_with_that_token_and_its_flow_published_again_later():
    """Kept for good, a crossing join's flow made a later connection's join on the same ports a
    "conflict", never published."""
    peers, _, _ = make_peers()
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"})))
    peers.steered(FLOW, 1, 0x101 | JOIN)
    peers.news(PeerNews(Batch("lb2", time.time(), ended=[1])))
    peers.news(PeerNews(Batch("lb2", time.time(), {2: "b1"})))
    peers.steered(FLOW, 2, 0x101 | JOIN)  # the same ports, a later connection
    assert peers.outgoing.subflows[FLOW] == (2, "b1") and peers.stats["subflows_not_published"] == 0
    assert len(peers.published) == 1


def test_at_most_so_many_peers_are_counted_by_name():
    """Their names are metric labels; an origin is whatever a Redis entry says."""
    from mplb_nfq.core.news import MAX_PEERS

    peers, _, _ = make_peers()
    for i in range(MAX_PEERS + 5):
        peers.news(PeerNews(Batch(f"lb{i + 2}", time.time(), {100 + i: "b1"})))
    assert len(peers.received) == MAX_PEERS


def test_a_peer_cannot_take_over_a_token_its_teacher_did_not_end_nor_undo_a_take_over_with_old_news():
    """The review's two cases: lb3 repeating lb2's token (same backend) became its teacher, then
    ended it here; and reading lb3's take-over before lb2's older news gave the token back to
    lb2, whose old end then dropped it."""
    peers, _, maps = make_peers()
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"}, connections={1: FLOW})))
    peers.news(PeerNews(Batch("lb3", time.time(), {1: "b1"}, connections={1: FLOW6})))
    peers.news(PeerNews(Batch("lb3", time.time(), ended=[1])))
    assert peers.taught[1] == "lb2" and peers.connection_of[1] == FLOW and 1 in maps.tokens
    catching_up, _, maps = make_peers()  # lb3's stream read first, lb2's after it
    catching_up.news(PeerNews(Batch("lb3", time.time(), {2: "b1"}, connections={2: FLOW})))
    catching_up.news(PeerNews(Batch("lb2", time.time(), {2: "b1"}, connections={2: FLOW})))
    catching_up.news(PeerNews(Batch("lb2", time.time(), ended=[2])))
    assert catching_up.taught[2] == "lb3" and 2 in maps.tokens and not catching_up.tokens.handed_over


def test_a_token_this_balancer_watches_but_a_peer_took_over_is_not_its_to_end():
    peers, _, maps = make_peers()
    peers.tokens.peers = peers  # as the worker wires them
    peers.news(PeerNews(Batch("lb2", time.time(), {1: "b1"}, connections={1: FLOW})))
    peers.tokens.ended([1])  # its conntrack reader watched it (a stale entry said "here" once)
    assert 1 in maps.tokens and sent_by(peers).ended == []



def test_after_an_outage_what_redis_keeps_for_a_balancer_is_what_it_holds_now(tmp_path):
    """A replica that Sentinel promotes may lack the last writes, the end of a token among them:
    the balancer's hash would keep that token for every peer that catches up. On reconnecting it
    writes its hashes again from what it holds (Debian's redis-server, on loopback)."""
    import shutil
    import socket
    import subprocess

    import pytest

    from mplb_nfq.core.news import record
    from mplb_nfq.core.settings import ClusterConfig
    from mplb_nfq.ops.link import Link, connect

    if not shutil.which("redis-server"):
        pytest.skip("Debian's redis-server is needed (./dev installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        cfg = ClusterConfig("t", "lb1", f"redis://127.0.0.1:{port}/0", "default", "unused")
        deadline = time.monotonic() + 10
        while True:
            try:
                client = connect(cfg)
                break
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        keys = Keys("t")
        client.hset(keys.of("lb1", "tokens"), mapping={"0000dead": record("b1", time.time())})  # ended, end lost
        client.hset(keys.of("lb1", "subflows"), mapping={"0000dead": "x"})
        link = Link(cfg, 600, "fingerprint", lambda message: None)
        link.own.add(Batch("lb1", time.time(), {0xbeef: "b2"}))
        link.publish_again(client)
        assert set(client.hkeys(keys.of("lb1", "tokens"))) == {"0000beef"}
        assert client.hkeys(keys.of("lb1", "subflows")) == []
        (entry,) = client.xrange(keys.of("lb1", "news"))
        assert decode(entry[1], "lb1", Counter()).tokens == {0xbeef: "b2"}
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_backend_is_down_in_the_clusters_view_when_more_than_half_of_the_voters_see_it_down():
    from mplb_nfq.core.backend_view import shared_view

    names = ["b1", "b2"]
    assert shared_view(names, [{"b1"}]) == {"b1": False, "b2": True}  # one voter: its checks
    assert shared_view(names, [{"b1"}, set()]) == {"b1": True, "b2": True}  # 1 of 2: a tie keeps it up
    assert shared_view(names, [{"b1"}, {"b1"}]) == {"b1": False, "b2": True}
    assert shared_view(names, [{"b1"}, set(), {"b2"}]) == {"b1": True, "b2": True}  # 1 of 3 each
    assert shared_view(names, [{"b1"}, {"b1"}, {"b2"}]) == {"b1": False, "b2": True}  # b1: 2 of 3
    assert shared_view(names, [{"ghost"}]) == {"b1": True, "b2": True}  # a name it does not have counts for nothing
    assert shared_view(names, []) == {"b1": True, "b2": True}


def test_a_heartbeat_carries_the_backends_its_balancer_sees_down_and_a_malformed_vote_is_refused():
    rejected = Counter()
    many = str([f"b{i}" for i in range(MAX_DOWN + 1)]).replace("'", '"')
    beats = peer_beats([("lb2", heartbeat("0123456789ab", 5, 1000.0, {"b2", "b1"})),
                        ("lb3", '{"fingerprint": "0123456789ab", "at": 1, "down": "b1"}'),
                        ("lb4", '{"fingerprint": "0123456789ab", "at": 1, "down": ["b1", 7]}'),
                        ("lb5", '{"fingerprint": "0123456789ab", "at": 1, "down": ["b 1"]}'),
                        ("lb6", '{"fingerprint": "0123456789ab", "at": 1, "down": %s}' % many)], rejected)
    assert beats == {"lb2": ("0123456789ab", 1000.0, frozenset({"b1", "b2"}))} and rejected["malformed"] == 4
    abstains = peer_beats([("lb2", heartbeat("0123456789ab", 5, 1000.0)),
                           ("lb3", '{"fingerprint": "0123456789ab", "at": 1000}')], rejected)  # an older version
    assert abstains["lb2"].down is None and abstains["lb3"].down is None
    longest = heartbeat("0123456789ab", 10 ** 14, 9e11, [f"{i:064d}" for i in range(MAX_DOWN)])
    assert len(longest) <= MAX_HEARTBEAT and len(peer_beats([("lb2", longest)], rejected)["lb2"].down) == MAX_DOWN


class LinkStandIn:
    """What ClusterTurn uses of ops.link.LinkHandle."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def restart_due(self):
        return False


def test_a_balancer_builds_its_tables_from_the_clusters_view_and_goes_by_its_own_checks_when_cut_off(tmp_path):
    from prometheus_client import generate_latest
    from test_config import cluster_config

    from mplb_nfq.core.news import Checked
    from mplb_nfq.ops.cluster_turn import ClusterTurn
    from mplb_nfq.ops.config import from_dict
    from mplb_nfq.ops.fleet import HealthChanged
    from mplb_nfq.ops.metrics import WorkerCollector
    from mplb_nfq.ops.status import render_status
    from mplb_nfq.worker import Worker

    w = Worker(from_dict(cluster_config(tmp_path)), KernelMaps())
    link, plane = LinkStandIn(), w.plane
    other_worker = LinkStandIn()  # what the first worker tells a second one
    plane.fleet.pipes = [other_worker]
    plane.health = SimpleNamespace(settled=False, last_error={})  # its checks have not run `fall` rounds yet
    turn = ClusterTurn(link, w.peers, plane, w.held)
    w.peers.fingerprint = plane.fingerprint()

    def view(peers_down: dict[str, list[str] | None], connected=True, fingerprint=w.peers.fingerprint):
        peers = {name: {"fingerprint": fingerprint, "age_s": 0.5, "down": down} for name, down in peers_down.items()}
        turn.heard(LinkState(connected, 0, {}, {}, peers, None, resyncs=1, outages=0, followed=True))
        turn.turn()

    def available() -> dict[str, bool]:
        plane.sync_unavailable()  # the kernel's set of backends its tables leave out, as written
        written = [marks for kind, marks in w.dataplane.calls if kind == "unavailable"]
        assert written[-1] == {b.mark for b in w.balancer.backends if not b.available}
        return {b.name: b.available for b in w.balancer.backends}

    def metric(name: str) -> str:
        text = generate_latest(_registry(WorkerCollector(plane))).decode()
        return next(line.split()[-1] for line in text.splitlines() if line.startswith(name))

    plane.set_health("b1", False, "connection refused")  # this balancer's own check
    assert available() == {"b1": False, "b2": True}  # no word from the cluster yet: its own checks
    view({"lb2": [], "lb3": None})  # lb3 abstains; this balancer too, until its checks settle
    assert available() == {"b1": True, "b2": True} and not any(isinstance(m, Checked) for m in link.sent)
    assert plane.backend_view() == {"source": "cluster", "voters": 1, "votes_here": False}
    plane.health.settled = True
    turn.turn()
    assert link.sent[-1] == Checked(frozenset({"b1"}))  # its vote, to the link
    assert available() == {"b1": True, "b2": True}  # 1 of 2: a tie keeps b1 in every table
    status = plane.status()
    assert status["backend_view"] == {"source": "cluster", "voters": 2, "votes_here": True}
    b1 = status["services"][0]["backends"][0]
    assert (b1["name"], b1["healthy"], b1["checked"]) == ("b1", True, False)
    text = render_status(status)
    assert "backends' health: the cluster's view (2 balancers vote)" in text and "(own check: down)" in text
    assert metric('mplb_backend_check_up{backend="b1"') == "0.0" and metric('mplb_backend_up{backend="b1"') == "1.0"
    assert metric("mplb_cluster_backend_view_shared") == "1.0"
    view({"lb2": ["b1"], "lb3": []})  # 2 of 3 see it down
    assert available() == {"b1": False, "b2": True}
    assert other_worker.sent[-1] == HealthChanged("b1", False, None)  # the other workers decide alike
    view({"lb2": ["b2"], "lb3": ["b2"]}, fingerprint="ffffffffffff")  # another config: its votes do not count
    assert available() == {"b1": False, "b2": True} and plane.backend_view()["voters"] == 1
    view({"lb2": [], "lb3": ["b2"]})
    assert available() == {"b1": True, "b2": True}
    plane.set_health("b2", False, "timed out")  # its own check changes: b2 2 of 3
    assert available() == {"b1": True, "b2": False} and link.sent[-1] != Checked(frozenset({"b1", "b2"}))
    turn.turn()
    assert link.sent[-1] == Checked(frozenset({"b1", "b2"}))
    view({"lb2": []}, connected=False)  # cut off from Redis: its own checks, said in status and metrics
    assert available() == {"b1": False, "b2": False}
    assert plane.status()["backend_view"] == {"source": "own checks", "why": "cut off from the cluster's Redis"}
    assert "OWN CHECKS ONLY (cut off from the cluster's Redis)" in render_status(plane.status())
    assert metric("mplb_cluster_backend_view_shared") == "0.0"
    view({"lb2": [], "lb3": []})
    assert available() == {"b1": True, "b2": True}
    turn.heard(None)  # the link process died
    assert available() == {"b1": False, "b2": False}


def _registry(collector):
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_a_second_worker_passes_the_joins_it_steers_to_the_first_which_publishes_them(tmp_path):
    from test_config import cluster_config
    from test_worker import Packet

    from mplb_nfq.lab.packets import SYN, mp_join_syn, tcp
    from mplb_nfq.ops.config import from_dict
    from mplb_nfq.ops.fleet import Steered
    from mplb_nfq.worker import Worker

    cfg = from_dict({**cluster_config(tmp_path), "kernel": {"workers": 2}})
    first, second = Worker(cfg, KernelMaps()), Worker(cfg, KernelMaps())
    to_first = LinkStandIn()
    second.beyond_the_first(to_first)
    token, b1 = 0x5EED0001, first.balancer.backends[0]
    join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(token)))
    second.handle(join)
    assert join.verdict is None and len(second.held) == 1  # raced its token
    second.dataplane.tokens[token] = b1.mark  # a peer's token, which the first worker installed
    second.held.found(token, time.perf_counter())
    assert join.verdict == "accept" and join.mark & BACKEND_MASK == b1.mark
    (steered,) = to_first.sent
    assert isinstance(steered, Steered) and steered.token == token and steered.held
    first.peers.taught[token] = "lb2"
    first.from_other_worker(1, steered)
    assert first.peers.outgoing.subflows == {steered.flow: (token, "b1")}  # published, as its own would be
    assert first.peers.stats["held_for_peer"] == 1 and first.peers.stats["joins_crossed"] == 1


def test_a_token_a_peer_brings_after_a_join_held_for_it_gave_up_is_counted_and_said(caplog):
    peers, _, _ = make_peers()
    peers.gave_up_on(5)
    peers.news(PeerNews(Batch("lb2", time.time(), {5: "b1", 6: "b2"})))
    assert peers.stats["tokens_after_held_joins_gave_up"] == 1 and not peers.gave_up  # 6: no join gave up on it
    assert "1 tokens from lb2 came after a join held for them took the unknown-join policy" in caplog.text
    for token in range(5000):  # what it keeps to look for is bounded
        peers.gave_up_on(token)
    assert len(peers.gave_up) == 4096 and 0 not in peers.gave_up and 4999 in peers.gave_up


def test_a_second_worker_tells_the_first_of_a_join_it_held_in_vain(tmp_path):
    from test_config import cluster_config
    from test_worker import Packet

    from mplb_nfq.lab.packets import SYN, mp_join_syn, tcp
    from mplb_nfq.ops.config import from_dict
    from mplb_nfq.ops.fleet import GaveUp
    from mplb_nfq.worker import Worker

    second = Worker(from_dict({**cluster_config(tmp_path), "kernel": {"workers": 2, "hold_ms": 0}}), KernelMaps())
    to_first = LinkStandIn()
    second.beyond_the_first(to_first)
    for verdict, told in (("drop", []), ("accept", [GaveUp(0x0BAD0BAD)])):  # dropped once; sent again: the policy
        join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(0x0BAD0BAD)))
        second.handle(join)
        second.held.release()  # hold_ms is over and the kernel map does not have it
        assert join.verdict == verdict and to_first.sent == told
