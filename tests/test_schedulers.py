from collections import Counter
from dataclasses import dataclass

import pytest

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


@pytest.mark.parametrize("n", [3, 5])
def test_maglev_over_virtual_backends_moves_exactly_the_keys_of_a_backend_that_goes(n):
    backends = [B(f"b{i}") for i in range(n)]
    m = Maglev(table_size=65537, backends=backends)
    table, keys = list(m.table(backends)), 20000
    before = picks(m, backends, keys)
    after = picks(m, backends[:-1], keys)
    assert m.table(backends[:-1]) == table  # the slots stay: only the virtual backends' table changes
    assert [x for x, y in zip(before, after) if x != y] == [x for x in before if x == backends[-1].name]
    taken = Counter(y for x, y in zip(before, after) if x != y)
    assert len(taken) == n - 1 and min(taken.values()) > 0.5 * max(taken.values()), taken  # spread over the others
    second = picks(m, backends[:-2], keys)  # another goes: only its own keys and those it had inherited move
    assert [y for x, y in zip(after, second) if x != y] and all(
        x == backends[-2].name for x, y in zip(after, second) if x != y)
    assert picks(m, backends, keys) == before  # both back: every key where it was


def test_maglev_over_virtual_backends_shares_a_gone_backend_by_weight():
    backends = [B("a", 3), B("b", 1), B("c", 2)]
    m = Maglev(table_size=65537, backends=backends)
    before = picks(m, backends, 30000)
    after = picks(m, backends[:2], 30000)
    taken = Counter(y for x, y in zip(before, after) if x == "c")
    assert 2.0 < taken["a"] / taken["b"] < 4.5, taken


def test_maglev_honours_weights():
    counts = Counter(picks(Maglev(table_size=65537), [B("a", 3), B("b", 1)], 20000))
    assert 2.5 < counts["a"] / counts["b"] < 3.5


def test_maglev_refuses_a_table_size_that_is_not_prime():
    with pytest.raises(ValueError, match="not a prime"):
        Maglev(table_size=65536)


def test_a_counter_table_is_one_period_of_the_pickers_own_sequence():
    candidates = [B("a", 5), B("b", 3), B("c", 2)]
    table = WeightedRoundRobin().table(candidates)
    assert len(table) == 10
    assert [candidates[i].name for i in table] * 3 == picks(WeightedRoundRobin(), candidates, 30)
    assert [candidates[i].name for i in RoundRobin().table(candidates)] == picks(RoundRobin(), candidates, 3)
