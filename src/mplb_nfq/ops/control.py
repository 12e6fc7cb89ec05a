"""The control socket: one JSON request per connection, one JSON answer. Unix socket, mode 0600
(only root opens it), served by the worker's own loop."""
from __future__ import annotations

import json
import os
import socket
from typing import Callable

MAX_REQUEST = 65536


class ControlServer:
    def __init__(self, path: str, handle: Callable[[dict], dict]):
        self.path, self.handle = path, handle
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # left by a killed worker
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

    def serve_ready(self) -> None:
        """Answer every waiting client (called when the socket is readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    answer = self._answer(_read_line(conn))
                except OSError:
                    continue
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass

    def _answer(self, raw: bytes) -> dict:
        try:
            request = json.loads(raw)
            if not isinstance(request, dict) or "command" not in request:
                raise ValueError("a request is a JSON object with a command")
        except ValueError as e:
            return {"ok": False, "error": f"bad request: {e}"}
        try:
            return self.handle(request)
        except Exception as e:  # an operator's request must never take the worker down
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
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
