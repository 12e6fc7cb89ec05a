import ipaddress
from collections import Counter
from dataclasses import dataclass

import pytest
from packets import ACK, CLIENT_KEY, SERVER_KEY, SYN, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.balancer import Backend, Balancer, Service
from mplb_nfq.core.marks import JOIN, REJECT
from mplb_nfq.core.packet import parse_ip, token_of_key
from mplb_nfq.core.schedulers import Flow, LeastConnections, Maglev, RoundRobin, SourceHash, WeightedRoundRobin


@dataclass(eq=False)
class B:
    name: str
    weight: int = 1
    active: int = 0


def picks(scheduler, candidates, n, client=lambda i: b"\x0a\0\0\x01"):
    """n connections from client(i), port i, to one VIP."""
    return [scheduler.pick(Flow(client(i), i % 65536, b"\x0a\0\x64\x01", 80 + i // 65536), candidates).name
            for i in range(n)]


def test_round_robin():
    assert picks(RoundRobin(), [B("a"), B("b"), B("c")], 6) == list("abcabc")


def test_weighted_round_robin_is_smooth_and_proportional():
    order = picks(WeightedRoundRobin(), [B("a", 5), B("b", 1), B("c", 1)], 7)
    assert order == list("aabacaa")
    counts = Counter(picks(WeightedRoundRobin(), [B("a", 3), B("b", 2), B("c", 1)], 600))
    assert counts == {"a": 300, "b": 200, "c": 100}


def test_least_connections_follows_live_counts_per_weight():
    a, b, c = B("a", 1, 10), B("b", 1, 2), B("c", 4, 12)  # c: 3 per unit of weight
    flow = Flow(b"\x0a\0\0\x01", 1, b"\x0a\0\x64\x01", 80)
    assert LeastConnections().pick(flow, [a, b, c]).name == "b"
    b.active = 20
    assert LeastConnections().pick(flow, [a, b, c]).name == "c"


def test_least_connections_spreads_ties():
    backends = [B("a"), B("b"), B("c")]
    assert set(picks(LeastConnections(), backends, 3)) == {"a", "b", "c"}


def test_source_hash_depends_on_the_client_only():
    s = SourceHash()
    backends = [B("a"), B("b"), B("c")]
    assert len(set(picks(s, backends, 50, client=lambda i: b"\x0a\0\0\x07"))) == 1
    assert len(set(picks(s, backends, 50, client=lambda i: bytes([10, 0, 0, i])))) == 3


def test_maglev_spreads_evenly_and_is_stable():
    backends = [B(f"b{i}") for i in range(5)]
    m = Maglev(table_size=65537)
    counts = Counter(picks(m, backends, 20000))
    assert all(3400 < n < 4600 for n in counts.values()), counts
    assert picks(Maglev(table_size=65537), backends, 500) == picks(m, backends, 500)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_maglev_removing_one_of_n_backends_moves_about_one_nth_of_the_keys(n):
    backends = [B(f"b{i}") for i in range(n)]
    m = Maglev(table_size=65537)
    keys = 20000
    before = picks(m, backends, keys)
    after = picks(m, backends[:-1], keys)
    moved = sum(1 for x, y in zip(before, after) if x != y)
    removed = sum(1 for x in before if x == backends[-1].name)
    assert moved >= removed  # every key of the removed backend moved...
    assert moved / keys < 1 / n * 1.6, f"{moved / keys:.3f} of the keys moved, 1/N = {1 / n:.3f}"


def test_maglev_honours_weights():
    counts = Counter(picks(Maglev(table_size=65537), [B("a", 3), B("b", 1)], 20000))
    assert 2.5 < counts["a"] / counts["b"] < 3.5


def test_maglev_refuses_a_table_size_that_is_not_prime():
    with pytest.raises(ValueError, match="not a prime"):
        Maglev(table_size=65536)


# -- the balancer's use of backend state -------------------------------------------------------
VIP = ipaddress.ip_address("10.0.100.1").packed


def service(scheduler="rr", persistence=0, n=3):
    backends = [Backend(f"b{i}", (f"10.0.9.1{i}",), 0x100 + i, 100 + i) for i in range(1, n + 1)]
    return Service("web", (VIP,), (80,), backends, scheduler, "random", True, persistence)


def syn(src="10.0.1.2", sport=40000):
    return parse_ip(tcp(src, "10.0.100.1", sport, 80, SYN, mp_capable()))


def test_drained_backend_gets_no_new_connections_but_its_joins():
    svc = service()
    balancer = Balancer([svc])
    mark = balancer.decide(syn(), 0, 0).mark
    backend = balancer.backend_of(mark)
    balancer.decide(parse_ip(tcp("10.0.1.2", "10.0.100.1", 40000, 80, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY))),
                    mark, 0)
    backend.drained = True
    new = {balancer.decide(syn(sport=41000 + i), 0, 0).mark for i in range(30)}
    assert mark not in new and len(new) == 2
    join = balancer.decide(parse_ip(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN,
                                        mp_join_syn(token_of_key(SERVER_KEY, 1)))), 0, 0)
    assert join.mark == mark | JOIN and join.kind == "join_hit"
    assert backend.state == "draining"


def test_weight_zero_is_a_drain_and_down_backends_are_skipped():
    svc = service()
    svc.backends[0].weight = 0
    svc.backends[1].healthy = False
    balancer = Balancer([svc])
    assert {balancer.decide(syn(sport=41000 + i), 0, 0).mark for i in range(10)} == {0x103}
    assert svc.backends[1].state == "down" and svc.backends[0].state == "draining"


def test_no_available_backend_resets_the_syn():
    svc = service()
    for b in svc.backends:
        b.healthy = False
    verdict = Balancer([svc]).decide(syn(), 0, 0)
    assert verdict.mark == REJECT and verdict.kind == "no_backend"


def test_persistence_keeps_a_client_on_its_backend_until_the_timeout():
    balancer = Balancer([service("rr", persistence=60)])
    first = balancer.decide(syn(sport=1), 0, 0).mark
    assert all(balancer.decide(syn(sport=2 + i), 0, 10 + i).mark == first for i in range(5))
    other = balancer.decide(syn(src="10.0.7.7", sport=1), 0, 20).mark
    assert other != first
    assert balancer.decide(syn(sport=100), 0, 200).mark != first  # expired: round robin goes on


def test_persistence_leaves_a_backend_that_went_down():
    svc = service("rr", persistence=60)
    balancer = Balancer([svc])
    first = balancer.decide(syn(sport=1), 0, 0).mark
    balancer.backend_of(first).healthy = False
    assert balancer.decide(syn(sport=2), 0, 1).mark != first


def test_retired_backend_keeps_its_joins_after_a_reload():
    svc = service(n=2)
    balancer = Balancer([svc])
    mark = balancer.decide(syn(), 0, 0).mark
    balancer.decide(parse_ip(tcp("10.0.1.2", "10.0.100.1", 40000, 80, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY))),
                    mark, 0)
    gone = balancer.backend_of(mark)
    gone.retired = True
    remaining = [b for b in svc.backends if b is not gone]
    balancer.update([Service("web", (VIP,), (80,), remaining)], retired=[gone])
    join = balancer.decide(parse_ip(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN,
                                        mp_join_syn(token_of_key(SERVER_KEY, 1)))), 0, 1)
    assert join.mark == gone.mark | JOIN
    assert {balancer.decide(syn(sport=42000 + i), 0, 1).mark for i in range(5)} == {remaining[0].mark}
