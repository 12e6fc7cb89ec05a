"""The worker's packet handling and its metrics, with a stand-in for NetfilterQueue's packet (the
kernel side is tested in the kernel tests)."""
import socket
import time

import pytest
from fakes import KernelMaps
from mplb_nfq.lab.packets import ACK, CLIENT_KEY, COLLIDING, SERVER_KEY, SYN, dss, mp_capable, mp_join_syn, tcp
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from mplb_nfq.core.marks import DISPLACEABLE, JOIN, LEARNED, PROVISIONAL, REJECT
from mplb_nfq.core.packet import token_of_key
from mplb_nfq.core.tokens import AMBIGUOUS, PROVISIONAL_SECONDS
from mplb_nfq.kernel.queue import VERDICT_BATCH, QueueReader
from mplb_nfq.ops.config import from_dict
from mplb_nfq.ops.logs import ERROR_LOG_SECONDS
from mplb_nfq.ops.metrics import WorkerCollector
from mplb_nfq.ops.holding import RECHECK_SECONDS
from mplb_nfq.ops.status import render_status
from mplb_nfq.worker import Worker

CONFIG = {"services": [{"name": "web", "vip": "10.0.100.1", "ports": [80]}],
          "backends": [{"name": "b1", "address": "10.0.9.11"}, {"name": "b2", "address": "10.0.9.12"}]}


class Packet:
    """What the worker uses of netfilterqueue.Packet."""

    def __init__(self, payload: bytes, mark: int = 0):
        self.payload, self.mark, self.verdict = payload, mark, None

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, mark):
        self.mark = mark

    def accept(self):
        self.verdict = "accept"

    def drop(self):
        self.verdict = "drop"

    def retain(self):
        pass


def worker(**kernel) -> Worker:
    cfg = from_dict({**CONFIG, "kernel": kernel})
    return Worker(cfg, KernelMaps())


def test_verdicts_marks_and_tokens_in_the_kernel_map_before_the_verdict():
    w = worker()
    syn = Packet(tcp("10.0.1.2", "10.0.100.1", 40000, 80, SYN, mp_capable()))
    w.handle(syn)
    assert syn.verdict is None  # decided, its verdict waits for the batch's
    synack = Packet(tcp("10.0.100.1", "10.0.1.2", 80, 40000, SYN | ACK, mp_capable(1, 1, SERVER_KEY)), 0x100)
    w.handle(synack)
    assert w.dataplane.tokens == {}
    token = token_of_key(SERVER_KEY, 1)
    synack.accept = lambda: verdicts.append(dict(w.dataplane.tokens))
    verdicts = []
    w.give_decided()
    assert verdicts == [{token: 0x100 | JOIN}]  # the token was in the map when the SYN-ACK left
    assert (syn.verdict, syn.mark) == ("accept", 0x100) and synack.mark == 0x100 | LEARNED and not w.decided
    assert w.stats["tokens_installed"] == 1
    garbage = Packet(b"\x45\x00")
    w.handle(garbage)
    w.give_decided()
    assert garbage.verdict == "drop" and w.balancer.counts["malformed"] == 1  # a broken header: as Linux would
    assert w.dataplane.calls == [("add", [(token, 0x100 | JOIN)])]  # a batch without tokens writes nothing


def synack(port: int, key: bytes, mark: int) -> Packet:
    return Packet(tcp("10.0.100.1", "10.0.1.2", 80, port, SYN | ACK, mp_capable(1, 1, key)), mark)


def test_a_collision_in_one_batch_makes_the_kernel_map_reset_its_joins():
    w = worker()
    colliding = (bytes.fromhex("000000000000c66f"), bytes.fromhex("000000000000e658"))  # one SHA-256 token
    token = token_of_key(colliding[0], 1)
    w.handle(synack(40001, colliding[0], 0x100))
    w.handle(synack(40002, colliding[1], 0x101))
    w.give_decided()
    assert w.dataplane.calls == [("replace", [(token, REJECT)])]  # the last word per token wins: nothing installed
    assert w.dataplane.tokens == {token: REJECT} and w.stats["tokens_rejected"] == 1


