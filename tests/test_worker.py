"""The worker's packet handling and its metrics, with a stand-in for NetfilterQueue's packet (the
kernel side is tested in the kernel tests)."""
import socket
from types import SimpleNamespace

import pytest
from packets import ACK, SERVER_KEY, SYN, mp_capable, mp_join_syn, tcp
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from mplb_nfq.balancer import JOIN, LEARNED
from mplb_nfq.config import from_dict
from mplb_nfq.metrics import WorkerCollector
from mplb_nfq.packet import token_of_key
from mplb_nfq.worker import VERDICT_BATCH, QueueReader, TokenWriter, Worker

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
    return Worker(cfg, SimpleNamespace(queue_mode="test", lookup_token=lambda token: None))


def test_verdicts_marks_and_pending_tokens():
    w = worker()
    syn = Packet(tcp("10.0.1.2", "10.0.100.1", 40000, 80, SYN, mp_capable()))
    w.handle(syn)
    assert syn.verdict is None and w.token_writer.take() == []  # decided, its verdict waits for the batch's
    synack = Packet(tcp("10.0.100.1", "10.0.1.2", 80, 40000, SYN | ACK, mp_capable(1, 1, SERVER_KEY)), 0x100)
    w.handle(synack)
    assert w.token_writer.take() == []  # a token goes to the kernel map after its packet's verdict
    w.give_decided()
    assert (syn.verdict, syn.mark) == ("accept", 0x100) and (synack.verdict, synack.mark) == ("accept", 0x100 | LEARNED)
    assert w.token_writer.take() == [(token_of_key(SERVER_KEY, 1), 0x100 | JOIN)] and not w.decided
    garbage = Packet(b"\x45\x00")
    w.handle(garbage)
    w.give_decided()
    assert garbage.verdict == "accept" and w.balancer.counts["malformed"] == 1


def test_queue_reader_gives_a_lone_packet_its_verdict_at_once_and_a_burst_in_batches():
    kernel, queue_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    w = worker()
    batches = []

    def give_decided():
        if w.decided:
            batches.append(len(w.decided))
            w.decided.clear()

    w.give_decided = give_decided
    reader = QueueReader(queue_end.fileno(), 1000, w)

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


def test_with_several_workers_an_unknown_join_is_held_then_released_with_the_policy():
    w = worker(workers=2, hold_ms=0)
    join = Packet(tcp("10.0.2.2", "10.0.100.1", 50000, 80, SYN, mp_join_syn(0x12345678)))
    w.handle(join)
    assert join.verdict is None and len(w.held) == 1  # no verdict yet: the token may still come
    w.release_held()  # the kernel map does not have it, and hold_ms is over
    assert join.verdict == "accept" and join.mark & JOIN and w.stats["held_expired"] == 1 and not w.held


def test_metrics_expose_every_family_with_bounded_labels():
    w = worker()
    w.handle(Packet(tcp("10.0.1.2", "10.0.100.1", 40000, 80, SYN, mp_capable())))
    w.give_decided()
    registry = CollectorRegistry()
    registry.register(WorkerCollector(w))
    text = generate_latest(registry).decode()
    for name in ("mplb_queued_packets_total{kind=\"mp_capable_syn\"} 1.0",
                 "mplb_verdicts_total{verdict=\"accept\"} 1.0",
                 "mplb_join_lookups_total", "mplb_tokens_tracked", "mplb_backend_connections{backend=\"b1\"",
                 "mplb_backend_up", "mplb_nfqueue_dropped_packets_total", "mplb_table_evictions_total",
                 "mplb_packet_processing_seconds_bucket", "mplb_worker_errors_total"):
        assert name in text, name
    assert "10.0.1.2" not in text  # no client address in any label


def test_token_writer_batches_installs_and_lets_a_later_collision_win():
    calls = []
    dataplane = SimpleNamespace(add_tokens=lambda tokens, sock: calls.append(("add", tokens)),
                                remove_tokens=lambda tokens, nft: calls.append(("remove", tokens)) or len(tokens))
    writer = TokenWriter(dataplane)
    writer.write([(1, 0x101), (2, 0x102), (1, None)], nft=None, sock=None)
    assert calls == [("remove", [1]), ("add", [(2, 0x102)])]
    assert +writer.stats == {"tokens_forgotten": 1, "tokens_installed": 1}
