"""The switch of the route announcement: a TUN device that exists only while the worker holds it.

BIRD announces the VIPs with a static route through this device and `check link on`: the
route goes (and BGP withdraws it, within milliseconds here) when the link goes down (no backend
is healthy) or the device vanishes, which the kernel does itself when the process holding it
ends, however it ends (SIGKILL included). No watchdog, no control socket to get out of step.
"""
from __future__ import annotations

import fcntl
import os
import struct

from .nft import KernelError

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


class Announcement:
    def __init__(self, device: str):
        self.device, self.up = device, False
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError(f"the announcement device {device}: /dev/net/tun: {e.strerror}") from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as e:
            os.close(self.fd)
            raise KernelError(f"the announcement device {device}: {e.strerror} (held by another worker?)") from None

    def set(self, up: bool) -> None:
        """Announce (link up) or withdraw (link down)."""
        if up == self.up:
            return
        from pyroute2 import IPRoute

        with IPRoute() as ip:
            ip.link("set", index=ip.link_lookup(ifname=self.device)[0], state="up" if up else "down")
        self.up = up

    def close(self) -> None:
        """Withdraw: the device goes with its last holder."""
        os.close(self.fd)