def test_a_token_another_worker_holds_on_another_backend_is_a_collision_for_both():
    w = worker()
    other = token_of_key(bytes(8), 1)
    w.dataplane.tokens[other] = 0x101 | JOIN  # another worker's connection
    w.handle(synack(40001, SERVER_KEY, 0x100))
    w.handle(synack(40002, bytes(8), 0x100))
    w.give_decided()
    assert w.dataplane.tokens == {token_of_key(SERVER_KEY, 1): 0x100 | JOIN, other: REJECT}  # the other still in
    assert w.balancer.tokens.get(other, 0) == AMBIGUOUS and w.balancer.counts["token_collision"] == 1
    assert w.stats["tokens_installed"] == 1 and w.stats["tokens_rejected"] == 1
    join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(other)))
    w.handle(join)
    w.give_decided()
    assert join.mark == REJECT  # were it queued, not sent to either backend


def test_a_failed_install_is_counted_logged_once_and_the_core_still_steers_the_join(caplog):
    w = worker()

    def fail(tokens, comments=None, timeout=None):
        raise OSError("netlink: no buffer space")

    w.dataplane.add_tokens = fail
    for port, key in ((40001, SERVER_KEY), (40002, bytes(8))):  # two batches, each failing
        w.handle(synack(port, key, 0x100))
        w.give_decided()
    assert w.stats["token_install_errors"] == 2
    assert [r.getMessage() for r in caplog.records] == ["token install failed (1 tokens): netlink: no buffer space"]
    w.errors.last["install"] = (time.monotonic() - ERROR_LOG_SECONDS, 1)  # the interval is over
    w.errors.error("install", "token install failed (3 tokens): netlink: no buffer space")
    assert caplog.records[-1].getMessage().endswith("(1 more like it in the last 10 s)")
    join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(token_of_key(SERVER_KEY, 1))))
    w.handle(join)
    w.give_decided()
    assert join.mark == 0x100 | JOIN


def test_queue_reader_gives_a_lone_packet_its_verdict_at_once_and_a_burst_in_batches():
    kernel, queue_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    w = worker()
    batches = []

    def give_decided():
        if w.decided:
            batches.append(len(w.decided))
            w.decided.clear()

    reader = QueueReader(queue_end.fileno(), 1000, w.decided, give_decided)

    def read(packets: int) -> None:
        for _ in range(packets):
            kernel.send(b"packet")
        for _ in range(packets):
            assert reader.recv(100) == b"packet"
            w.decided.append((None, None))  # as the callback does
        with pytest.raises(BlockingIOError):
            reader.recv(100)  # the queue is empty: what was decided since goes out

    read(1)
    assert batches == [1]
    batches.clear()
    read(1 + VERDICT_BATCH + 3)
    assert batches == [1, VERDICT_BATCH, 3]  # the burst's first at once, then full batches, then the rest
    for sock in (kernel, queue_end, reader.sock):
        sock.close()


def test_with_several_workers_an_unknown_join_is_held_dropped_once_then_sent_again_meets_the_policy():
    w = worker(workers=2, hold_ms=0)
    join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(0x12345678)))
    w.handle(join)
    assert join.verdict is None and len(w.held) == 1  # no verdict yet: the token may still come
    w.held.release()  # the kernel map does not have it, and hold_ms is over
    assert join.verdict == "drop" and w.stats["held_dropped_once"] == 1 and not w.held
    again = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(0x12345678)))  # the client's retransmission
    w.handle(again)
    assert again.verdict is None and len(w.held) == 1
    w.held.release()
    assert again.verdict == "accept" and again.mark & JOIN and w.stats["held_expired"] == 1 and not w.held
    assert "joins that raced their token: found 0, dropped once 1, given up 1 (held twice) + 0 (pushed out)" in \
        render_status(w.plane.status())


