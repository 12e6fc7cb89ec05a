"""Send IP packets, one hex string per line on stdin, through a raw socket (run it in a test's
client namespace). Options: --repeat N sends the list N times; --seconds S stops after S seconds."""
import argparse
import ipaddress
import socket
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    packets = [bytes.fromhex(line.strip()) for line in sys.stdin if line.strip()]
    v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    deadline = time.monotonic() + args.seconds
    sent = 0
    for _ in range(args.repeat):
        for packet in packets:
            if packet[0] >> 4 == 6:
                v6.sendto(packet, (str(ipaddress.ip_address(packet[24:40])), 0))
            else:
                v4.sendto(packet, (str(ipaddress.ip_address(packet[16:20])), 0))
            sent += 1
        if time.monotonic() > deadline:
            break
    print(sent)


if __name__ == "__main__":
    main()
