"""The split virtqueue (virtio 1.x, section 2.7) seen from the driver side.

The ring lives in memory the device reaches through its IOTLB: the driver
writes descriptors and the available ring, the device writes the used ring.
Everything here works on a memoryview, so it is pure logic: the same code
drives vdpa_sim in the VM and a test's stand-in device on the host.

Layout of one ring (all little-endian), as the spec fixes it:
  descriptor table  num x {le64 addr; le32 len; le16 flags; le16 next}   align 16
  available ring    le16 flags; le16 idx; le16 ring[num]; le16 used_event  align 2
  used ring         le16 flags; le16 idx; {le32 id; le32 len}[num]; le16 avail_event  align 4
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
AVAIL_F_NO_INTERRUPT = 1

USED_ALIGN = 4  # descriptors open the (page-aligned) ring; avail follows them at an even offset
MAX_SIZE = 32768  # the spec's largest split queue


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class RingLayout:
    """Where each part of a split ring of `num` entries sits, as offsets from its start."""

    num: int

    def __post_init__(self) -> None:
        if not 0 < self.num <= MAX_SIZE or self.num & (self.num - 1):
            raise ValueError(f"queue size {self.num} is not a power of two in [1, {MAX_SIZE}]")

    @property
    def desc(self) -> int:
        return 0

    @property
    def avail(self) -> int:
        return self.desc + DESC.size * self.num

    @property
    def used(self) -> int:
        return _align(self.avail + 6 + 2 * self.num, USED_ALIGN)

    @property
    def size(self) -> int:
        return self.used + 6 + USED_ELEM.size * self.num


@dataclass(frozen=True)
class Buffer:
    """One descriptor's worth: device memory by IOVA, readable or writable by the device."""

    iova: int
    length: int
    writable: bool = False


@dataclass(frozen=True)
class Used:
    """A chain the device handed back: what the driver queued it with, and how much it wrote."""

    head: int
    written: int
    token: object


class RingFull(RuntimeError):
    """Not enough free descriptors for a chain: reap used entries first."""


class SplitRing:
    """The driver's half of one split virtqueue over `memory` (at least `RingLayout(num).size` bytes).

    `base` is the 16-bit index the device starts from (SET_VRING_BASE): the
    next available entry the driver writes and the next used one it expects.
    The memory is zeroed here, so a ring is only ever laid over memory the
    device is not using.
    """

    def __init__(self, memory: memoryview, num: int, *, base: int = 0, interrupts: bool = True):
        self.layout = RingLayout(num)
        if len(memory) < self.layout.size:
            raise ValueError(f"a ring of {num} needs {self.layout.size} bytes, got {len(memory)}")
        if not 0 <= base <= 0xFFFF:
            raise ValueError(f"ring base {base} is not a 16-bit index")
        self.num = num
        self._mem = memory  # not a slice of it: the owner's release() must end every use
        self._mem[: self.layout.size] = bytes(self.layout.size)
        self._avail_idx = base
        self._last_used = base
        U16.pack_into(self._mem, self.layout.avail + 2, base)
        U16.pack_into(self._mem, self.layout.used + 2, base)
        U16.pack_into(self._mem, self.layout.avail, 0 if interrupts else AVAIL_F_NO_INTERRUPT)
        # Free descriptors, and what each queued chain holds: head -> (ids, token).
        self._free = list(range(num - 1, -1, -1))
        self._chains: dict[int, tuple[list[int], object]] = {}

    # -- state --------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    @property
    def avail_idx(self) -> int:
        """The next available index: what GET_VRING_BASE reports once the device consumed all."""
        return self._avail_idx

    @property
    def used_idx(self) -> int:
        """The used index the device last published."""
        return U16.unpack_from(self._mem, self.layout.used + 2)[0]

    # -- driver -> device ---------------------------------------------------
    def add(self, buffers: Sequence[Buffer], token: object = None) -> int:
        """Queue one chain (device-readable buffers first, then writable ones); return its head."""
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        seen_writable = False
        for buf in buffers:
            if buf.length <= 0 or buf.length > 0xFFFFFFFF:
                raise ValueError(f"buffer length {buf.length} is not in [1, 2**32)")
            if not 0 <= buf.iova <= (1 << 64) - buf.length:
                raise ValueError(f"buffer iova {buf.iova:#x} + {buf.length} does not fit in 64 bits")
            if seen_writable and not buf.writable:
                raise ValueError("device-readable buffers must come before writable ones (spec 2.7.4.2)")
            seen_writable |= buf.writable
        if len(buffers) > len(self._free):
            raise RingFull(f"a chain of {len(buffers)} needs more than the {len(self._free)} free descriptors")
        ids = [self._free.pop() for _ in buffers]
        for position, (desc_id, buf) in enumerate(zip(ids, buffers)):
            last = position == len(ids) - 1
            flags = (0 if last else DESC_F_NEXT) | (DESC_F_WRITE if buf.writable else 0)
            DESC.pack_into(self._mem, self.layout.desc + DESC.size * desc_id,
                           buf.iova, buf.length, flags, 0 if last else ids[position + 1])
        head = ids[0]
        self._chains[head] = (ids, token)
        slot = self._avail_idx % self.num
        U16.pack_into(self._mem, self.layout.avail + 4 + 2 * slot, head)
        # The ring entry must be visible before the index that publishes it.
        # Python stores happen in program order and x86 keeps store order (TSO).
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        U16.pack_into(self._mem, self.layout.avail + 2, self._avail_idx)
        return head

    # -- device -> driver ---------------------------------------------------
    def reap(self) -> list[Used]:
        """Every chain the device finished since the last call; their descriptors are free again."""
        done = []
        end = self.used_idx
        while self._last_used != end:
            slot = self._last_used % self.num
            head, written = USED_ELEM.unpack_from(self._mem, self.layout.used + 4 + USED_ELEM.size * slot)
            try:
                ids, token = self._chains.pop(head)
            except KeyError:
                raise RuntimeError(f"the device returned descriptor {head}, which is not an in-flight head") from None
            self._free.extend(reversed(ids))
            done.append(Used(head, written, token))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return done