def test_joins_with_made_up_tokens_beyond_the_budget_never_cost_a_raced_join_its_backend():
    w = worker(hold_max=64)
    flood = [Packet(tcp(f"198.18.0.{i % 250}", "10.0.100.1", 50000 + i, 80, SYN, mp_join_syn(0x10000 + i)))
             for i in range(550)]
    for packet in flood[:500]:
        w.handle(packet)
    raced = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(token_of_key(SERVER_KEY, 1))))
    w.handle(raced)
    for packet in flood[500:]:  # fewer than the budget came after it
        w.handle(packet)
    assert raced.verdict is None and len(w.held) == 64 and w.stats["held_pushed_out"] == 551 - 64
    assert all(p.verdict == "accept" for p in flood[:487]) and flood[487].verdict is None  # oldest first
    synack_copy = synack(40001, SERVER_KEY, 0x100)
    w.tokens.learn(Copies((synack_copy.payload, 0x100)), 256)  # its connection's SYN-ACK, copied
    w.held.release()
    assert raced.verdict == "accept" and raced.mark == 0x100 | JOIN and w.stats["held_found"] == 1


def test_metrics_expose_every_family_with_bounded_labels():
    w = worker()
    w.handle(Packet(tcp("10.0.1.2", "10.0.100.1", 40000, 80, SYN, mp_capable())))
    w.give_decided()
    registry = CollectorRegistry()
    ruleset = {"join_kernel_hit": 7, "queued_syn": 5, "queued_synack": 4, "queued_capable": 0}  # no host nftables
    registry.register(WorkerCollector(w.plane, lambda: ruleset))
    text = generate_latest(registry).decode()
    for name in ("mplb_queued_packets_total{kind=\"mp_capable_syn\"} 1.0",
                 "mplb_verdicts_total{verdict=\"accept\"} 1.0",
                 "mplb_join_lookups_total", "mplb_tokens_tracked", "mplb_backend_connections{backend=\"b1\"",
                 "mplb_join_lookups_total{path=\"kernel\",result=\"hit\"} 7.0",
                 "mplb_nft_queued_packets_total{rule=\"syn\"} 5.0",
                 "mplb_backend_up", "mplb_nfqueue_dropped_packets_total", "mplb_table_evictions_total",
                 "mplb_packet_processing_seconds_bucket", "mplb_worker_errors_total"):
        assert name in text, name
    assert "10.0.1.2" not in text  # no client address in any label


def test_a_token_whose_install_failed_leaves_its_connection_unsettled_then_installs_on_the_next_packet():
    w = worker()

    def full(tokens, comments=None, timeout=None):
        raise OSError("nfnetlink: the map is full")

    install = w.dataplane.add_tokens
    w.dataplane.add_tokens = full
    w.handle(synack(40001, SERVER_KEY, 0x100))
    first = w.decided[0][0]
    w.give_decided()
    assert first.mark == 0x100  # no learned bit: the third ACK still comes to the worker
    w.dataplane.add_tokens = install
    third = Packet(tcp("10.0.1.2", "10.0.100.1", 40001, 80, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY)), 0x100)
    w.handle(third)
    w.give_decided()
    assert third.mark == 0x100 | LEARNED and w.dataplane.tokens == {token_of_key(SERVER_KEY, 1): 0x100 | JOIN}
    assert w.dataplane.comments == {token_of_key(SERVER_KEY, 1): "10.0.1.2:40001>10.0.100.1:80"}


