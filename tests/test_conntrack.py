"""The conntrack follower's pure parts: a token's connection ends with its destroy event (or with
the full readings that miss it), and live entries are counted per backend, each end once."""
import ipaddress

from mplb_nfq.core.marks import JOIN
from mplb_nfq.kernel.conntrack import ABSENT_READINGS, RECENT_SECONDS, Counts, Lifetimes, Tally
from mplb_nfq.kernel.ctnetlink import CHANGED, CREATED, DESTROYED, Entry
from mplb_nfq.kernel.ctnetlink import flow_key as key
from mplb_nfq.core.flowtokens import digest

VIP = ipaddress.ip_address("10.99.0.1").packed
FLOW = (ipaddress.ip_address("10.0.0.2").packed, 40000, VIP, 80)
FLOW6 = (ipaddress.ip_address("fd00::2").packed, 40001, ipaddress.ip_address("fd99::1").packed, 80)


def watched(lifetimes) -> dict:
    """token -> the digest of its connection's first flow."""
    return {token: flow for flow, token in lifetimes.teaching.items()}


def at(*flows) -> dict:
    return {token: digest(key(flow)) for token, flow in flows}


def reading(lifetimes, *flows, mark=0x101):
    lifetimes.begin_reading()
    for flow in flows:
        lifetimes.seen(Entry(flow, mark, 3, CHANGED))
    lifetimes.end_reading()
    return lifetimes.take()[0]


def test_a_watched_connection_ends_with_its_destroy_event_or_with_the_readings_that_miss_it():
    lifetimes = Lifetimes()
    other, third = (FLOW[0], 2, VIP, 80), (FLOW[0], 3, VIP, 80)
    lifetimes.watch([(1, FLOW), (2, FLOW6), (3, other)])
    lifetimes.event(Entry(FLOW, 0x101, 7, CHANGED), 0.0)  # TIME_WAIT: a late join still finds its token
    lifetimes.event(Entry(FLOW6, 0x101 | JOIN, None, DESTROYED), 0.0)  # a subflow of the same four-tuple: no end
    assert lifetimes.take()[0] == []
    lifetimes.event(Entry(FLOW, 0x101, None, DESTROYED), 1.0)
    assert lifetimes.take()[0] == [1] and watched(lifetimes) == at((2, FLOW6), (3, other))
    lifetimes.watch([(4, FLOW)])  # a watch sent after its connection's end: ended at once
    assert lifetimes.take()[0] == [4] and watched(lifetimes) == at((2, FLOW6), (3, other))
    lifetimes.prune(1.0 + RECENT_SECONDS)
    lifetimes.watch([(5, FLOW), (6, third)])  # the four-tuple again, long after: a new connection
    assert lifetimes.take()[0] == [] and watched(lifetimes) == at((2, FLOW6), (3, other), (5, FLOW), (6, third))
    lifetimes.event(Entry(third, 0x101, None, DESTROYED), 2.0)
    assert lifetimes.take()[0] == [6]
    readings = [reading(lifetimes, FLOW, other, (FLOW[0], 9, VIP, 80), mark=0x101) for _ in range(ABSENT_READINGS)]
    assert readings == [[]] * (ABSENT_READINGS - 1) + [[2]]  # an end whose event was lost
    assert lifetimes.take()[0] == [] and watched(lifetimes) == at((3, other), (5, FLOW))
    assert reading(lifetimes, FLOW, other, mark=0x101 | JOIN) == []  # subflows are not connections: one miss
    assert reading(lifetimes, FLOW, other) == [] and watched(lifetimes) == at((3, other), (5, FLOW))


def test_a_four_tuple_used_again_ends_the_old_connections_token_and_keeps_the_new_ones():
    lifetimes = Lifetimes()
    lifetimes.watch([(1, FLOW)])
    lifetimes.event(Entry(FLOW, 0x101, None, DESTROYED), 1.0)  # the client's next SYN on the same ports
    lifetimes.event(Entry(FLOW, 0x102, 1, CREATED), 1.0)
    lifetimes.watch([(2, FLOW)])  # its watch: not a late one
    assert lifetimes.take()[0] == [1] and watched(lifetimes) == at((2, FLOW))
    lifetimes.watch([(2, FLOW)])  # the same watch twice ends nothing
    assert lifetimes.take()[0] == [] and watched(lifetimes) == at((2, FLOW))


