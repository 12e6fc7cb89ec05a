"""Connect latency (SYN -> SYN-ACK -> connected) to an address, or the time to fetch a small
object (connect, ask for FETCH bytes, read them, close), as percentiles.

    python connect_latency.py HOST PORT COUNT RATE [THREADS [PROTOCOL [FETCH]]]
RATE: connections/s, 0 = as fast as possible; PROTOCOL: mptcp (the default) or tcp; FETCH: bytes
to fetch from mplb_nfq.lab.transfer's server (0, the default: connect only).
Prints one JSON line: count, rate reached, p50 and p99, and every time, in microseconds."""
import json
import socket
import statistics
import sys
import threading
import time

host, port, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 1
protocol = socket.IPPROTO_TCP if len(sys.argv) > 6 and sys.argv[6] == "tcp" else socket.IPPROTO_MPTCP
fetch = int(sys.argv[7]) if len(sys.argv) > 7 else 0
samples: list[float] = []
lock = threading.Lock()


def run(n: int) -> None:
    interval = threads / rate if rate else 0.0
    next_at = time.perf_counter()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, protocol)
        if not fetch:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
        started = time.perf_counter()
        s.connect((host, port))
        if fetch:
            s.sendall(fetch.to_bytes(8, "big"))
            left = fetch
            while left > 0:
                left -= len(s.recv(left)) or left
        elapsed = time.perf_counter() - started
        s.close()
        with lock:
            samples.append(elapsed)
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))


started = time.perf_counter()
workers = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
total = time.perf_counter() - started
cuts = statistics.quantiles(samples, n=100)
print(json.dumps({"count": len(samples), "rate": len(samples) / total, "p50_us": cuts[49] * 1e6,
                  "p99_us": cuts[98] * 1e6, "samples_us": [round(s * 1e6) for s in samples]}))