def test_a_client_s_claim_on_a_token_another_worker_holds_yields_and_a_server_s_replaces_a_client_s():
    w = worker()
    key_a, key_b = COLLIDING[1]
    token = token_of_key(key_a, 1)
    w.dataplane.tokens[token] = 0x101 | JOIN  # another worker's connection, a server's word
    w.handle(Packet(tcp("10.0.1.2", "10.0.100.1", 40001, 80, ACK, mp_capable(1, 1, CLIENT_KEY, key_b)), 0x100))
    w.give_decided()
    assert w.dataplane.tokens == {token: 0x101 | JOIN} and w.stats["tokens_refused"] == 1
    assert w.balancer.tokens.get(token, 0) is None  # not ours: the map's word stands
    w.dataplane.tokens[token] = 0x101 | JOIN | DISPLACEABLE  # now a client's word
    w.handle(synack(40002, key_b, 0x100))
    w.give_decided()
    assert w.dataplane.tokens == {token: 0x100 | JOIN}  # the server's replaced it


class Copies:
    """What the worker uses of kernel.copies.CopyReader: (packet, its mark) as nflog copied them."""

    def __init__(self, *copies):
        self.copies, self.lost = list(copies), 0

    def read(self, limit):
        taken, self.copies = self.copies[:limit], self.copies[limit:]
        return taken


def test_a_client_taught_token_is_provisional_until_its_connection_s_next_packet_proves_it():
    w = worker()
    token, flow = token_of_key(SERVER_KEY, 1), (bytes([10, 0, 1, 2]), 40001, bytes([10, 0, 100, 1]), 80)
    third = tcp("10.0.1.2", "10.0.100.1", 40001, 80, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY))
    w.tokens.learn(Copies((third, 0x100)), 256)  # direct server return: the kernel copied the third ACK
    assert w.dataplane.tokens == {token: 0x100 | JOIN | DISPLACEABLE}
    assert w.dataplane.timeouts[token] == PROVISIONAL_SECONDS and w.tokens.lifetimes == []  # not watched yet
    proof = tcp("10.0.1.2", "10.0.100.1", 40001, 80, ACK, dss())
    w.tokens.learn(Copies((proof, 0x100 | LEARNED | PROVISIONAL)), 256)
    assert w.dataplane.calls[-1] == ("renew", [(token, 0x100 | JOIN | DISPLACEABLE)])
    assert w.dataplane.timeouts[token] == KernelMaps.TIMEOUT and w.stats["tokens_proven"] == 1
    assert w.tokens.lifetimes == [(token, flow)]
    restarted = Worker(w.plane.cfg, w.dataplane)  # a proven token is adopted as one
    assert restarted.tokens.adopt() == 1 and restarted.balancer.tokens.get(token, 0) is not None


def test_a_token_taught_and_proven_in_one_batch_is_added_never_written_over_another_s():
    w = worker()
    token = token_of_key(SERVER_KEY, 1)
    w.dataplane.tokens[token] = REJECT  # two other connections collide on it
    third = tcp("10.0.1.2", "10.0.100.1", 40001, 80, ACK, mp_capable(1, 1, CLIENT_KEY, SERVER_KEY))
    proof = tcp("10.0.1.2", "10.0.100.1", 40001, 80, ACK, dss())
    w.tokens.learn(Copies((third, 0x100), (proof, 0x100 | LEARNED | PROVISIONAL)), 256)
    assert [c[0] for c in w.dataplane.calls] == ["add"] and w.dataplane.tokens == {token: REJECT}
    assert w.stats["tokens_refused"] == 1


def test_with_several_workers_a_held_join_goes_where_the_kernel_map_says_and_a_provisional_token_is_not_kept():
    w = worker(workers=2, hold_ms=10_000)
    token = 0x5EED0001
    join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(token)))
    w.handle(join)
    w.dataplane.tokens[token] = 0x101 | JOIN | DISPLACEABLE  # the first worker's, from a third ACK
    w.dataplane.timeouts[token] = 25.0
    time.sleep(RECHECK_SECONDS * 1.5)  # its first recheck is due
    w.held.release()
    assert join.verdict == "accept" and join.mark == 0x101 | JOIN and w.stats["held_found"] == 1
    assert w.balancer.known_token(token, time.perf_counter()) is None  # provisional there: the map decides


