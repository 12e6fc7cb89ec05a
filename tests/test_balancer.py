import gc
import ipaddress
import random

import pytest
from mplb_nfq.lab.packets import ACK, CLIENT_KEY, COLLIDING, PSH, SERVER_KEY, SYN, dss, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.balancer import Backend, Balancer, LookupTable, Service
from mplb_nfq.core.expiring import ExpiringTable
from mplb_nfq.core.jhash import flow_key, slot
from mplb_nfq.core.marks import JOIN, LEARNED, PROVISIONAL, REJECT
from mplb_nfq.core.packet import Malformed, parse_ip, token_of_key
from mplb_nfq.core.schedulers import Index

VIP = "10.0.100.1"


def backends(n=3):
    return [Backend(f"b{i}", (f"10.0.9.1{i}",), 0x100 + i, 100 + i) for i in range(1, n + 1)]


def lb(scheduler="rr", n=3, unknown_join="random", mptcp_aware=True, persistence=0, **kwargs):
    service = Service("web", (ipaddress.ip_address(VIP).packed,), (80,), backends(n), scheduler, unknown_join,
                      mptcp_aware, persistence)
    return Balancer([service], **kwargs)


BACKENDS = backends()
SERVER_TOKEN = token_of_key(SERVER_KEY, 1)


def syn(src="10.0.1.2", sport=40000, options=mp_capable()):
    return parse_ip(tcp(src, VIP, sport, 80, SYN, options))


def third_ack(src="10.0.1.2", sport=40000, flags=ACK, data_len=None):
    return parse_ip(tcp(src, VIP, sport, 80, flags, mp_capable(1, 0x01, CLIENT_KEY, SERVER_KEY, data_len)))


def proof(src="10.0.1.2", sport=40000):
    """The connection's next packet after its third ACK, as the kernel copies it (DSS option)."""
    return parse_ip(tcp(src, VIP, sport, 80, ACK, dss()))


def join(src="10.0.2.2", sport=50000, token=SERVER_TOKEN):
    return parse_ip(tcp(src, VIP, sport, 80, SYN, mp_join_syn(token)))


def test_round_robin_spreads_new_connections_in_order():
    balancer = lb("rr")
    marks = [balancer.decide(syn(sport=40000 + i), 0, 0).mark for i in range(6)]
    assert marks == [0x101, 0x102, 0x103, 0x101, 0x102, 0x103]


def test_plain_tcp_syn_is_balanced_like_mp_capable():
    balancer = lb("rr")
    verdicts = [balancer.decide(syn(sport=40000 + i, options=b""), 0, 0) for i in range(3)]
    assert [v.mark for v in verdicts] == [0x101 | LEARNED, 0x102 | LEARNED, 0x103 | LEARNED]  # settled at once
    assert verdicts[0].kind == "syn"


def test_source_hash_gives_one_client_one_backend():
    balancer = lb("sh")
    first = balancer.decide(syn(sport=40000), 0, 0).mark
    assert all(balancer.decide(syn(sport=40001 + i), 0, 0).mark == first for i in range(10))
    marks = {balancer.decide(syn(src=f"10.0.{i}.2"), 0, 0).mark for i in range(1, 40)}
    assert len(marks) == 3


def test_retransmitted_syn_keeps_its_backend():
    balancer = lb("rr")
    first = balancer.decide(syn(), 0, 0)
    again = balancer.decide(syn(), 0, 1)
    assert again.mark == first.mark and again.kind == "syn_retransmit"


def test_third_ack_learns_the_server_token_and_the_join_follows_it():
    balancer = lb("rr")
    balancer.decide(syn(sport=39999), 0, 0)  # another connection, so that the next one is on b2
    chosen = balancer.decide(syn(), 0, 0).mark
    learned = balancer.decide(third_ack(), chosen, 0.001)
    assert learned.token == SERVER_TOKEN and learned.mark == chosen | LEARNED | PROVISIONAL
    assert learned.kind == "third_ack"
    subflow = balancer.decide(join(), 0, 0.002)
    assert chosen == 0x102 and subflow.mark == chosen | JOIN and subflow.kind == "join_hit"


