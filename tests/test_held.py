"""Joins held until their token is known (pure): found by token, expired in order, the oldest
pushed out when the budget is spent."""
from mplb_nfq.core.held import RETRY_SECONDS, HeldJoins


def hold(held, packet, token, now):
    """As the worker holds a join: room first (what is pushed out comes back), then the join."""
    pushed_out = held.make_room()
    held.hold(packet, None, token, now)
    return pushed_out


def test_a_learned_token_releases_exactly_its_joins_and_the_others_expire_in_order():
    held = HeldJoins(budget=8, seconds=0.05)
    for i, token in enumerate([1, 2, 1, 3]):
        assert hold(held, f"p{i}", token, now=i / 1000) == []
    assert [j.packet for j in held.release(1)] == ["p0", "p2"] and len(held) == 2
    assert held.release(1) == [] and held.expired(0.0505) == []
    assert [j.packet for j in held.expired(0.0515)] == ["p1"]
    assert held.next_deadline() == 0.003 + 0.05 and [j.packet for j in held] == ["p3"]
    assert [j.packet for j in held.expired(1)] == ["p3"] and len(held) == 0 and held.next_deadline() is None


def test_a_flood_of_made_up_tokens_pushes_out_its_own_oldest_and_never_a_newer_join():
    held = HeldJoins(budget=100, seconds=0.05)
    pushed = []
    for i in range(10_000):  # 10,000 joins/s for a second, each with its own random token
        pushed += hold(held, i, 0x10000 + i, now=i / 10_000)
        if i == 5_000:
            pushed += hold(held, "real", 7, now=i / 10_000)  # a real join racing its token
        if i == 5_005:  # half a millisecond later its token is learned: it is still there
            assert [j.packet for j in held.release(7)] == ["real"]
    assert len(held) == 100 and len(pushed) == 10_000 + 1 - 100 - 1 and "real" not in [j.packet for j in pushed]
    assert [j.packet for j in pushed[:3]] == [0, 1, 2]  # oldest first


def test_rechecks_come_at_doubling_intervals_a_bounded_number_a_turn():
    held = HeldJoins(budget=8, seconds=0.05, recheck_after=0.002)
    hold(held, "a", 1, now=0)
    hold(held, "b", 2, now=0.001)
    assert held.next_deadline() == 0.002 and held.due_for_recheck(0.0015, 32) == []
    assert [j.packet for j in held.due_for_recheck(0.0025, 32)] == ["a"]  # again at 0.0025 + 0.004
    assert [j.packet for j in held.due_for_recheck(0.0035, 32)] == ["b"]
    held.release(2)
    assert held.due_for_recheck(0.006, 32) == [] and [j.packet for j in held.due_for_recheck(0.0066, 32)] == ["a"]
    for i in range(5):
        hold(held, i, 10 + i, now=0.01)
    assert len(held.due_for_recheck(0.02, 2)) == 2 and len(held.due_for_recheck(0.02, 32)) == 4  # a's, then the rest


def test_an_expired_join_is_dropped_once_and_its_retransmission_meets_the_policy():
    held = HeldJoins(budget=2, seconds=0.05)
    flow = ("10.0.2.2", 50000, "10.0.100.1", 80)
    assert held.drop_first_expiry(flow, 7, now=0.05)  # dropped: the client sends it again
    assert not held.drop_first_expiry(flow, 7, now=1.1)  # sent again, waited again: the policy
    assert held.drop_first_expiry(flow, 7, now=1.2)  # a third time is a new join (its token may be reused)
    assert held.drop_first_expiry(flow, 8, now=1.3)  # the same ports with another token: another join
    assert held.drop_first_expiry(flow, 7, now=1.2 + RETRY_SECONDS + 0.1)  # forgotten after RETRY_SECONDS


def test_strangers_joins_push_a_dropped_one_out_of_memory_and_it_is_only_dropped_again():
    held = HeldJoins(budget=100, seconds=0.05)
    assert held.drop_first_expiry(("real", 1), 7, now=0)
    for i in range(100):  # a flood's joins, each expired and dropped
        assert held.drop_first_expiry(("flood", i), 0x10000 + i, now=0.001 * i)
    assert held.drop_first_expiry(("real", 1), 7, now=1.0)  # dropped again (its token would have been in the map)
    assert not held.drop_first_expiry(("real", 1), 7, now=3.0)
