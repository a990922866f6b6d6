"""virtio-blk driver (virtio 1.x, 5.2): read and write 512-byte sectors, one request at a time."""

from __future__ import annotations

import struct

from vdpad.device import BlkFeature, VirtioDeviceId
from vdpad.virtio.dma import DmaArena, DmaBuffer
from vdpad.virtio.driver import DriverError, QueueSpec, Transport, VirtioDriver
from vdpad.virtio.ring import Buffer

SECTOR = 512
T_IN, T_OUT = 0, 1
# struct virtio_blk_outhdr: le32 type, le32 reserved, le64 sector.
REQ_HDR = struct.Struct("<IIQ")
STATUS_NAMES = {0: "OK", 1: "IOERR", 2: "UNSUPP"}
CONFIG = struct.Struct("<QII")  # virtio_blk_config: capacity, size_max, seg_max
DEFAULT_SEGMENT = 4096


class BlkIoError(DriverError):
    """The device answered a request with a status other than OK."""


class BlkDriver(VirtioDriver):
    """One request queue (0); data moves through a staging buffer of `max_request` bytes."""

    device_id = VirtioDeviceId.BLOCK

    def __init__(self, dev: Transport, arena: DmaArena, *, queue_size: int = 64, max_request: int = 64 * 1024):
        super().__init__(dev)
        if max_request <= 0 or max_request % SECTOR:
            raise ValueError(f"max_request {max_request} is not a positive multiple of {SECTOR}")
        if queue_size < 4:
            raise ValueError(f"queue_size {queue_size}: a request needs a header, data and status descriptor")
        self.arena, self.queue_size, self.max_request = arena, queue_size, max_request
        self.capacity = 0  # in sectors
        self._segment = DEFAULT_SEGMENT
        self._max_segments = 1
        self._header: DmaBuffer | None = None  # the request's header, status byte and data: from start()
        self._status: DmaBuffer | None = None
        self._staging: DmaBuffer | None = None

    def start(self) -> None:
        self._start(BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX, [QueueSpec(0, self.queue_size, self.arena)])
        capacity, size_max, seg_max = CONFIG.unpack(self.dev.get_config(0, CONFIG.size))
        self.capacity = capacity
        # Without SIZE_MAX/SEG_MAX the device states no limit; keep requests modest anyway.
        self._segment = min(size_max, DEFAULT_SEGMENT) if self.features & BlkFeature.SIZE_MAX else DEFAULT_SEGMENT
        self._segment = max(self._segment - self._segment % SECTOR, SECTOR)
        self._max_segments = max(seg_max, 1) if self.features & BlkFeature.SEG_MAX else 1

    def _prepare_buffers(self) -> None:
        self._header = self.arena.alloc(REQ_HDR.size, 16)
        self._status = self.arena.alloc(1, 1)
        self._staging = self.arena.alloc(self.max_request, 4096)

    @property
    def request_bytes(self) -> int:
        # A request's chain is header + data segments + status: it must fit the ring.
        segments = min(self._max_segments, self.queue_size - 2)
        return min(self.max_request, self._segment * segments)

    def _check(self, sector: int, length: int) -> None:
        if length <= 0 or length % SECTOR:
            raise ValueError(f"length {length} is not a positive multiple of {SECTOR}")
        if sector < 0 or sector + length // SECTOR > self.capacity:
            raise ValueError(f"sectors {sector}..{sector + length // SECTOR - 1} are outside the disk's "
                             f"{self.capacity} sectors")

    def write(self, sector: int, data: bytes, timeout: float = 5.0) -> None:
        self._check(sector, len(data))
        step = self.request_bytes
        for done in range(0, len(data), step):
            chunk = data[done: done + step]
            self._staging.view[: len(chunk)] = chunk
            self._request(T_OUT, sector + done // SECTOR, len(chunk), timeout)

    def read(self, sector: int, count: int, timeout: float = 5.0) -> bytes:
        """`count` sectors from `sector`."""
        self._check(sector, count * SECTOR)
        out = bytearray()
        step = self.request_bytes
        for done in range(0, count * SECTOR, step):
            length = min(step, count * SECTOR - done)
            self._request(T_IN, sector + done // SECTOR, length, timeout)
            out += self._staging.view[:length]
        return bytes(out)

    def _request(self, kind: int, sector: int, length: int, timeout: float) -> None:
        if self._header is None or self._status is None or self._staging is None:
            raise DriverError("start() the driver before any request")
        REQ_HDR.pack_into(self._header.view, 0, kind, 0, sector)
        self._status.view[0] = 0xFF
        writable = kind == T_IN
        chain = [Buffer(self._header.iova, REQ_HDR.size)]
        chain += [Buffer(self._staging.iova + at, min(self._segment, length - at), writable)
                  for at in range(0, length, self._segment)]
        chain.append(Buffer(self._status.iova, 1, writable=True))
        queue = self.queues[0]
        queue.ring.add(chain)
        queue.kick()
        queue.wait_used(1, timeout)
        status = self._status.view[0]
        if status != 0:
            raise BlkIoError(f"{'read' if writable else 'write'} of {length} bytes at sector {sector}: "
                             f"status {STATUS_NAMES.get(status, status)}")
