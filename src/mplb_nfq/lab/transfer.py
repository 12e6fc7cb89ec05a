"""A minimal MPTCP download server and client for the lab and the kernel tests.

The client sends the number of bytes it wants (8 bytes, big-endian); the server sends that many
bytes and closes. `fetch` prints one JSON line per download.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

CHUNK = bytes(range(256)) * 256  # byte i of every download is i % 256: a checker knows what must arrive
RECEIVE = 1 << 20
PATTERN = CHUNK * (RECEIVE // len(CHUNK) + 1)  # any received piece, wherever it starts, is a slice of it


def expected(size: int) -> bytes:
    """What a download of size bytes carries."""
    return (CHUNK * (size // len(CHUNK) + 1))[:size]


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(4096)  # a burst of connects (bench/speed.py) must not find the queue full
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_send, args=(conn,), daemon=True).start()


def _send(conn: socket.socket) -> None:
    with conn:
        try:
            request = b""
            while len(request) < 8:
                part = conn.recv(8 - len(request))
                if not part:
                    return
                request += part
            size, offset = int.from_bytes(request, "big"), 0
            view = memoryview(CHUNK)
            while offset < size:
                start = offset % len(CHUNK)
                offset += conn.send(view[start:start + min(size - offset, len(CHUNK) - start)])
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # wait for the client's close, so that no data is cut by a reset
        except OSError:
            pass


def fetch(host: str, port: int, size: int, timeout: float = 120.0, mapped: bool = False) -> dict:
    """Download size bytes. An IPv6 host, or mapped=True (an IPv4 host as ::ffff:a.b.c.d), uses an
    AF_INET6 socket: with IPV6_V6ONLY off, one MPTCP connection can then hold subflows of both
    families (dual stack)."""
    started = time.monotonic()
    six = mapped or ":" in host
    with socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP) as s:
        if six:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.settimeout(timeout)
        s.connect((f"::ffff:{host}" if mapped else host, port))
        s.sendall(size.to_bytes(8, "big"))
        received, intact = 0, True
        while True:
            data = s.recv(RECEIVE)
            if not data:
                break
            start = received % len(CHUNK)
            intact = intact and data == PATTERN[start:start + len(data)]
            received += len(data)
    seconds = time.monotonic() - started
    return {"size": size, "received": received, "intact": intact, "seconds": seconds,
            "mbit_s": received * 8 / seconds / 1e6 if seconds else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mplb_nfq.lab.transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=8080)
    f = sub.add_parser("fetch")
    f.add_argument("host")
    f.add_argument("--port", type=int, default=8080)
    f.add_argument("--size", type=int, action="append", required=True, help="bytes; repeat for more")
    f.add_argument("--pause", type=float, default=0.0, help="seconds between downloads")
    f.add_argument("--mapped", action="store_true", help="IPv4 host through an AF_INET6 socket (dual stack)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
        return 0
    for size in args.size:
        try:
            result = fetch(args.host, args.port, size, mapped=args.mapped)
        except OSError as e:
            result = {"size": size, "error": str(e)}
        print(json.dumps(result), flush=True)
        time.sleep(args.pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