def test_ends_remembered_for_late_watches_are_only_marked_connections_and_at_most_a_budget(monkeypatch):
    from mplb_nfq.kernel import conntrack

    monkeypatch.setattr(conntrack, "RECENT_MAX", 3)
    lifetimes = Lifetimes()
    flows = [(FLOW[0], port, VIP, 80) for port in range(1, 6)]
    lifetimes.event(Entry(flows[0], 0, None, DESTROYED), 0.0)  # no backend: taught nothing
    for flow in flows[1:]:
        lifetimes.event(Entry(flow, 0x101, None, DESTROYED), 0.0)
    assert list(lifetimes.recent) == [digest(key(flow)) for flow in flows[2:]]  # the oldest went
    lifetimes.watch([(1, flows[1]), (2, flows[4])])
    assert lifetimes.take()[0] == [2]  # the late watch of a forgotten end waits for the readings
    assert reading(lifetimes) == [] and reading(lifetimes) == [1]


def test_conntrack_tally_counts_live_entries_per_backend_and_each_end_once():
    tally = Tally()
    other = (FLOW[0], 2, VIP, 80)
    tally.event(Entry(FLOW, 0x101, 2, CREATED))
    tally.event(Entry(other, 0x101, 2, CREATED))
    tally.event(Entry(FLOW6, 0x102 | JOIN, 2, CREATED))
    tally.event(Entry((FLOW[0], 3, VIP, 80), 0, 2, CREATED))  # no backend: not ours
    assert tally.counts() == Counts({0x101: 2}, {0x102: 1})
    tally.event(Entry(FLOW, 0x101, 7, CHANGED))  # TIME_WAIT: counted out now, not again at its end
    tally.event(Entry(FLOW, 0x101, None, DESTROYED))
    tally.event(Entry(FLOW6, 0x102 | JOIN, None, DESTROYED))
    assert tally.counts() == Counts({0x101: 1}, {})
    tally.event(Entry(FLOW6, 0x102 | JOIN, None, DESTROYED))  # an end heard twice never counts below 0
    tally.reading([Entry(FLOW, 0x101, 3, CHANGED), Entry(other, 0x103, 7, CHANGED)])  # a full reading decides
    assert tally.counts() == Counts({0x101: 1}, {}) and tally.closed == {key(other)}
    tally.event(Entry(other, 0x103, 1, CHANGED))  # reopened (TIME_WAIT -> SYN_SENT): live again
    assert tally.counts() == Counts({0x101: 1, 0x103: 1}, {})


def test_a_connection_stops_counting_at_its_first_fin_or_rst_and_its_end_is_no_second_one():
    tally, other = Tally(), (FLOW[0], 2, VIP, 80)
    tally.event(Entry(FLOW, 0x101, 1, CREATED))
    tally.event(Entry(other, 0x101, None, CREATED))  # (an event without the TCP state)
    tally.event(Entry(FLOW6, 0x102 | JOIN, 1, CREATED))
    assert tally.counts() == Counts({0x101: 2}, {0x102: 1})
    tally.event(Entry(FLOW, 0x101, 3, CHANGED, closing=True))  # its first FIN: the label, its only change told
    tally.event(Entry(FLOW6, 0x102 | JOIN, 1, CHANGED, closing=True))  # a subflow's RST, whatever its state
    assert tally.counts() == Counts({0x101: 1}, {})
    tally.event(Entry(FLOW, 0x101, None, DESTROYED, closing=True))
    tally.event(Entry(FLOW6, 0x102 | JOIN, None, DESTROYED))
    assert tally.counts() == Counts({0x101: 1}, {})
    # a full reading counts an established entry that saw a FIN as closing, and one with no state never
    tally.reading([Entry(FLOW, 0x101, 3, CHANGED, closing=True), Entry(other, 0x101, 3, CHANGED),
                   Entry(FLOW6, 0x102, None, CHANGED)])
    assert tally.counts() == Counts({0x101: 1}, {}) and tally.closed == {key(FLOW), key(FLOW6)}


