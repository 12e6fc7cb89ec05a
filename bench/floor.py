"""The binding's floor: a NetfilterQueue worker that accepts every packet without looking; and two
steps up from it, which take the worker's cost per packet apart. Prints how many packets it
handled when it gets SIGTERM. Used by bench/speed.py.

    floor.py [QUEUE [MODE [MARK]]]

MODE accept: the floor. mark: reads the payload and gives every packet MARK, a backend's mark
(what a compiled parse + decide would cost, at best). parse: as mark, after our parser read it.
"""
import signal
import sys

from netfilterqueue import NetfilterQueue

from mplb_nfq.core.packet import parse_ip

queue_number = int(sys.argv[1]) if len(sys.argv) > 1 else 0
mode = sys.argv[2] if len(sys.argv) > 2 else "accept"
mark = int(sys.argv[3], 0) if len(sys.argv) > 3 else 0
handled = 0


def accept(packet) -> None:
    global handled
    packet.accept()
    handled += 1


def read_and_mark(packet) -> None:
    global handled
    packet.get_payload()
    packet.set_mark(mark)
    packet.accept()
    handled += 1


def parse_and_mark(packet) -> None:
    global handled
    parse_ip(packet.get_payload())
    packet.set_mark(mark)
    packet.accept()
    handled += 1


def stop(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, stop)
queue = NetfilterQueue()
queue.bind(queue_number, {"accept": accept, "mark": read_and_mark, "parse": parse_and_mark}[mode], max_len=4096)
print("ready", flush=True)
try:
    queue.run()
except KeyboardInterrupt:
    pass
finally:
    queue.unbind()
    print(handled, flush=True)
