"""Every fd has one owner: closed once, -1 after, never closed under a call in flight, never leaked silently.

A vhost fd's methods work on any file until they reach an ioctl, so a FIFO
or a regular file stands in for /dev/vhost-net here: what is tested is the
fd's life, not the device (the kernel tests drive the device).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from vdpad.device import Access, EventFd, IotlbMessage, MessageType, VhostNet, VhostVdpa
from vdpad.device.owned import OwnedFd

UPDATE = IotlbMessage(MessageType.UPDATE, 0x1000, 0x1000, 0x1000, Access.RW)


def is_open(number: int) -> bool:
    try:
        os.fstat(number)
    except OSError:
        return False
    return True


def blocked(thread: threading.Thread) -> None:
    """Give `thread` time to enter its syscall, and check it is still in it."""
    time.sleep(0.2)
    assert thread.is_alive(), "the call returned at once: nothing to race with"


@pytest.fixture
def plain_file(tmp_path):
    path = tmp_path / "not-a-device"
    path.write_bytes(b"")
    return path


def test_closing_forgets_the_number():
    owned = OwnedFd(os.eventfd(0), "test eventfd")
    number = owned.fd
    assert owned.close() is True
    assert (owned.fd, owned.closed, is_open(number)) == (-1, True, False)
    assert owned.close() is False  # closed exactly once
    with pytest.raises(ValueError, match="test eventfd is closed"):
        owned.fileno()
    with pytest.raises(ValueError, match="test eventfd is closed"), owned.use():
        pass


def test_a_late_call_raises_instead_of_acting_on_the_file_that_reused_the_number(plain_file, tmp_path):
    dev = VhostNet(plain_file)
    number = dev.fileno()
    dev.close()
    other = os.open(tmp_path / "someone-else", os.O_RDWR | os.O_CREAT)
    try:
        assert other == number  # the kernel hands out the lowest free number: ours
        with pytest.raises(ValueError, match=f"VhostNet {plain_file} is closed"):
            dev.write_iotlb(UPDATE)
        with pytest.raises(ValueError, match="is closed"):
            dev.set_owner()
        assert os.fstat(other).st_size == 0  # nothing was written to the other file
    finally:
        os.close(other)

    kick = EventFd("kick")
    number = kick.fileno()
    kick.close()
    assert kick.fd == -1
    other = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert other == number
        with pytest.raises(ValueError, match="EventFd 'kick' is closed"):
            kick.write(1)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(other)  # its counter is still 0
    finally:
        os.close(other)


def test_close_during_a_write_keeps_the_number_until_the_write_returns(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Our own end, to fill the pipe so that the device's write blocks, and to drain it.
    pipe = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    while True:
        try:
            os.write(pipe, bytes(4096))
        except BlockingIOError:
            break
    dev = VhostNet(fifo)
    number, inode = dev.fileno(), os.fstat(dev.fileno()).st_ino
    writer = threading.Thread(target=dev.write_iotlb, args=(UPDATE,), daemon=True)
    writer.start()
    try:
        blocked(writer)
        dev.close()
        assert dev.closed
        with pytest.raises(ValueError, match="is closed"):
            dev.fileno()
        # The write still holds the number: nobody else can be given it meanwhile.
        assert os.fstat(number).st_ino == inode
        drain(pipe, writer)
        assert not is_open(number)  # the last call out closed it
    finally:
        drain(pipe, writer)
        os.close(pipe)


def drain(pipe: int, writer: threading.Thread) -> None:
    """Read the FIFO until the blocked write got through."""
    deadline = time.monotonic() + 5
    while writer.is_alive() and time.monotonic() < deadline:
        try:
            os.read(pipe, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
    writer.join(1)


def test_close_during_a_blocking_read_keeps_the_eventfd_until_the_read_returns():
    call = EventFd("call")  # blocking: read() waits for a write
    number = call.fileno()
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(call.read()))
    reader.start()
    blocked(reader)
    call.close()
    assert call.fd == -1
    assert os.readlink(f"/proc/self/fd/{number}") == "anon_inode:[eventfd]"
    os.eventfd_write(number, 7)  # as the device would, through its own reference
    reader.join(5)
    assert got == [7]
    assert not is_open(number)


def test_eventfd_counts_and_waits():
    with EventFd("kick", nonblocking=True) as kick:
        assert kick.wait(0) is False
        with pytest.raises(BlockingIOError):
            kick.read()
        kick.write(2)
        kick.write(3)
        assert kick.wait(0) is True
        assert kick.read() == 5
    assert kick.closed and repr(kick) == "<EventFd 'kick' closed>"


@pytest.mark.parametrize("make", [
    pytest.param(lambda path: VhostNet(path), id="VhostNet"),
    pytest.param(lambda path: VhostVdpa(path), id="VhostVdpa"),
    pytest.param(lambda path: EventFd("dropped"), id="EventFd"),
])
def test_dropped_open_closes_with_a_resource_warning(make, plain_file):
    thing = make(plain_file)
    number = thing.fileno()
    with pytest.warns(ResourceWarning, match=rf"unclosed {type(thing).__name__} .*\(fd {number}\)"):
        del thing
        gc.collect()
    assert not is_open(number)


def test_closed_then_dropped_is_silent(plain_file, recwarn):
    dev = VhostNet(plain_file)
    dev.close()
    del dev
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