def synack(src="10.0.1.2", sport=40000, key=SERVER_KEY, version=1):
    return parse_ip(tcp(VIP, src, 80, sport, SYN | ACK, mp_capable(version, 0x01, key)))


@pytest.mark.parametrize("version", [0, 1])
def test_syn_ack_teaches_the_token_one_round_trip_before_the_third_ack(version):
    balancer = lb("rr")
    chosen = balancer.decide(syn(), 0, 0).mark
    learned = balancer.decide(synack(version=version), chosen, 0.001)
    assert learned.kind == "syn_ack" and learned.token == token_of_key(SERVER_KEY, version)
    assert learned.mark == chosen | LEARNED
    assert balancer.decide(join(token=learned.token), 0, 0.002).mark == chosen | JOIN


def test_a_join_on_an_earlier_subflow_s_four_tuple_follows_its_token_and_a_retransmission_counts_once():
    balancer = lb("rr")
    first = balancer.decide(syn(), 0, 0).mark
    balancer.decide(synack(), first, 0.001)
    assert balancer.decide(join(sport=50001), 0, 0.002).mark == first | JOIN
    other_key = bytes.fromhex("0102030405060708")
    second = balancer.decide(syn(sport=40001), 0, 0.003).mark
    balancer.decide(synack(sport=40001, key=other_key), second, 0.004)
    # the client reuses the first join's port for the second connection's join
    again = balancer.decide(join(sport=50001, token=token_of_key(other_key, 1)), 0, 0.005)
    assert second != first and again.mark == second | JOIN and again.kind == "join_hit"
    subflows = {b.name: b.subflows for b in balancer.backends}
    retransmitted = balancer.decide(join(sport=50001, token=token_of_key(other_key, 1)), 0, 0.006)
    assert retransmitted.mark == second | JOIN and retransmitted.kind == "syn_retransmit"
    assert {b.name: b.subflows for b in balancer.backends} == subflows


def test_syn_ack_without_mark_finds_its_flow_reversed():
    balancer = lb("rr")
    chosen = balancer.decide(syn(), 0, 0).mark
    assert balancer.decide(synack(), 0, 0).mark == chosen | LEARNED


def test_third_ack_after_the_syn_ack_installs_nothing_twice():
    balancer = lb("rr")
    chosen = balancer.decide(syn(), 0, 0).mark
    balancer.decide(synack(), chosen, 0)
    again = balancer.decide(third_ack(), chosen, 0)
    assert again.token is None and again.kind == "third_ack_repeat"


def test_first_data_packet_repeating_the_keys_installs_nothing_twice():
    balancer = lb("rr")
    mark = balancer.decide(syn(), 0, 0).mark
    assert balancer.decide(third_ack(), mark, 0).token == SERVER_TOKEN
    repeat = balancer.decide(third_ack(flags=ACK | PSH, data_len=100), mark, 0)  # as if the ACK raced
    assert repeat.token is None and repeat.kind == "third_ack_repeat" and repeat.mark == mark | LEARNED
    settled = balancer.decide(third_ack(flags=ACK | PSH, data_len=100), mark | LEARNED, 0)
    assert settled.token is None and settled.kind == "other" and settled.mark == mark | LEARNED


def test_lost_third_ack_the_data_packet_teaches_the_token():
    balancer = lb("rr")
    mark = balancer.decide(syn(), 0, 0).mark
    verdict = balancer.decide(third_ack(flags=ACK | PSH, data_len=100), mark, 0)
    assert verdict.token == SERVER_TOKEN and balancer.decide(join(), 0, 0).mark == mark | JOIN