def test_spoofed_third_acks_push_out_each_other_from_the_map_and_a_restart_keeps_them_provisional():
    w = Worker(from_dict({**CONFIG, "limits": {"token_capacity": 8}}), KernelMaps())  # 2 provisional
    spoofed = [(tcp(f"198.18.0.{i}", "10.0.100.1", 40000, 80, ACK, mp_capable(1, 1, bytes(8), bytes([i]) * 8)), 0x100)
               for i in range(1, 6)]
    for copy in spoofed:
        w.tokens.learn(Copies(copy), 256)
    assert len(w.dataplane.tokens) == 2 and w.stats["tokens_pushed_out"] == 3
    assert [c[0] for c in w.dataplane.calls].count("delete") == 3
    in_one_batch = Worker(from_dict({**CONFIG, "limits": {"token_capacity": 8}}), KernelMaps())
    in_one_batch.tokens.learn(Copies(*spoofed), 256)
    assert len(in_one_batch.dataplane.tokens) == 2 and in_one_batch.stats["tokens_pushed_out"] == 3
    assert [c[0] for c in in_one_batch.dataplane.calls] == ["add"]  # those pushed out never went in
    restarted = Worker(w.plane.cfg, w.dataplane)
    for token in w.dataplane.tokens:
        w.dataplane.timeouts[token] = 12.0
    assert restarted.tokens.adopt() == 2 and len(restarted.balancer.provisional) == 2
    assert len(restarted.balancer.tokens) == 0 and restarted.tokens.lifetimes == []


def test_tokens_of_closed_connections_leave_the_map_and_the_core_and_a_restart_reads_them_back():
    w = worker()
    w.handle(synack(40001, SERVER_KEY, 0x100))
    w.give_decided()
    token = token_of_key(SERVER_KEY, 1)
    flow = (bytes([10, 0, 1, 2]), 40001, bytes([10, 0, 100, 1]), 80)
    assert w.tokens.lifetimes == [(token, flow)]  # for the conntrack reader to watch
    restarted = Worker(w.plane.cfg, w.dataplane)
    assert restarted.tokens.adopt() == 1 and restarted.tokens.lifetimes == [(token, flow)]
    restarted.tokens.ended([token])
    assert w.dataplane.tokens == {} and restarted.balancer.tokens.get(token, 0) is None
    assert restarted.stats["tokens_removed"] == 1


def config_file(tmp_path, **changes):
    backends = "\n".join(f'[[backends]]\nname = "{b["name"]}"\naddress = "{b["address"]}"' for b in CONFIG["backends"])
    limits = "".join(f"{k} = {v}\n" for k, v in changes.items())
    path = tmp_path / "c.toml"
    path.write_text(f'[[services]]\nname = "web"\nvip = "10.0.100.1"\nports = [80]\n{backends}\n[limits]\n{limits}')
    return str(path)


def test_a_reload_the_kernel_refuses_leaves_kernel_and_core_as_they_were(tmp_path):
    from mplb_nfq.ops.config import load

    w = Worker(load(config_file(tmp_path)), KernelMaps())
    applied = []

    def apply(cfg, retired):
        applied.append(len(cfg.backends))
        if len(applied) == 1:
            raise OSError("netlink: the kernel said no")

    w.dataplane.apply = apply
    path = tmp_path / "c.toml"
    path.write_text(path.read_text().replace('[[backends]]\nname = "b2"\naddress = "10.0.9.12"', ""))
    answer = w.plane.reload(str(path))
    assert answer["ok"] is False and "the running config stays" in answer["error"]
    assert applied == [1, 2]  # the new config, refused; then the running one, put back
    assert [b.name for b in w.plane.balancer.services[0].backends] == ["b1", "b2"] and not w.plane.retired


def test_a_reload_that_changes_limits_is_refused_naming_them(tmp_path):
    from mplb_nfq.ops.config import load

    w = Worker(load(config_file(tmp_path)), KernelMaps())
    answer = w.plane.reload(config_file(tmp_path, token_capacity=10))
    assert answer["ok"] is False and "token_capacity" in answer["error"] and "restart" in answer["error"]


