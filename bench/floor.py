"""The binding's floor: a NetfilterQueue worker that accepts every packet without looking.
Prints how many packets it handled when it gets SIGTERM. Used by bench/speed.py."""
import signal
import sys

from netfilterqueue import NetfilterQueue

handled = 0


def accept(packet) -> None:
    global handled
    packet.accept()
    handled += 1


def stop(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, stop)
queue = NetfilterQueue()
queue.bind(int(sys.argv[1]) if len(sys.argv) > 1 else 0, accept, max_len=4096)
print("ready", flush=True)
try:
    queue.run()
except KeyboardInterrupt:
    pass
finally:
    queue.unbind()
    print(handled, flush=True)