def test_third_ack_without_mark_uses_the_flow_table():
    balancer = lb("rr")
    mark = balancer.decide(syn(), 0, 0).mark
    assert balancer.decide(third_ack(), 0, 0).mark == mark | LEARNED | PROVISIONAL


def test_third_ack_of_an_unknown_flow_is_accepted_unchanged():
    verdict = lb().decide(third_ack(), 0, 0)
    assert verdict.accept and verdict.token is None and verdict.kind == "first_without_flow"
    assert verdict.mark == LEARNED  # settled with no backend: the fail-open route, and never queued again


@pytest.mark.parametrize("policy,accept,mark", [("drop", False, 0), ("reset", True, REJECT)])
def test_unknown_join_policies(policy, accept, mark):
    verdict = lb(unknown_join=policy).decide(join(token=0x12345678), 0, 0)
    assert (verdict.accept, verdict.mark, verdict.kind) == (accept, mark, "join_miss")


def test_unknown_join_random_policy_picks_any_backend():
    balancer = lb(unknown_join="random", rng=random.Random(7))
    marks = {balancer.decide(join(sport=50000 + i, token=0x1000 + i), 0, 0).mark for i in range(60)}
    assert marks == {0x101 | JOIN, 0x102 | JOIN, 0x103 | JOIN}


def test_unaware_mode_schedules_joins_as_new_connections_and_learns_nothing():
    balancer = lb("rr", n=2, mptcp_aware=False)
    first = balancer.decide(syn(), 0, 0).mark
    ack = balancer.decide(third_ack(), first, 0)
    assert ack.token is None and ack.mark == first | LEARNED
    subflow = balancer.decide(join(), 0, 0)
    assert subflow.kind == "join_unaware" and subflow.mark != first


def test_malformed_and_non_tcp_are_accepted_unchanged_and_counted():
    balancer = lb()
    assert balancer.decide(Malformed("x"), 0x55, 0) == balancer.decide(Malformed("y"), 0x55, 0)
    assert balancer.decide(Malformed("x"), 0x55, 0).mark == 0x55
    assert balancer.decide(None, 0, 0).kind == "not_tcp"
    assert balancer.counts["malformed"] == 3 and balancer.counts["not_tcp"] == 1


def test_tokens_expire():
    balancer = lb(token_ttl=10)
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(third_ack(), mark, 0)
    assert balancer.decide(proof(), mark | LEARNED | PROVISIONAL, 0).kind == "token_proven"
    assert balancer.decide(join(sport=1), 0, 9.9).kind == "join_hit"
    assert balancer.decide(join(sport=2), 0, 10.1).kind == "join_miss"


def test_learned_tokens_give_the_cyclic_gc_nothing_to_walk():
    """A full collection walks every tracked object: a million tokens holding backend objects
    paused the worker for tens of ms. Held as marks, the entries drop out of the GC's lists."""
    balancer = lb()
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(third_ack(), mark, 0)
    gc.collect()
    (entry,) = balancer.provisional._entries.values()
    assert not gc.is_tracked(entry)
    assert balancer.decide(join(), 0, 1).mark == mark | JOIN


def spoofed_third_ack(i):
    """A bare ACK from a source that never opened a connection, keys of the sender's choosing."""
    key = i.to_bytes(8, "big")
    return parse_ip(tcp(f"198.18.{i >> 8 & 0xFF}.{i & 0xFF}", VIP, 40000, 80, ACK, mp_capable(1, 0x01, key, key)))


