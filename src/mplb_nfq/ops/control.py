"""The control socket: one JSON request per connection, one JSON answer. Unix socket, mode 0600
(only root opens it), served by the worker's own loop without ever waiting on a client: each
connection is read as its bytes arrive, and dropped when it takes too long or sends too much."""
from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Callable

MAX_REQUEST = 65536
CLIENT_SECONDS = 2.0  # a request must arrive whole within this
MAX_CLIENTS = 32
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux's; root may pass net.core.wmem_max


class ControlServer:
    def __init__(self, path: str, handle: Callable[[dict], dict], watch: Callable[[int, Callable[[], None]], None],
                 unwatch: Callable[[int], None]):
        """watch(fd, callback) / unwatch(fd): the loop's poller, for the clients' sockets."""
        self.path, self.handle, self.watch, self.unwatch = path, handle, watch, unwatch
        self.clients: dict[int, tuple[socket.socket, bytearray, float]] = {}
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise RuntimeError(f"control socket {path}: a file that is not a socket is there; not touching it")
            os.unlink(path)  # a stopped worker's: this process holds the instance
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept_ready(self) -> None:
        """Take every waiting client (called when the listening socket is readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # none waiting, or no descriptor left: the next round tries again
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            fd = conn.fileno()
            self.clients[fd] = (conn, bytearray(), time.monotonic() + CLIENT_SECONDS)
            self.watch(fd, lambda fd=fd: self._read(fd))

    def expire(self) -> None:
        """Drop the clients whose request did not arrive in time."""
        now = time.monotonic()
        for fd in [fd for fd, (_, _, deadline) in self.clients.items() if deadline < now]:
            self._close(fd)

    def _read(self, fd: int) -> None:
        conn, data, _ = self.clients[fd]
        try:
            part = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(fd)
            return
        data += part
        if part and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            return
        answer = self._answer(bytes(data)) if len(data) < MAX_REQUEST else {"ok": False, "error": "request too long"}
        payload = json.dumps(answer).encode() + b"\n"
        try:  # handed to the kernel whole, never waited for: the client reads it when it will
            conn.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * len(payload) + 65536)
        except OSError:  # not allowed (no CAP_NET_ADMIN): an answer larger than the buffer is cut short
            pass
        try:
            conn.send(payload)
        except OSError:
            pass
        self._close(fd)

    def _close(self, fd: int) -> None:
        conn, _, _ = self.clients.pop(fd)
        self.unwatch(fd)
        conn.close()

    def _answer(self, raw: bytes) -> dict:
        try:
            request = json.loads(raw)
            if not isinstance(request, dict) or "command" not in request:
                raise ValueError("a request is a JSON object with a command")
        except Exception as e:  # RecursionError too: 60,000 "[" nest that deep
            return {"ok": False, "error": f"bad request: {type(e).__name__}: {str(e)[:200]}"}
        try:
            return self.handle(request)
        except Exception as e:  # an operator's request must never take the worker down
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        for fd in list(self.clients):
            self._close(fd)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        part = conn.recv(4096)
        if not part:
            break
        data += part
    return data


def request(socket_path: str, command: str, **args) -> dict:
    """Send one command to a running worker."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(socket_path)
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        return json.loads(_read_line(s))
