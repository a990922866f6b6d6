"""Shared memory that devices can map: memfd, MAP_SHARED, sealed against shrinking.

vdpa_sim in VA mode (its default) silently skips memory that is not shared and
file-backed, so every region a device sees is one of these.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import cffi

_ffi = cffi.FFI()  # only for the address of a buffer

PAGE_SIZE = mmap.PAGESIZE


class MemoryRegion:
    """`size` bytes of memfd memory mapped read-write in this process.

    `address` is the userspace address a device is given (uaddr); `view` is a
    writable memoryview of the same bytes. Closed exactly once; the memfd can
    be handed to another process (`fd`) and outlives nothing it does not own.
    """

    def __init__(self, size: int, name: str = "vdpad", *, populate: bool = False):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"region size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
        self.name, self.size = name, size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # Devices hold uaddrs into this mapping: it must never shrink under them.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._map = mmap.mmap(self.fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._pointer = _ffi.from_buffer(self._map)
        self.address = int(_ffi.cast("uintptr_t", self._pointer))
        self.view = memoryview(self._map)
        self._closed = False

    def __contains__(self, span: tuple[int, int]) -> bool:
        """(offset, size) lies inside the region."""
        offset, size = span
        return size > 0 and offset >= 0 and offset + size <= self.size

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap and close the memfd. Refused (BufferError, region still usable) while
        views into it are alive, e.g. ring or arena buffers carved from `view`."""
        if self._closed:
            return
        self.view.release()
        _ffi.release(self._pointer)
        try:
            self._map.close()
        except BufferError:
            # Export again what we released: the region stays whole and open.
            self._pointer = _ffi.from_buffer(self._map)
            self.view = memoryview(self._map)
            raise BufferError(f"{self!r} cannot close: views into its memory are still alive "
                              "(release them first)") from None
        self._closed = True
        os.close(self.fd)

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address:#x}"
        return f"<MemoryRegion {self.name!r} {self.size:#x} bytes {state}>"