def test_spoofed_third_acks_push_out_only_each_other_never_a_proven_or_a_server_token():
    balancer = lb("sh", token_capacity=40)  # 30 proven, 10 provisional
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(third_ack(), mark, 0)
    assert balancer.decide(proof(), mark | LEARNED | PROVISIONAL, 0.01).kind == "token_proven"
    server = balancer.decide(synack(sport=40001, key=CLIENT_KEY), balancer.decide(syn(sport=40001), 0, 0).mark, 0)
    flood = [balancer.decide(spoofed_third_ack(i), 0x101, 1 + i / 1000) for i in range(1000)]
    assert all(v.kind == "third_ack" and v.mark & PROVISIONAL for v in flood)
    assert len(balancer.provisional) == 10 and len(balancer.provisional.take_pushed_out()) == 990
    for token in (SERVER_TOKEN, server.token):  # still known, and their joins still go home
        assert balancer.decide(join(sport=50000 + token % 1000, token=token), 0, 2).kind == "join_hit"
    assert len(balancer.tokens) == 2
    # and connections opened during the flood still get in: a server's token, and a client's
    late = balancer.decide(syn(sport=40003), 0, 3).mark
    assert balancer.decide(synack(sport=40003, key=bytes(8)), late, 3).kind == "syn_ack"
    key = bytes.fromhex("0102030405060708")
    dsr = balancer.decide(syn(sport=40004), 0, 3).mark
    taught = balancer.decide(parse_ip(tcp("10.0.1.2", VIP, 40004, 80, ACK, mp_capable(1, 1, CLIENT_KEY, key))), dsr, 3)
    assert taught.kind == "third_ack" and balancer.decide(join(token=taught.token), 0, 3).kind == "join_hit"


def test_a_proof_moves_its_token_to_the_proven_and_one_that_comes_too_late_finds_nothing():
    balancer = lb("rr", token_capacity=8)  # 6 proven, 2 provisional
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(third_ack(), mark, 0)
    proven = balancer.decide(proof(), mark | LEARNED | PROVISIONAL, 0.01)
    assert (proven.kind, proven.token, proven.flow) == ("token_proven", SERVER_TOKEN, third_ack().flow)
    assert balancer.tokens.get(SERVER_TOKEN, 1) == mark & 0xFFFF | 0x04000000 and len(balancer.provisional) == 0
    late = balancer.decide(syn(sport=40009), 0, 0).mark
    balancer.decide(third_ack(sport=40009, flags=ACK), late, 0)
    for i in range(2):
        balancer.decide(spoofed_third_ack(i), 0x101, 0.5)
    assert balancer.decide(proof(sport=40009), late | LEARNED | PROVISIONAL, 1).kind == "proof_without_token"
    assert balancer.decide(proof(sport=40010), 0x101 | LEARNED | PROVISIONAL, 1).kind == "proof_without_token"


def test_a_provisional_token_expires_unproven_and_a_server_s_word_settles_it():
    balancer = lb("rr")
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(third_ack(), mark, 0)
    assert balancer.decide(join(sport=1), 0, 29).kind == "join_hit"
    assert balancer.decide(join(sport=2), 0, 31).kind == "join_miss"  # PROVISIONAL_SECONDS
    other = lb("rr")
    mark = other.decide(syn(), 0, 0).mark
    other.decide(third_ack(), mark, 0)
    assert other.decide(synack(), mark, 0.01).kind == "syn_ack_over_client"
    assert len(other.provisional) == 0 and other.decide(join(), 0, 100).kind == "join_hit"


def test_expiring_table_is_bounded_and_evicts_oldest():
    table = ExpiringTable(capacity=3, ttl=100)
    for i in range(5):
        table.put(i, str(i), now=i)
    assert len(table) == 3 and table.evicted == 2
    assert table.get(0, 5) is None and table.get(4, 5) == "4"
    table.put(2, "again", now=6)  # refreshed: now the newest
    table.put(5, "5", now=7)
    assert table.get(3, 8) is None and table.get(2, 8) == "again"


def test_expiring_table_drops_expired_entries_on_insert():
    table = ExpiringTable(capacity=100, ttl=1)
    for i in range(50):
        table.put(i, i, now=0)
    table.put("late", 1, now=5)
    assert len(table) == 1 and table.get("late", 5) == 1