def test_a_snapshot_reads_back_once_and_only_for_the_table_it_was_written_for(tmp_path, monkeypatch):
    from mplb_nfq.kernel import snapshot

    monkeypatch.setattr(snapshot, "DIRECTORY", tmp_path)
    path, identity = snapshot.place("mplb", handle=7)
    assert path.parent == tmp_path and identity.endswith(" 7")
    watched = [(digest(key(FLOW)), 1), (digest(key(FLOW6)), 2)]
    assert snapshot.write_flows(path, identity, watched) == 2
    assert snapshot.write_tokens(path, identity, [(1, 0x101, 600.0), (2, 0x20000000, 0.5)]) == 2
    assert snapshot.read_flows(path, snapshot.place("mplb", handle=8)[1]) is None  # another table: discarded
    assert snapshot.read_flows(path, identity) is None  # (and gone)
    snapshot.write_flows(path, identity, watched)
    assert [list(a) for a in snapshot.read_flows(path, identity)] == [list(column) for column in zip(*watched)]
    assert [list(a) for a in snapshot.read_tokens(path, identity)] == [[1, 2], [0x101, 0x20000000], [600.0, 0.5]]
    assert snapshot.read_tokens(path, identity) is None  # read once
    lifetimes = Lifetimes()
    lifetimes.begin_reading()
    lifetimes.restore(*zip(*watched[:1]))  # during a reading: it may have passed FLOW already
    lifetimes.end_reading()
    assert lifetimes.take()[0] == []
    lifetimes.restore(*zip(*watched))
    assert reading(lifetimes, FLOW) == [2]  # one reading without FLOW6: it ended while no worker ran
    assert {t: f for f, t in lifetimes.teaching.items()} == at((1, FLOW))
    snapshot.write_flows(path, identity, watched)
    snapshot.discard("mplb")
    assert list(tmp_path.iterdir()) == []


def test_flow_tokens_behave_as_a_dict_through_collisions_wraparound_removals_and_growth():
    import random

    from mplb_nfq.core.flowtokens import FlowTokens, digest

    rng = random.Random(7)
    table, model = FlowTokens(16), {}
    # few home slots: long probe runs that wrap around the end, and removals inside them
    flows = [rng.randrange(1, 1 << 64) & ~0xFF | rng.choice((0x0E, 0x0F, 0x00)) for _ in range(200)]
    for step in range(5000):
        flow = rng.choice(flows)
        if rng.random() < 0.55:
            token = rng.randrange(1 << 32)
            table.put(flow, token)
            model[flow] = token
        else:
            assert table.pop(flow) == model.pop(flow, None)
        assert table.get(flow) == model.get(flow) and len(table) == len(model)
    assert dict(table.items()) == model
    table.unmark()
    kept = list(model)[:len(model) // 2]
    assert all(table.mark(flow) for flow in kept) and not table.mark(12345 << 8)
    table.pop(kept[0])  # a removal moves entries back: their marks move with them
    del model[kept[0]]
    assert sorted(table.unmarked()) == sorted((f, t) for f, t in model.items() if f not in kept)
    grown = {rng.randrange(1, 1 << 64): rng.randrange(1 << 32) for _ in range(4 * len(model))}
    for flow, token in grown.items():  # watches during a reading: the table grows, marks stay
        table.put(flow, token)
    model.update(grown)
    assert sorted(table.unmarked()) == sorted((f, t) for f, t in model.items() if f not in kept)
    assert digest(b"\x0a\x00\x00\x01") == digest(b"\x0a\x00\x00\x01") != digest(b"\x0a\x00\x00\x02")


def test_a_broken_pipe_to_the_follower_either_way_is_its_death_with_its_exit_code():
    import multiprocessing

    import pytest

    from mplb_nfq.kernel.conntrack import Follower, FollowerLost, Watch

    mine, theirs = multiprocessing.Pipe()
    process = multiprocessing.Process(target=exit, args=(3,))
    process.start()
    theirs.close()
    follower = Follower(process, mine)
    with pytest.raises(FollowerLost, match=r"exited \(code 3\)"):
        follower.recv()
    with pytest.raises(FollowerLost, match=r"exited \(code 3\)"):
        for _ in range(64):  # (a pipe buffers a few sends before it reports the reader gone)
            follower.send(Watch([(1, FLOW)] * 1000))