def test_the_loop_writes_the_scheduler_tables_after_a_change_of_the_backends_not_on_every_turn(tmp_path):
    from mplb_nfq.ops.config import load

    w = Worker(load(config_file(tmp_path)), KernelMaps())
    written, failing = [], []

    def sync_tables(tables):
        if failing:
            raise OSError("the kernel said no")
        written.append({b for b in tables["web"].slots})

    w.dataplane.sync_tables = sync_tables
    marks = {b.name: b.mark for b in w.balancer.backends}
    turns = lambda: [w.plane.sync_unavailable() for _ in range(3)]  # noqa: E731
    turns()
    assert written == [set(marks.values())]
    w.plane.set_health("b1", False, "connection refused")  # from the health thread
    turns()
    assert written[1:] == [{marks["b2"]}]
    failing.append(True)
    w.plane.drain("b2", True)
    turns()
    failing.clear()
    turns()  # the failed write is tried again, once it goes through no more
    assert len(written) == 3 and written[-1] == {REJECT}  # (no backend takes new connections)
    w.plane.set_health("b1", True, None)
    w.plane.drain("b2", False)
    turns()
    w.dataplane.apply = lambda cfg, retired: None
    assert w.plane.reload()["ok"]  # the same backends, a new config: its tables are written for it
    turns()
    assert written[3:] == [set(marks.values())] * 2


def test_the_loop_gathers_what_follows_the_input_that_woke_it_and_a_command_or_a_timed_turn_goes_at_once():
    import os

    from mplb_nfq.ops.loop import Loop

    loop, (reader, writer), (command, to_command) = Loop(), os.pipe(), os.pipe()
    read, gathered, chores = [], [], []
    loop.watch(reader, lambda: read.append(os.read(reader, 100)))
    loop.watch(command, lambda: read.append(os.read(command, 100)), at_once=True)
    loop.every_turn(lambda: chores.append(len(read)))

    def gather():  # what arrives while the turn gathers
        gathered.append(os.write(writer, b"b"))
        return 0.001

    try:
        loop.run(lambda: len(chores) < 1, lambda: 1, gather)  # no input: a turn for time, no gathering
        assert chores == [0] and gathered == []
        os.write(writer, b"a")
        loop.run(lambda: len(chores) < 2, lambda: 1000, gather)
        assert read == [b"ab"] and chores == [0, 1] and gathered == [1]  # one turn took both
        os.write(to_command, b"c")
        loop.run(lambda: len(chores) < 3, lambda: 1000, gather)
        assert read == [b"ab", b"c"] and gathered == [1]  # a command: at once
        os.write(writer, b"d")
        slept = time.monotonic()
        loop.run(lambda: len(chores) < 4, lambda: 1, lambda: 60.0)  # a held join due in 1 ms
        assert read[-1] == b"d" and time.monotonic() - slept < 30  # gathered until then, not 60 s
    finally:
        for fd in (reader, writer, command, to_command):
            os.close(fd)


def test_the_worker_gathers_its_turns_while_no_syn_needs_it_and_a_reload_is_looked_at():
    from mplb_nfq.worker import GATHER_SECONDS

    assert worker().gather_seconds() == GATHER_SECONDS  # copies and raced joins only
    assert worker(handshakes="queue").gather_seconds() == 0  # SYNs and SYN-ACKs wait in the queue
    least = Worker(from_dict({**CONFIG, "services": [{**CONFIG["services"][0], "scheduler": "lc"}]}), KernelMaps())
    assert least.gather_seconds() == 0  # the worker picks each SYN's backend
    w = worker()
    w.balancer.update(least.balancer.services, [])
    assert w.gather_seconds() == 0