def test_expiring_table_refreshed_many_times_keeps_its_bookkeeping_bounded():
    table = ExpiringTable(capacity=10, ttl=100)
    for i in range(10_000):
        table.put("hot", i, now=i * 0.001)
    table.put("cold", 0, now=11)
    assert len(table._order) <= 2 * len(table) + 1024
    assert table.get("hot", 11) == 9_999 and table.evicted == 0
    for i in range(9):  # the stale copies of "hot" do not count as entries: only "hot" goes
        table.put(i, i, now=12)
    assert table.evicted == 1 and table.get("hot", 12) is None and table.get("cold", 12) == 0


def test_no_backends_is_refused():
    with pytest.raises(ValueError):
        Balancer([])


@pytest.mark.parametrize("version", [0, 1])
def test_token_collision_between_backends_is_detected_and_its_joins_refused_not_misrouted(version):
    balancer = lb("rr")
    key_a, key_b = COLLIDING[version]
    token = token_of_key(key_a, version)
    mark_a = balancer.decide(syn(sport=40000), 0, 0).mark
    mark_b = balancer.decide(syn(sport=40001), 0, 0).mark
    assert mark_a != mark_b
    assert balancer.decide(synack(sport=40000, key=key_a, version=version), mark_a, 0).token == token
    collision = balancer.decide(synack(sport=40001, key=key_b, version=version), mark_b, 0)
    assert collision.kind == "token_collision" and collision.token == token  # the worker removes it from the map
    assert collision.mark == mark_b | LEARNED  # the connection itself is unaffected
    ack = parse_ip(tcp("10.0.1.2", VIP, 40001, 80, ACK, mp_capable(version, 0x01, CLIENT_KEY, key_b)))
    again = balancer.decide(ack, mark_b, 0)  # its third ACK: nothing more to do
    assert again.token is None and again.kind == "token_collision_repeat"
    refused = balancer.decide(join(token=token), 0, 0)
    assert (refused.mark, refused.kind) == (REJECT, "join_collision")
    assert balancer.counts["token_collision"] == 1


def test_same_token_on_the_same_backend_is_no_collision():
    balancer = lb("rr", n=1)
    mark = balancer.decide(syn(sport=40000), 0, 0).mark
    balancer.decide(synack(sport=40000, key=COLLIDING[1][0]), mark, 0)
    verdict = balancer.decide(synack(sport=40001, key=COLLIDING[1][1]), balancer.decide(syn(sport=40001), 0, 0).mark, 0)
    assert verdict.kind == "syn_ack_repeat"


def test_direct_server_return_first_packets_take_the_backend_of_their_syn():
    """DSR: the SYN is untracked; the first ACK makes a conntrack entry with mark 0 and comes to
    the worker, which gives it the SYN's backend (and learns the token from its keys)."""
    balancer = lb("rr")
    balancer.decide(syn(sport=39999), 0, 0)
    chosen = balancer.decide(syn(), 0, 0).mark
    first = balancer.decide(third_ack(), 0, 0.001)
    assert first.mark == chosen | LEARNED | PROVISIONAL and first.token == SERVER_TOKEN
    subflow = balancer.decide(join(), 0, 0.002)
    assert subflow.mark == chosen | JOIN
    plain = balancer.decide(parse_ip(tcp("10.0.2.2", VIP, 50000, 80, ACK)), 0, 0.003)  # the join's first ACK
    assert (plain.mark, plain.kind) == (chosen | JOIN | LEARNED, "first_packet")


# -- the balancer's use of backend state -------------------------------------------------------
def test_drained_backend_gets_no_new_connections_but_its_joins():
    balancer = lb()
    mark = balancer.decide(syn(), 0, 0).mark
    backend = balancer.backend_of(mark)
    balancer.decide(third_ack(), mark, 0)
    backend.drained = True
    new = {balancer.decide(syn(sport=41000 + i), 0, 0).mark for i in range(30)}
    assert mark not in new and len(new) == 2
    verdict = balancer.decide(join(), 0, 0)
    assert verdict.mark == mark | JOIN and verdict.kind == "join_hit"
    assert backend.state == "draining"


