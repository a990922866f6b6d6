"""Shared memory that devices can map: fd-backed, MAP_SHARED, sealed against shrinking.

vdpa_sim in VA mode (its default) silently skips memory that is not shared and
file-backed, and VDUSE needs every mapped region fd-backed, so every region a
device sees is one of these: a memfd made here, or one a caller hands over
(`MemoryRegion.from_fd`, e.g. a VMM's guest memory).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import threading
import weakref
from contextlib import AbstractContextManager, ExitStack
from typing import Protocol

import cffi

from vdpad.device.owned import OwnedFd

_ffi = cffi.FFI()  # only for the address of a buffer

PAGE_SIZE = mmap.PAGESIZE
#: The mappings a refused close() names; the rest are counted.
NAMED_MAPPINGS = 8


class RegionInUse(BufferError):
    """A region an address space still maps: closing it would let the device reach whatever reuses its memory."""


class Mapper(Protocol):
    """What maps regions into devices (vdpad.iotlb.DeviceIotlb).

    A mapper adds itself (add_mapper) before it maps a region, and checks
    `closed` while holding its lock: close() holds that lock from its
    question to the end, so no map slips in between.
    """

    def mappings_of(self, region: MemoryRegion) -> list[str]:
        """Where `region` is mapped now, one description each ("AS 0 [0x1000, 0x5000) on /dev/vhost-vdpa-0")."""
        ...

    def holding(self) -> AbstractContextManager[object]:
        """While held, the mapper maps nothing new."""
        ...


class MemoryRegion:
    """`size` bytes of shared, sealed, fd-backed memory mapped read-write in this process.

    `address` is the userspace address a device is given (uaddr); `view` is a
    writable memoryview of the same bytes; `fd` is the region's own fd (-1 once
    closed), which can be handed to another process: `address` is byte
    `fd_offset` of that file (0 for a region made here). Closed exactly once;
    dropped open, it closes its fd with a ResourceWarning.
    """

    def __init__(self, size: int, name: str = "vdpad", *, populate: bool = False):
        _check_size(size)
        memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, size)
            # Devices hold uaddrs into this mapping: it must never shrink under them.
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._open(memfd, 0, size, name, populate)
        except BaseException:
            os.close(memfd)
            raise

    @classmethod
    def from_fd(cls, fd: int, offset: int, size: int, *, name: str = "adopted", populate: bool = False) -> MemoryRegion:
        """Bytes [offset, offset + size) of a file the caller has (a VMM's guest memfd), mapped shared.

        The region owns a duplicate of `fd`; the caller's fd stays the caller's.
        The file must be a regular file open read-write, sealed against
        shrinking (F_SEAL_SHRINK: a file that shrinks under a device is SIGBUS
        here and DMA into freed pages there), and hold the whole range;
        `offset` and `size` page-aligned. Refused with ValueError naming what
        was wrong; nothing is left open.
        """
        what = f"fd {fd}"
        _check_size(size)
        if offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"{what}: offset {offset:#x} must be a non-negative multiple of {PAGE_SIZE:#x}")
        try:
            own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        except OSError as error:
            raise ValueError(f"{what} cannot be adopted: {error.strerror}") from None
        try:
            _check_adoptable(own, what, offset, size)
            region = cls.__new__(cls)
            region._open(own, offset, size, name, populate)
        except BaseException:
            os.close(own)
            raise
        return region

    def _open(self, fd: int, offset: int, size: int, name: str, populate: bool) -> None:
        """Map [offset, offset + size) of `fd` and take ownership of `fd` (the caller closes it if this raises)."""
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self._map = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.name, self.size, self.fd_offset = name, size, offset
        self._pointer = _ffi.from_buffer(self._map)
        self.address = int(_ffi.cast("uintptr_t", self._pointer))
        self.view = memoryview(self._map)
        self._mappers: weakref.WeakSet[Mapper] = weakref.WeakSet()
        self._closing = threading.Lock()
        self._owned = OwnedFd(fd, f"MemoryRegion {name!r}")

    @property
    def fd(self) -> int:
        """The region's file, or -1 once closed."""
        return self._owned.fd

    def __contains__(self, span: tuple[int, int]) -> bool:
        """(offset, size) lies inside the region."""
        offset, size = span
        return size > 0 and offset >= 0 and offset + size <= self.size

    @property
    def closed(self) -> bool:
        return self._owned.closed

    def add_mapper(self, mapper: Mapper) -> None:
        """Ask `mapper` (held weakly) before closing: close() is refused while it maps the region.

        Waits for a close() in progress, so a mapper that adds itself and then
        finds the region open knows close() will ask it."""
        if mapper in self._mappers:
            return  # asked already by any close() to come (a commit checks `closed` under its own lock)
        with self._closing:
            self._mappers.add(mapper)

    def close(self) -> None:
        """Unmap and close the fd. Refused, the region staying open and whole, while a mapper
        maps it (RegionInUse, naming the first NAMED_MAPPINGS mappings and counting the rest)
        or views into it are alive (BufferError), e.g. ring or arena buffers carved from `view`."""
        with self._closing, ExitStack() as held:
            if self.closed:
                return
            mappers = sorted(self._mappers, key=id)  # one lock order for every close()
            for mapper in mappers:  # none of them maps anything new until this region is closed
                held.enter_context(mapper.holding())
            mapped = [where for mapper in mappers for where in mapper.mappings_of(self)]
            if mapped:
                # A region may be mapped at thousands of IOVAs: the first few say enough, the count says the rest.
                named = "; ".join(mapped[:NAMED_MAPPINGS])
                more = f" and {len(mapped) - NAMED_MAPPINGS} more" if len(mapped) > NAMED_MAPPINGS else ""
                raise RegionInUse(f"{self!r} cannot close: still mapped at {named}{more} "
                                  "(unmap it first: the device could reach whatever memory reuses the address)")
            self._unmap_and_close()

    def _unmap_and_close(self) -> None:
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
        self._owned.close()

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self.address:#x}"
        return f"<MemoryRegion {self.name!r} {self.size:#x} bytes {state}>"


def _check_size(size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"region size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")


def _check_adoptable(fd: int, what: str, offset: int, size: int) -> None:
    """Why the file behind `fd` cannot back a region, as a ValueError; nothing if it can."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} is not a regular file (mode {stat.filemode(st.st_mode)}): "
                         "device memory must be a memfd or another shared-memory file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise ValueError(f"{what} is not open for reading and writing: the region is mapped read-write")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None  # EINVAL: the file system has no seals (only shmem and hugetlbfs do)
    if seals is None or not seals & fcntl.F_SEAL_SHRINK:
        reason = "does not support seals" if seals is None else "is not sealed against shrinking"
        raise ValueError(f"{what} {reason}: a file that can shrink under a device is SIGBUS here and DMA into "
                         "freed pages there; use a memfd made with MFD_ALLOW_SEALING and add F_SEAL_SHRINK")
    if offset + size > st.st_size:
        raise ValueError(f"{what}: [{offset:#x}, {offset + size:#x}) runs past the end of the file "
                         f"({st.st_size:#x} bytes)")
