"""virtio-net driver (virtio 1.x, 5.1): frames out on TX, frames in on RX, commands on the cvq."""

from __future__ import annotations

import struct

from vdpad.device import NetFeature, VirtioDeviceId
from vdpad.virtio.dma import DmaArena, DmaBuffer
from vdpad.virtio.driver import DriverError, QueueSpec, Transport, VirtioDriver
from vdpad.virtio.ring import Buffer

RX, TX, CTRL = 0, 1, 2
# struct virtio_net_hdr_v1 with VERSION_1: flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset, num_buffers; all zero on TX (no offloads negotiated).
NET_HDR = struct.Struct("<BBHHHHH")
ETH_HEADER, ETH_MAX_FRAME = 14, 1514
RX_BUFFER = 2048  # header + the largest frame, without MRG_RXBUF

CTRL_HDR = struct.Struct("<BB")
CTRL_MAC, CTRL_MAC_ADDR_SET = 1, 1
CTRL_OK = 0
CONFIG_MAC = (0, 6)  # virtio_net_config.mac


class NetDriver(VirtioDriver):
    """Drives RX (0) and TX (1), and the control queue (2) when given a `ctrl` arena.

    The cvq can live in memory of its own (`ctrl`), which the caller maps in
    another address space after moving the cvq's group there.
    """

    device_id = VirtioDeviceId.NET

    def __init__(self, dev: Transport, data: DmaArena, *, ctrl: DmaArena | None = None, queue_size: int = 64):
        super().__init__(dev)
        self.data, self.ctrl, self.queue_size = data, ctrl, queue_size
        self._tx_free: list[DmaBuffer] = []
        self._rx_backlog: list[bytes] = []
        self._ctrl_request: DmaBuffer | None = None
        self._ctrl_ack: DmaBuffer | None = None

    def start(self) -> None:
        """Negotiate, set up the queues, post every RX buffer, DRIVER_OK."""
        wanted = NetFeature.MAC
        specs = [QueueSpec(RX, self.queue_size, self.data), QueueSpec(TX, self.queue_size, self.data)]
        if self.ctrl is not None:
            if not self.dev.get_features() & NetFeature.CTRL_VQ:
                raise DriverError(f"{self.dev.path} does not offer a control queue")
            wanted |= NetFeature.CTRL_VQ | NetFeature.CTRL_MAC_ADDR
            specs.append(QueueSpec(CTRL, self.queue_size, self.ctrl))
        self._start(wanted, specs)

    def _prepare_buffers(self) -> None:
        rx = self.queues[RX].ring
        while rx.free:
            buffer = self.data.alloc(RX_BUFFER)
            rx.add([Buffer(buffer.iova, len(buffer), writable=True)], buffer)
        # A TX chain is two descriptors (header, frame) into one slot.
        self._tx_free = [self.data.alloc(NET_HDR.size + ETH_MAX_FRAME) for _ in range(self.queue_size // 2)]
        self._rx_backlog = []
        if self.ctrl is not None:
            self._ctrl_request = self.ctrl.alloc(CTRL_HDR.size + 64)
            self._ctrl_ack = self.ctrl.alloc(1)

    # -- data path ----------------------------------------------------------
    def send(self, frames: list[bytes], timeout: float = 5.0) -> None:
        """Queue every frame on TX (waiting for TX completions when all slots are out) and kick."""
        for frame in frames:
            if not ETH_HEADER <= len(frame) <= ETH_MAX_FRAME:
                raise ValueError(f"frame of {len(frame)} bytes is not in [{ETH_HEADER}, {ETH_MAX_FRAME}]")
        tx = self.queues[TX]
        self._tx_free += [used.token for used in tx.ring.reap()]
        for frame in frames:
            if not self._tx_free:
                tx.kick()
                self._tx_free += [used.token for used in tx.wait_used(1, timeout)]
            slot = self._tx_free.pop()
            NET_HDR.pack_into(slot.view, 0, 0, 0, 0, 0, 0, 0, 0)
            slot.view[NET_HDR.size: NET_HDR.size + len(frame)] = frame
            tx.ring.add([Buffer(slot.iova, NET_HDR.size), Buffer(slot.iova + NET_HDR.size, len(frame))], slot)
        tx.kick()

    def receive(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """The next `count` frames from RX, virtio_net_hdr stripped; their buffers go back to the device."""
        rx = self.queues[RX]
        if len(self._rx_backlog) < count:
            for used in rx.wait_used(count - len(self._rx_backlog), timeout):
                buffer: DmaBuffer = used.token
                if used.written < NET_HDR.size:
                    raise DriverError(f"RX buffer {used.head} came back with {used.written} bytes, "
                                      f"less than a virtio_net_hdr")
                self._rx_backlog.append(bytes(buffer.view[NET_HDR.size: used.written]))
                rx.ring.add([Buffer(buffer.iova, len(buffer), writable=True)], buffer)
            rx.kick()
        frames, self._rx_backlog = self._rx_backlog[:count], self._rx_backlog[count:]
        return frames

    def exchange(self, frames: list[bytes], timeout: float = 5.0) -> list[bytes]:
        """Send `frames` and return as many received: through vdpa_sim's loopback, the same ones."""
        received: list[bytes] = []
        # No more in flight than RX buffers, so the loopback never drops one for want of a buffer.
        for start in range(0, len(frames), self.queue_size // 2):
            batch = frames[start: start + self.queue_size // 2]
            self.send(batch, timeout)
            received += self.receive(len(batch), timeout)
        return received

    # -- control queue --------------------------------------------------------
    def command(self, cls: int, cmd: int, payload: bytes, timeout: float = 5.0) -> int:
        """One control command (virtio 5.1.6.5); returns the device's ack byte (0 = OK)."""
        request, ack = self._ctrl_request, self._ctrl_ack
        if CTRL not in self.queues or request is None or ack is None:
            raise DriverError("no control queue: give NetDriver a ctrl arena, then start()")
        cvq = self.queues[CTRL]
        if CTRL_HDR.size + len(payload) > len(request):
            raise ValueError(f"control payload of {len(payload)} bytes exceeds {len(request) - CTRL_HDR.size}")
        CTRL_HDR.pack_into(request.view, 0, cls, cmd)
        request.view[CTRL_HDR.size: CTRL_HDR.size + len(payload)] = payload
        ack.view[0] = 0xFF
        cvq.ring.add([Buffer(request.iova, CTRL_HDR.size + len(payload)), Buffer(ack.iova, 1, writable=True)])
        cvq.kick()
        (used,) = cvq.wait_used(1, timeout)
        if used.written != 1:
            raise DriverError(f"control command {cls}/{cmd}: the device wrote {used.written} bytes, not an ack")
        return ack.view[0]

    def set_mac(self, mac: bytes) -> None:
        """VIRTIO_NET_CTRL_MAC_ADDR_SET through the cvq."""
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        ack = self.command(CTRL_MAC, CTRL_MAC_ADDR_SET, bytes(mac))
        if ack != CTRL_OK:
            raise DriverError(f"the device answered MAC_ADDR_SET {mac.hex(':')} with ack {ack}")

    def config_mac(self) -> bytes:
        """The MAC in the device's config space."""
        return self.dev.get_config(*CONFIG_MAC)