def test_weight_zero_is_a_drain_and_down_backends_are_skipped():
    balancer = lb()
    svc = balancer.services[0]
    svc.backends[0].weight = 0
    svc.backends[1].healthy = False
    assert {balancer.decide(syn(sport=41000 + i), 0, 0).mark for i in range(10)} == {0x103}
    assert svc.backends[1].state == "down" and svc.backends[0].state == "draining"


def test_no_available_backend_resets_the_syn():
    balancer = lb()
    for b in balancer.services[0].backends:
        b.healthy = False
    verdict = balancer.decide(syn(), 0, 0)
    assert verdict.mark == REJECT and verdict.kind == "no_backend"


def test_persistence_keeps_a_client_on_its_backend_until_the_timeout():
    balancer = lb("rr", persistence=60)
    first = balancer.decide(syn(sport=1), 0, 0).mark
    assert all(balancer.decide(syn(sport=2 + i), 0, 10 + i).mark == first for i in range(5))
    other = balancer.decide(syn(src="10.0.7.7", sport=1), 0, 20).mark
    assert other != first
    assert balancer.decide(syn(sport=100), 0, 200).mark != first  # expired: round robin goes on


def test_persistence_leaves_a_backend_that_went_down():
    balancer = lb("rr", persistence=60)
    first = balancer.decide(syn(sport=1), 0, 0).mark
    balancer.backend_of(first).healthy = False
    assert balancer.decide(syn(sport=2), 0, 1).mark != first


def test_retired_backend_keeps_its_joins_after_a_reload():
    balancer = lb(n=2)
    svc = balancer.services[0]
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(third_ack(), mark, 0)
    gone = balancer.backend_of(mark)
    gone.retired = True
    remaining = [b for b in svc.backends if b is not gone]
    balancer.update([Service("web", svc.vips, (80,), remaining)], retired=[gone])
    assert balancer.decide(join(), 0, 1).mark == gone.mark | JOIN
    assert {balancer.decide(syn(sport=42000 + i), 0, 1).mark for i in range(5)} == {remaining[0].mark}


# -- hostile clients --------------------------------------------------------------------------
def capable_ack(sport, key, receiver=None, src="10.0.1.2"):
    return parse_ip(tcp(src, VIP, sport, 80, ACK, mp_capable(1, 0x01, key, receiver)))


def test_a_plain_connection_that_sends_mp_capable_on_every_ack_is_settled_and_teaches_nothing():
    balancer = lb()
    mark = balancer.decide(syn(options=b""), 0, 0).mark
    assert mark & LEARNED  # the ruleset queues nothing more of it
    for _ in range(3):  # were they queued anyway (a restored mark), they would teach nothing
        verdict = balancer.decide(capable_ack(40000, CLIENT_KEY, SERVER_KEY), mark, 0)
        assert verdict.token is None and verdict.mark & LEARNED
    assert len(balancer.tokens) == 0


def test_an_mp_capable_ack_that_teaches_nothing_still_settles_its_connection():
    balancer = lb()
    mark = balancer.decide(syn(), 0, 0).mark
    assert not mark & LEARNED  # an MP_CAPABLE SYN: its SYN-ACK is still to come
    verdict = balancer.decide(capable_ack(40000, CLIENT_KEY), mark, 0)  # length 12: no key to learn from
    assert verdict.token is None and verdict.mark == mark | LEARNED


