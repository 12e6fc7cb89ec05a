"""The link's follower against a real Redis (Debian's redis-server, on loopback, started here):
what peers publish while its connection is down still reaches the worker once it is back."""
import multiprocessing
import shutil
import socket
import subprocess
import time

import pytest
import redis
from netlab import wait_for

from mplb_nfq.core.news import Batch, Keys, encode, heartbeat
from mplb_nfq.ops.link import Link, PeerNews
from mplb_nfq.core.settings import ClusterConfig

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="Debian's redis-server is needed")


@pytest.fixture
def redis_url(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: _answers(client), 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _answers(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def follow(cfg, news):
    """The link's follower, in a process of its own (the test stops it); what it sends the worker goes to `news`."""
    Link(cfg, 60, "0123456789ab", news.put).follow_forever()


def reading(client) -> bool:
    """The follower waits on the stream (XREAD)."""
    return any(c.get("cmd") == "xread" for c in client.client_list())


def test_an_end_published_while_the_follower_was_cut_off_still_reaches_the_worker(redis_url):
    cfg = ClusterConfig("t", "lb2", redis_url, password="")
    stream = Keys("t").of("lb1", "news")
    peer = redis.Redis.from_url(redis_url, decode_responses=True)
    peer.xadd(stream, encode(Batch("lb1", 1.0, tokens={0x0A0B0C0D: "b1"})))
    for kind in ("news", "following"):  # a peer's user may write its keys as any type: lb3 is left out, no more
        peer.set(Keys("t").of("lb3", kind), "not a stream, not a set")
    peer.set(Keys("t").of("lb3", "beat"), heartbeat("0123456789ab", 0, time.time()))
    link = Link(cfg, 60, "0123456789ab", lambda message: None)
    link.beat(peer)
    link.look(peer)
    assert list(link.peers) == ["lb3"] and not link.followed
    news = multiprocessing.get_context("fork").Queue()
    follower = multiprocessing.get_context("fork").Process(target=follow, args=(cfg, news), daemon=True)
    follower.start()
    try:
        seen = []

        def heard(condition) -> bool:
            while not news.empty():
                message = news.get()
                if isinstance(message, PeerNews):
                    seen.append(message.batch)
            return any(condition(batch) for batch in seen)

        wait_for(lambda: reading(peer), 10)  # caught up: what comes now comes through the stream
        assert peer.sismember(Keys("t").of("lb2", "following"), "lb1")  # lb1 may announce: lb2 hears it
        peer.xadd(stream, encode(Batch("lb1", 2.0, tokens={0x01020304: "b1"})))
        wait_for(lambda: heard(lambda b: 0x01020304 in b.tokens), 10)
        peer.client_kill_filter(_type="normal", skipme=True)  # the follower's connection drops
        peer.xadd(stream, encode(Batch("lb1", 3.0, ended=[0x01020304])))  # published before it is back
        wait_for(lambda: heard(lambda b: b.ended == [0x01020304]), 10)
    finally:
        follower.terminate()
        follower.join(10)
