"""MemoryRegion: memfd memory every device map points into."""

import fcntl
import os

import pytest

from vdpad.iotlb import PAGE_SIZE, MemoryRegion


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