def test_a_client_cannot_take_over_the_token_a_server_taught():
    balancer = lb()
    victim, key_a, key_b = 40000, *COLLIDING[1]
    victim_mark = balancer.decide(syn(sport=victim), 0, 0).mark
    assert balancer.decide(synack(sport=victim, key=key_a), victim_mark, 0).kind == "syn_ack"
    attacker_mark = balancer.decide(syn(sport=41000), 0, 0).mark
    assert attacker_mark != victim_mark
    verdict = balancer.decide(capable_ack(41000, CLIENT_KEY, key_b), attacker_mark, 0)
    assert verdict.kind == "token_refused" and verdict.token is None  # nothing written to the map
    assert balancer.decide(join(token=token_of_key(key_a, 1)), 0, 0).mark == victim_mark | JOIN


def test_a_server_token_replaces_one_a_client_taught_and_clients_come_first_among_themselves():
    balancer = lb()
    key_a, key_b = COLLIDING[1]
    token = token_of_key(key_a, 1)
    first = balancer.decide(syn(sport=40000), 0, 0).mark
    taught = balancer.decide(capable_ack(40000, CLIENT_KEY, key_a), first, 0)  # DSR: a client's word
    assert taught.kind == "third_ack" and taught.token == token and taught.flow[1] == 40000
    second = balancer.decide(syn(sport=40001), 0, 0).mark
    assert balancer.decide(capable_ack(40001, CLIENT_KEY, key_b), second, 0).kind == "token_refused"
    third = balancer.decide(syn(sport=40002), 0, 0).mark
    server = balancer.decide(synack(sport=40002, key=key_b), third, 0)
    assert server.kind == "syn_ack_over_client" and server.token == token
    assert balancer.decide(join(token=token), 0, 0).mark == third | JOIN


def test_a_full_token_table_keeps_its_tokens_and_refuses_new_ones():
    balancer = lb(token_capacity=1)
    first = balancer.decide(syn(sport=40000), 0, 0).mark
    assert balancer.decide(synack(sport=40000), first, 0).token == SERVER_TOKEN
    second = balancer.decide(syn(sport=40001), 0, 1).mark
    verdict = balancer.decide(synack(sport=40001, key=CLIENT_KEY), second, 1)
    assert verdict.kind == "token_table_full" and verdict.token is None and verdict.mark & LEARNED
    assert balancer.decide(join(), 0, 2).mark == first | JOIN and balancer.tokens.refused == 1


def test_a_token_whose_install_failed_is_given_again_by_the_next_mp_capable_packet():
    balancer = lb()
    mark = balancer.decide(syn(), 0, 0).mark
    assert balancer.decide(synack(), mark, 0).token == SERVER_TOKEN
    balancer.install_failed(SERVER_TOKEN, 0)
    again = balancer.decide(third_ack(), mark, 0)
    assert again.token == SERVER_TOKEN and again.kind == "syn_ack"  # still the server's word
    assert balancer.decide(third_ack(), mark, 0).token is None  # once installed, once only


def test_a_forgotten_token_steers_no_join():
    balancer = lb(unknown_join="reset")
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(synack(), mark, 0)
    balancer.forget(SERVER_TOKEN)
    assert balancer.decide(join(), 0, 0).mark == REJECT


def test_a_packet_with_a_broken_header_is_dropped_and_one_with_broken_options_decided_as_linux_takes_it():
    balancer = lb()
    broken = tcp("10.0.1.2", VIP, 40000, 80, SYN)
    broken = broken[:32] + bytes([0x40]) + broken[33:]  # TCP data offset 16
    assert not balancer.decide(parse_ip(broken), 0, 0).accept
    for b in balancer.services[0].backends[1:]:
        b.drained = True
    bad_option = parse_ip(tcp("10.0.1.2", VIP, 40001, 80, SYN, mp_capable() + b"\x02\x01"))  # MSS of length 1
    assert isinstance(bad_option, Malformed)
    verdict = balancer.decide(bad_option, 0, 0)
    assert verdict.mark == 0x101  # scheduled, drain respected: its MP_CAPABLE came before the broken option
    both = parse_ip(tcp("10.0.2.2", VIP, 50000, 80, SYN, mp_join_syn(SERVER_TOKEN) + mp_capable()))
    assert not balancer.decide(both, 0, 0).accept  # a join to one kernel, plain TCP to another: dropped
    assert balancer.counts["malformed"] == 3


