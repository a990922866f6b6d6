"""MemoryRegion: memfd memory every device map points into."""

import fcntl
import gc
import os
import threading

import pytest

from vdpad.iotlb import PAGE_SIZE, MemoryRegion, RegionInUse
from vdpad.iotlb.memory import NAMED_MAPPINGS


def test_region_is_shared_sealed_and_addressable():
    import ctypes

    with MemoryRegion(4 * PAGE_SIZE, "t") as region:
        region.view[:5] = b"hello"
        assert ctypes.string_at(region.address, 5) == b"hello"
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, PAGE_SIZE)
        assert (0, 4 * PAGE_SIZE) in region and (PAGE_SIZE, 4 * PAGE_SIZE) not in region
    assert region.closed


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, PAGE_SIZE + 1])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="positive multiple"):
        MemoryRegion(size)


def test_close_with_live_views_is_refused_and_leaves_the_region_whole():
    region = MemoryRegion(2 * PAGE_SIZE, "busy")
    window = region.view[PAGE_SIZE:]  # as a ring or arena buffer holds one
    with pytest.raises(BufferError, match="views into its memory are still alive"):
        region.close()
    assert not region.closed
    os.fstat(region.fd)  # the memfd is still open
    region.view[0] = 7  # and the region still usable
    window[0] = 9
    assert region.view[PAGE_SIZE] == 9
    window.release()
    region.close()
    assert region.closed
    with pytest.raises(OSError):
        os.fstat(region.fd)
    region.close()  # closed exactly once: a second close is a no-op


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("vmm-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_closing_sets_fd_to_minus_one():
    region = MemoryRegion(PAGE_SIZE, "gone")
    number = region.fd
    region.close()
    assert region.fd == -1
    with pytest.raises(OSError):
        os.fstat(number)


def test_a_region_dropped_open_closes_its_memfd_with_a_resource_warning():
    region = MemoryRegion(PAGE_SIZE, "dropped")
    number = region.fd
    with pytest.warns(ResourceWarning, match=rf"unclosed MemoryRegion 'dropped' \(fd {number}\)"):
        del region
        gc.collect()
    with pytest.raises(OSError):
        os.fstat(number)


def test_a_region_mapped_at_many_places_names_a_few_and_counts_the_rest():
    region = MemoryRegion(PAGE_SIZE, "everywhere")
    places = [f"AS 0 [{2 * i * PAGE_SIZE:#x}, {(2 * i + 1) * PAGE_SIZE:#x}) on /dev/vhost-vdpa-0"
              for i in range(10_000)]
    mapper = StandInMapper(*places)
    region.add_mapper(mapper)
    with pytest.raises(RegionInUse) as refused:
        region.close()
    message = str(refused.value)
    assert f"still mapped at {'; '.join(places[:NAMED_MAPPINGS])} and {10_000 - NAMED_MAPPINGS} more (unmap" in message
    assert places[NAMED_MAPPINGS] not in message and len(message) < 1000
    mapper.where.clear()
    region.close()


class StandInMapper:
    """What the IOTLB engine tells a region: where it maps it now; its lock, held by close()."""

    def __init__(self, *where: str):
        self.where = list(where)
        self.lock = threading.Lock()

    def mappings_of(self, region: MemoryRegion) -> list[str]:
        assert self.lock.locked(), "close() asks while holding the mapper's lock"
        return list(self.where)

    def holding(self) -> threading.Lock:
        return self.lock


def test_a_mapped_region_refuses_to_close_and_names_the_mappings():
    region = MemoryRegion(2 * PAGE_SIZE, "mapped")
    idle = StandInMapper()
    mapper = StandInMapper("AS 0 [0x1000, 0x3000) on /dev/vhost-vdpa-0", "AS 1 [0x8000, 0x9000) on /dev/vhost-vdpa-0")
    region.add_mapper(idle)
    region.add_mapper(mapper)
    with pytest.raises(RegionInUse, match=r"still mapped at AS 0 \[0x1000, 0x3000\) on /dev/vhost-vdpa-0; AS 1 "):
        region.close()
    assert isinstance(RegionInUse("x"), BufferError)
    assert not region.closed
    os.fstat(region.fd)
    region.view[0] = 1  # whole and usable
    mapper.where.clear()  # unmapped
    region.close()
    assert region.closed


def test_a_mapper_that_is_gone_does_not_hold_the_region():
    region = MemoryRegion(PAGE_SIZE, "orphan")
    mapper = StandInMapper("AS 0 [0x1000, 0x2000) on a device that is gone")
    region.add_mapper(mapper)
    del mapper
    gc.collect()
    region.close()
    assert region.closed


def test_from_fd_adopts_a_sealed_memfd_at_an_offset():
    guest = sealed_memfd(4 * PAGE_SIZE)
    try:
        os.pwrite(guest, b"guest page 1", PAGE_SIZE)
        region = MemoryRegion.from_fd(guest, PAGE_SIZE, 2 * PAGE_SIZE, name="guest")
        assert region.fd not in (-1, guest) and region.fd_offset == PAGE_SIZE and region.size == 2 * PAGE_SIZE
        assert bytes(region.view[:12]) == b"guest page 1"  # address is byte fd_offset of the file
        region.view[PAGE_SIZE:PAGE_SIZE + 5] = b"share"
        assert os.pread(guest, 5, 2 * PAGE_SIZE) == b"share"
        assert os.pread(region.fd, 5, 2 * PAGE_SIZE) == b"share"  # region.fd is the same file
        region.close()
        os.fstat(guest)  # the caller's fd stays the caller's
    finally:
        os.close(guest)
    assert MemoryRegion(PAGE_SIZE).fd_offset == 0


def test_from_fd_outlives_the_callers_fd():
    guest = sealed_memfd(PAGE_SIZE)
    region = MemoryRegion.from_fd(guest, 0, PAGE_SIZE)
    os.close(guest)
    region.view[:2] = b"ok"
    assert os.pread(region.fd, 2, 0) == b"ok"
    region.close()


@pytest.fixture
def refusals(tmp_path):
    """fds that cannot back a region, by what is wrong with each."""
    opened = []

    def keep(fd: int) -> int:
        opened.append(fd)
        return fd

    memfd = keep(sealed_memfd(2 * PAGE_SIZE))
    read, _ = os.pipe()
    opened += [read, _]
    disk = tmp_path / "plain"
    disk.write_bytes(bytes(2 * PAGE_SIZE))
    yield {
        "pipe": (read, 0, PAGE_SIZE, "is not a regular file"),
        "unsealed memfd": (keep(sealed_memfd(2 * PAGE_SIZE, seals=0)), 0, PAGE_SIZE, "is not sealed against shrinking"),
        "file without seals": (keep(os.open(disk, os.O_RDWR)), 0, PAGE_SIZE, "sealed against shrinking|support seals"),
        "read-only": (keep(os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY)), 0, PAGE_SIZE,
                      "not open for reading and writing"),
        "too short": (memfd, PAGE_SIZE, 2 * PAGE_SIZE, r"\[0x1000, 0x3000\) runs past the end of the file \(0x2000 bytes\)"),
        "unaligned offset": (memfd, 100, PAGE_SIZE, "offset 0x64 must be a non-negative multiple"),
        "unaligned size": (memfd, 0, 100, "size 0x64 must be a positive multiple"),
        "not an fd": (4000, 0, PAGE_SIZE, "fd 4000 cannot be adopted"),
    }
    for fd in opened:
        os.close(fd)


@pytest.mark.parametrize("case", ["pipe", "unsealed memfd", "file without seals", "read-only", "too short",
                                  "unaligned offset", "unaligned size", "not an fd"])
def test_from_fd_refuses_what_cannot_back_device_memory(refusals, case):
    fd, offset, size, problem = refusals[case]
    before = open_fds()
    with pytest.raises(ValueError, match=problem):
        MemoryRegion.from_fd(fd, offset, size)
    assert open_fds() == before  # nothing left open