def test_a_worker_whose_turn_stopped_at_its_batch_takes_the_next_at_once():
    from mplb_nfq.worker import BATCH, GATHER_SECONDS

    w = worker()
    burst = Copies(*[(synack(20000 + i, i.to_bytes(8, "big"), 0x100).payload, 0x100) for i in range(BATCH + 1)])
    w.learn(burst)
    assert w.gather_seconds() == 0  # one copy left: the next turn at once
    w.learn(burst)
    assert w.gather_seconds() == GATHER_SECONDS and len(w.dataplane.tokens) == BATCH + 1


def test_maglev_tables_are_built_off_the_packet_path():
    from mplb_nfq.core.schedulers import Maglev

    cfg = from_dict({**CONFIG, "services": [{**CONFIG["services"][0], "scheduler": "maglev"}]})
    w = Worker(cfg, KernelMaps())
    w.plane.sync_unavailable()  # what the loop does after any change of the backends' state
    picker = w.balancer.services[0].picker
    assert isinstance(picker, Maglev) and picker._built_for is not None
    picker._build = lambda candidates: pytest.fail("a SYN waited for the table")
    w.handle(Packet(tcp("10.0.1.2", "10.0.100.1", 40000, 80, SYN, mp_capable())))
    assert w.decided[0][1].kind == "mp_capable_syn"


def test_a_histogram_counts_by_bucket_adds_up_across_workers_and_reads_as_prometheus_buckets():
    from mplb_nfq.ops.counters import Histogram

    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 3.0):
        histogram.observe(value)
    assert histogram.counts == [2, 1, 1] and histogram.sum == 6.0
    assert histogram.plus(histogram).cumulative() == [("1.0", 4), ("2.0", 6), ("+Inf", 8)]


class Follower:
    """The worker's end of the pipe to the conntrack follower, answering a Save as it does."""

    def __init__(self, ended=()):
        from mplb_nfq.kernel.conntrack import Ended
        self.sent, self.answers = [], [Ended(list(ended))] if ended else []

    def send(self, message):
        from mplb_nfq.kernel.conntrack import Save, Saved
        self.sent.append(message)
        if isinstance(message, Save):
            self.answers.append(Saved(len(self.sent)))

    def poll(self, timeout):
        return bool(self.answers)

    def recv(self):
        return self.answers.pop(0)


def test_a_graceful_stop_saves_every_token_with_what_is_not_watched_yet_and_a_restart_reads_them_back(tmp_path):
    from mplb_nfq.kernel import snapshot
    from mplb_nfq.kernel.conntrack import Save, Watch

    w = worker()
    tokens = []
    for i, key in enumerate((SERVER_KEY, CLIENT_KEY)):
        synack = tcp("10.0.100.1", "10.0.1.2", 80, 40000 + i, SYN | ACK, mp_capable(1, 1, key))
        w.tokens.learn(Copies((synack, 0x100 + i)), 256)
        tokens.append(token_of_key(key, 1))
    assert len(w.tokens.lifetimes) == 2  # learned, not sent to the follower yet
    place = (tmp_path / "mplb", "identity")
    follower = Follower(ended=[tokens[1]])  # one connection ends as the worker stops
    assert w.tokens.save(place, follower) == 1
    assert [type(m) for m in follower.sent] == [Watch, Save] and len(follower.sent[0].tokens) == 2
    assert tokens[1] not in w.dataplane.tokens  # its end, applied before the tokens were written
    restarted = Worker(w.plane.cfg, KernelMaps())
    assert restarted.tokens.restore(snapshot.read_tokens(*place)) == 1
    assert restarted.balancer.tokens.get(tokens[0], time.perf_counter()) == 0x100


def test_a_stop_whose_follower_is_gone_saves_nothing_and_stops(tmp_path):
    from mplb_nfq.kernel.conntrack import FollowerLost

    class Gone:
        def send(self, message):
            raise FollowerLost(-9)

    w = worker()
    assert w.tokens.save((tmp_path / "mplb", "identity"), Gone()) == 0 and list(tmp_path.iterdir()) == []