# -- the tables the kernel indexes ------------------------------------------------------------------
def test_each_scheduler_gives_the_kernel_a_table_of_the_available_backends_marks():
    balancer = lb("wrr")
    b1, b2, b3 = balancer.services[0].backends
    b1.weight, b2.weight, b3.weight = 4, 2, 2
    (table,) = balancer.lookup_tables().values()
    assert table.index is Index.COUNTER and table.slots == (0x101, 0x102, 0x103, 0x101)  # smooth, weights / gcd
    b2.healthy = False
    (table,) = balancer.lookup_tables().values()
    assert table.slots == (0x101, 0x103, 0x101)
    b1.drained = b3.drained = True
    assert lb_table(balancer) == LookupTable(Index.COUNTER, (REJECT,))  # none available: the SYN is reset
    assert lb_table(lb("maglev")).index is Index.FLOW and len(lb_table(lb("maglev")).slots) == 65537
    assert lb_table(lb("sh")).index is Index.SOURCE
    assert lb_table(lb("lc")) == LookupTable(Index.WORKER, ())
    assert lb_table(lb("rr", persistence=60)) == LookupTable(Index.COUNTER, (0x101, 0x102, 0x103), 60)


def lb_table(balancer):
    (table,) = balancer.lookup_tables().values()
    return table


def test_a_table_is_built_again_only_when_the_backends_state_changes():
    balancer = lb("maglev")
    first = lb_table(balancer)
    assert lb_table(balancer) is first
    balancer.services[0].backends[0].weight = 3
    assert lb_table(balancer) is not first


def test_a_table_is_built_from_one_reading_of_each_backends_state():
    """The health thread changes a backend while the loop builds a table: read twice, the table
    had it up under a signature that said down, and stayed so until something else changed."""
    class GoingDown(Backend):
        readings = 0

        @property
        def available(self):
            self.readings += 1
            return self.readings == 1

    going = GoingDown("b9", ("10.0.9.19",), 0x109, 109)
    balancer = Balancer([Service("web", (ipaddress.ip_address(VIP).packed,), (80,), backends(2) + [going], "rr")])
    assert 0x109 in lb_table(balancer).slots
    assert 0x109 not in lb_table(balancer).slots  # down at the next reading: built again


def test_a_reload_that_changes_the_scheduler_or_the_table_size_builds_the_table_again():
    def service(scheduler, size=65537, aware=True):
        return Service("web", (ipaddress.ip_address(VIP).packed,), (80,), backends(), scheduler, "random", aware,
                       maglev_size=size, direct_return=True)

    balancer = Balancer([service("maglev")])
    first = lb_table(balancer)
    for changed in (service("maglev", 251), service("rr"), service("rr", aware=False)):
        balancer.update([changed])
        assert lb_table(balancer) is not first
        first = lb_table(balancer)
    assert len(first.slots) == 3 and not first.via


def test_round_robin_under_direct_server_return_hashes_the_connection():
    service = Service("web", (ipaddress.ip_address(VIP).packed,), (80,), backends(), "rr", direct_return=True)
    assert lb_table(Balancer([service])).index is Index.FLOW


def test_the_core_picks_the_slot_the_kernel_picks_for_hashed_tables():
    for scheduler, key in (("maglev", lambda s: flow_key(s.src, s.sport, s.dst, s.dport)), ("sh", lambda s: s.src)):
        balancer = lb(scheduler)
        table = lb_table(balancer)
        for port in range(40000, 40020):
            segment = syn(sport=port)
            assert balancer.decide(segment, 0, 0.0).mark & 0xFFFF == table.mark_at(slot(key(segment), len(table.slots)))
