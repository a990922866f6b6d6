"""Driver memory as the device sees it: a window of a region, placed at an IOVA.

The driver carves rings and packet buffers out of an arena and hands the
device their IOVAs; whoever owns the IOTLB maps the arena's window (region,
offset, size) at `iova` before the device touches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdpad.iotlb.memory import MemoryRegion


@dataclass(frozen=True)
class DmaBuffer:
    """Bytes the driver writes through `view` and the device reaches at `iova`."""

    iova: int
    view: memoryview

    def __len__(self) -> int:
        return len(self.view)


class DmaArena:
    """A bump allocator over region[offset : offset + size], which the device sees at `iova`."""

    def __init__(self, region: MemoryRegion, iova: int, *, offset: int = 0, size: int | None = None):
        size = region.size - offset if size is None else size
        if (offset, size) not in region:
            raise ValueError(f"window {offset:#x}+{size:#x} is not inside {region!r}")
        if iova < 0 or iova + size > 1 << 64:
            raise ValueError(f"iova {iova:#x}+{size:#x} does not fit in 64 bits")
        self.region, self.iova, self.offset, self.size = region, iova, offset, size
        self._next = 0
        self._views: list[memoryview] = []

    @property
    def used(self) -> int:
        return self._next

    def alloc(self, size: int, align: int = 64) -> DmaBuffer:
        """`size` bytes aligned to `align` (a power of two) in both IOVA and region offset."""
        if size <= 0:
            raise ValueError(f"allocation size {size} must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        if (self.iova | self.offset) % align:
            raise ValueError(f"arena at iova {self.iova:#x} offset {self.offset:#x} is not {align}-aligned")
        start = -(-self._next // align) * align
        if start + size > self.size:
            raise MemoryError(f"arena of {self.size:#x} bytes has {self.size - start:#x} left, {size:#x} asked")
        self._next = start + size
        at = self.offset + start
        view = self.region.view[at: at + size]
        self._views.append(view)
        return DmaBuffer(self.iova + start, view)

    def reset(self) -> None:
        """Take every allocation back: their views are released (the region cannot close under one)."""
        for view in self._views:
            view.release()
        self._views.clear()
        self._next = 0

    def __enter__(self) -> DmaArena:
        return self

    def __exit__(self, *exc) -> None:
        self.reset()
