"""A tap device for vhost-net tests and benchmarks, and a packet socket on its interface.

vhost-net owns the tap's queue: what its TX sends enters the host stack as
frames received on the interface, and what the host transmits on the
interface is what its RX receives. The packet socket stands for that host
side: `receive` reads what the device sent, `send` transmits to the device.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
VNET_HDR_V1 = 12  # struct virtio_net_hdr_v1: what a VERSION_1 driver puts before each frame
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass
class Tap:
    fd: int
    name: str
    host: socket.socket

    def send(self, frame: bytes) -> None:
        """Transmit `frame` on the interface: it reaches the device's RX."""
        self.host.send(frame)

    def receive(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """The next `count` frames the device sent (its TX), in order; TimeoutError when they do not come."""
        self.host.settimeout(timeout)
        got: list[bytes] = []
        while len(got) < count:
            try:
                frame, address = self.host.recvfrom(65536)
            except TimeoutError:
                raise TimeoutError(f"{len(got)} of {count} frames from {self.name} within {timeout} s") from None
            if address[2] != PACKET_OUTGOING:  # the host's own transmissions show up too
                got.append(frame)
        return got


@contextmanager
def tap_device(name: str) -> Iterator[Tap]:
    """A tap made as QEMU makes one (TUNSETIFF with a vnet header of VERSION_1's size), up, with IPv6 off so
    the host sends nothing of its own on it."""
    subprocess.run(["modprobe", "tun"], check=True)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_V1))
        ipv6 = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
        if ipv6.exists():
            ipv6.write_text("1")
        with IPRoute() as ip:
            ip.link("set", index=ip.link_lookup(ifname=name)[0], state="up")
        host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            host.bind((name, 0))
            yield Tap(fd, name, host)
        finally:
            host.close()
    finally:
        os.close(fd)
