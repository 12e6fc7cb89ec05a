"""The control socket under hostile or slow clients: nothing a client sends stops or stalls the
loop that serves it (the worker's packet loop)."""
import json
import os
import select
import socket
import time

import pytest

from mplb_nfq.ops.control import CLIENT_SECONDS, ControlServer, request


class Loop:
    """The worker's poll loop, as far as the control socket uses it."""

    def __init__(self, path, handle=lambda r: {"ok": True, "echo": r["command"]}):
        self.handlers, self.poller = {}, select.poll()
        self.server = ControlServer(path, handle, self.watch, self.unwatch)
        self.watch(self.server.fileno(), self.server.accept_ready)

    def watch(self, fd, handler):
        self.handlers[fd] = handler
        self.poller.register(fd, select.POLLIN)

    def unwatch(self, fd):
        self.handlers.pop(fd, None)
        self.poller.unregister(fd)

    def turn(self, ms=50):
        started = time.monotonic()
        for fd, _ in self.poller.poll(ms):
            self.handlers.get(fd, lambda: None)()
        self.server.expire()
        return time.monotonic() - started


def ask(path, raw: bytes) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(raw)
    return client


def answer(loop, client, turns=20):
    client.settimeout(0.01)
    for _ in range(turns):
        loop.turn()
        try:
            return json.loads(client.recv(65536))
        except (TimeoutError, json.JSONDecodeError):
            continue
    raise AssertionError("no answer")


def test_deeply_nested_json_gets_an_error_and_the_loop_goes_on(tmp_path):
    path = str(tmp_path / "control.sock")
    loop = Loop(path)
    reply = answer(loop, ask(path, b"[" * 60_000 + b"\n"))
    assert reply["ok"] is False and "RecursionError" in reply["error"]
    assert answer(loop, ask(path, b'{"command": "status"}\n')) == {"ok": True, "echo": "status"}


def test_a_client_that_reads_no_answer_costs_the_loop_no_wait_and_gets_it_whole_later(tmp_path):
    path = str(tmp_path / "control.sock")
    big = {"ok": True, "backends": ["b" * 100] * 20_000}  # 2 MB, beyond a socket's default buffer
    loop = Loop(path, handle=lambda r: big)
    lazy = [ask(path, b'{"command": "status"}\n') for _ in range(3)]
    for _ in range(3):
        loop.turn()
    assert not loop.server.clients  # each answered and let go within the turn that read it
    for client in lazy:
        client.settimeout(5)
        received, part = b"", b"?"
        while part:
            part = client.recv(1 << 20)
            received += part
        assert json.loads(received) == big  # whole, though nobody read it while the loop ran


def test_a_silent_or_dripping_client_stalls_nothing_and_is_dropped(tmp_path):
    path = str(tmp_path / "control.sock")
    loop = Loop(path)
    silent = ask(path, b"")
    dripping = ask(path, b'{"comm')
    assert answer(loop, ask(path, b'{"command": "drain"}\n'))["echo"] == "drain"  # served meanwhile
    assert max(loop.turn() for _ in range(5)) < 0.2  # no turn waits on the slow ones
    time.sleep(CLIENT_SECONDS)
    loop.turn()
    for client in (silent, dripping):
        client.settimeout(1)
        assert client.recv(100) == b""  # dropped
    assert len(loop.server.clients) == 0


def test_an_oversized_request_is_refused(tmp_path):
    path = str(tmp_path / "control.sock")
    loop = Loop(path)
    client = ask(path, b"x" * 70_000)
    assert answer(loop, client)["error"] == "request too long"


def test_a_handler_that_raises_answers_an_error(tmp_path):
    path = str(tmp_path / "control.sock")

    def broken(request):
        raise StopIteration

    loop = Loop(path, broken)
    assert answer(loop, ask(path, b'{"command": "reload"}\n'))["error"].startswith("StopIteration")


def test_the_socket_path_must_be_a_socket_or_nothing(tmp_path):
    precious = tmp_path / "precious.conf"
    precious.write_text("keep me")
    with pytest.raises(RuntimeError, match="not a socket"):
        Loop(str(precious))
    assert precious.read_text() == "keep me"


def test_the_client_side_round_trip(tmp_path):
    path = str(tmp_path / "control.sock")
    loop = Loop(path)
    pid = os.fork()
    if pid == 0:  # the operator's command, from another process
        os._exit(0 if request(path, "status") == {"ok": True, "echo": "status"} else 1)
    for _ in range(100):
        loop.turn()
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
    raise AssertionError("the client got no answer")


def test_one_instance_per_table_and_namespace_and_no_other_user_can_take_its_place(tmp_path):
    """Any local user could bind the abstract socket name an instance once held, and so stop the
    balancer from starting; the lock lives in a directory only root may write."""
    from mplb_nfq.ops.instance import AlreadyRunning, hold_instance

    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    squatter.bind("\0mplb-nfq/mplb")  # where the instance used to be held
    directory = tmp_path / "run"
    def in_another_process(table):
        """What hold_instance says in a process of its own (the lock is a process's): its message, or "held"."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                hold_instance(table, str(directory)).close()
                os.write(write, b"held")
            except AlreadyRunning as e:
                os.write(write, str(e).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(write)
        with os.fdopen(read) as answer:
            return answer.read()

    with hold_instance("mplb", str(directory)):
        assert directory.stat().st_mode & 0o777 == 0o700
        assert "another mplb-nfq runs with table 'mplb'" in in_another_process("mplb")
        assert in_another_process("other") == "held"  # another table is another instance
    assert in_another_process("mplb") == "held"  # released with its holder
    squatter.close()
