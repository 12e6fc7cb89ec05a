"""The soak's load: fetches from the lab client at a steady rate, each checked byte for byte.

    soak_client.py VIP PORT SECONDS RATE SOURCE[,SOURCE...] SIZE[,SIZE...] MPTCP_SHARE

Each fetch opens a connection (MPTCP, or plain TCP for a share of them) from the next source
address, asks for a size in turn and compares the SHA-256 of what arrives with the one known in
advance. Prints one JSON line per fetch: start, end (monotonic), protocol, source, size, bytes
received, whether they matched, and the error, if any."""
import hashlib
import json
import socket
import sys
import threading
import time

from mplb_nfq.lab.transfer import expected

vip, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
sources, sizes, mptcp_share = sys.argv[5].split(","), [int(s) for s in sys.argv[6].split(",")], float(sys.argv[7])
digests = {size: hashlib.sha256(expected(size)).hexdigest() for size in sizes}
lock = threading.Lock()


def fetch(number: int) -> None:
    protocol = socket.IPPROTO_MPTCP if number % 10 < round(mptcp_share * 10) else socket.IPPROTO_TCP
    source, size = sources[number % len(sources)], sizes[number % len(sizes)]
    started, received, digest, error = time.monotonic(), 0, hashlib.sha256(), None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, protocol) as s:
            s.settimeout(30)
            s.bind((source, 0))
            s.connect((vip, port))
            s.sendall(size.to_bytes(8, "big"))
            while received < size:
                data = s.recv(1 << 16)
                if not data:
                    break
                digest.update(data)
                received += len(data)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and received < size:
        error = f"closed after {received} of {size} bytes"
    record = {"start": started, "end": time.monotonic(), "mptcp": protocol == socket.IPPROTO_MPTCP,
              "source": source, "size": size, "received": received,
              "intact": received == size and digest.hexdigest() == digests[size], "error": error}
    with lock:
        print(json.dumps(record), flush=True)


threads, number, began = [], 0, time.monotonic()
while time.monotonic() - began < seconds:
    thread = threading.Thread(target=fetch, args=(number,))
    thread.start()
    threads.append(thread)
    number += 1
    time.sleep(max(0.0, began + number / rate - time.monotonic()))
for thread in threads:
    thread.join()
