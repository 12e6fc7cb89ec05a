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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_link_finds_and_reaches_the_primary_through_sentinels_over_tls(tmp_path):
    """sentinels://: the link asks a sentinel over TLS where the primary is, then talks to the
    primary over TLS, each server's certificate checked against a CA of the test's own (with its
    address as the name); a client that does not speak TLS gets nothing from either."""
    from mplb_nfq.lab.ecmp import make_certificates
    from mplb_nfq.ops.link import connect

    ca, cert, key = make_certificates(tmp_path, "127.0.0.1")
    tls = [f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
    primary_port, sentinel_port = free_port(), free_port()
    primary_conf, sentinel_conf = tmp_path / "primary.conf", tmp_path / "sentinel.conf"
    primary_conf.write_text("\n".join(["bind 127.0.0.1", "port 0", f"tls-port {primary_port}", *tls, 'save ""',
                                       "appendonly no", f"dir {tmp_path}"]) + "\n")
    sentinel_conf.write_text("\n".join(["bind 127.0.0.1", "port 0", f"tls-port {sentinel_port}", *tls,
                                        "tls-replication yes",  # the sentinel speaks TLS to the primary
                                        f"sentinel monitor mplb 127.0.0.1 {primary_port} 1", f"dir {tmp_path}"]) + "\n")
    servers = [subprocess.Popen(["redis-server", str(primary_conf)], stdout=subprocess.DEVNULL),
               subprocess.Popen(["redis-server", str(sentinel_conf), "--sentinel"], stdout=subprocess.DEVNULL)]
    try:
        asking = redis.Redis("127.0.0.1", sentinel_port, ssl=True, ssl_ca_certs=str(ca), decode_responses=True)
        wait_for(lambda: _names_a_primary(asking), 10)
        cfg = ClusterConfig("t", "lb1", f"sentinels://127.0.0.1:{sentinel_port}/mplb/0", password="",
                            tls_ca=str(ca))
        client = connect(cfg)
        client.set(Keys("t").of("lb1", "beat"), heartbeat("0123456789ab", 0, time.time()))
        assert client.connection_pool.connection_kwargs["ssl_check_hostname"] is True
        assert redis.Redis("127.0.0.1", primary_port, ssl=True, ssl_ca_certs=str(ca), decode_responses=True).get(
            Keys("t").of("lb1", "beat")).startswith('{"fingerprint"')
        for port in (primary_port, sentinel_port):  # a clear-text PING gets no PONG
            with socket.create_connection(("127.0.0.1", port), timeout=2) as plain:
                plain.sendall(b"PING\r\n")
                try:
                    answer = plain.recv(64)
                except ConnectionResetError:  # what this Redis does
                    answer = b""
                assert b"PONG" not in answer
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)


def _names_a_primary(asking) -> bool:
    try:
        return asking.sentinel_get_master_addr_by_name("mplb") is not None
    except redis.ConnectionError:
        return False
