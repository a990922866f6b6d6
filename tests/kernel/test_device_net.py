"""VhostNet against /dev/vhost-net: every method, a tap backend, and the device IOTLB's MISS path."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from array import array
from collections.abc import Iterator

import pytest
import structlog

from tests.sim import debug_logging
from tests.tap import tap_device
from vdpad.device import (
    Access, BackendFeature, GuestRegion, InvalidArgument, IotlbBatch, IotlbMessage, MessageType,
    NetFeature, NotSupportedError, VhostError, VhostNet, VirtioFeature, VringAddr, VringEndian,
)
from vdpad.device.miss_loop import MissEvent, MissLoop
from vdpad.device.net import RX, TX
from vdpad.iotlb import PAGE_SIZE, MemoryRegion

pytestmark = pytest.mark.kernel

RING = 256
IOVA = 0x40000000  # where the device-IOTLB tests put the rings


@pytest.fixture
def tap() -> Iterator[int]:
    """A tap device's fd, made the way QEMU makes one."""
    with tap_device(f"vdpadtap{os.getpid() % 1000}") as made:
        yield made.fd


@pytest.fixture
def memory() -> Iterator[MemoryRegion]:
    with MemoryRegion(16 * PAGE_SIZE, "test-vhost-net") as region:
        yield region


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    """kick, call and err for each of the two queues."""
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(6)]
    yield fds
    for fd in fds:
        os.close(fd)


def rings(base: int, index: int) -> VringAddr:
    start = base + index * 3 * PAGE_SIZE
    return VringAddr(desc=start, avail=start + PAGE_SIZE, used=start + 2 * PAGE_SIZE)


def test_identity(vhost_net_node):
    with VhostNet(vhost_net_node) as net:
        net.set_owner()
        offered = net.get_features()
        assert offered & VirtioFeature.ACCESS_PLATFORM  # it can translate through a device IOTLB
        assert offered & VirtioFeature.VERSION_1 and offered & NetFeature.VHOST_NET_HDR
        assert net.get_backend_features() == BackendFeature.IOTLB_MSG_V2
        with pytest.raises(NotSupportedError) as refused:
            net.set_backend_features(BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH)
        assert refused.value.errno == errno.EOPNOTSUPP
        net.set_backend_features(BackendFeature.IOTLB_MSG_V2)
        with pytest.raises(VhostError) as refused:
            net.set_owner()  # one owner per device
        assert refused.value.errno == errno.EBUSY and "SET_OWNER on /dev/vhost-net" in str(refused.value)
        net.reset_owner()
        net.set_owner()  # ...until it lets go
        assert not net.released
    assert net.closed and net.released  # no call in flight: the kernel has let go of the file
    with VhostNet(vhost_net_node) as again:  # ...so a new owner may come
        again.set_owner()


def test_memory_table_vrings_and_tap_backend(vhost_net_node, memory, tap, eventfds):
    with VhostNet(vhost_net_node) as net:
        net.set_owner()
        net.set_features(VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF)
        # Without ACCESS_PLATFORM the rings are userspace addresses; the table translates buffers.
        net.set_mem_table([GuestRegion(0, memory.size, memory.address)])
        for index in (RX, TX):
            kick, call, err = eventfds[3 * index:3 * index + 3]
            net.set_vring_num(index, RING)
            net.set_vring_addr(index, rings(memory.address, index))
            net.set_vring_base(index, 7 + index)
            net.set_vring_kick(index, kick)
            net.set_vring_call(index, call)
            net.set_vring_err(index, err)
            net.set_vring_busyloop_timeout(index, 20 + index)
            assert net.get_vring_busyloop_timeout(index) == 20 + index
        log = MemoryRegion(PAGE_SIZE, "dirty-log")
        try:
            net.set_log_base(log.address)
            net.set_log_fd(eventfds[2])
            net.set_log_fd(None)
            net.set_backend(RX, tap)
            net.set_backend(TX, tap)
            with pytest.raises(VhostError) as refused:
                net.set_vring_num(TX, RING)  # a ring in use keeps its size
            assert refused.value.errno == errno.EBUSY
            net.set_backend(RX, None)
            net.set_backend(TX, None)
        finally:
            log.close()
        assert [net.get_vring_base(i) for i in (RX, TX)] == [7, 8]
        with pytest.raises(NotSupportedError, match="GET_VRING_ENDIAN.*not supported by this kernel"):
            net.get_vring_endian(RX)  # Debian builds without cross-endian legacy rings
        with pytest.raises(VhostError) as refused:
            net.set_backend(RX, eventfds[0])  # an fd that is not a socket
        assert refused.value.errno == errno.ENOTSOCK
        assert f"NET_SET_BACKEND(index=0, fd={eventfds[0]})" in str(refused.value)


def test_setting_a_legacy_ring_byte_order_is_not_in_this_kernel(vhost_net_node):
    """Debian builds vhost without cross-endian legacy rings: SET_VRING_ENDIAN is ENOTTY, named as such."""
    with VhostNet(vhost_net_node) as net:
        net.set_owner()
        with pytest.raises(NotSupportedError, match="SET_VRING_ENDIAN.*not supported by this kernel") as refused:
            net.set_vring_endian(RX, VringEndian.BIG)
        assert refused.value.errno == errno.ENOTTY


def test_arguments_refused_before_the_syscall(vhost_net_node, memory):
    with VhostNet(vhost_net_node) as net:
        net.set_owner()
        refused = [
            (lambda: net.set_vring_num(2, RING), "queue index 2 is out of range: the device has 2 virtqueues"),
            (lambda: net.set_backend(2, None), "queue index 2 is out of range"),
            (lambda: net.set_vring_num(RX, 3), "num=3 is not a power of two"),
            (lambda: net.set_vring_num(RX, 1 << 16), "is above the device's largest vring size 32768"),
            (lambda: net.set_mem_table([GuestRegion(0, 0, memory.address)]), "has no size"),
            (lambda: net.set_mem_table([GuestRegion(0, 2 * PAGE_SIZE, memory.address),
                                        GuestRegion(PAGE_SIZE, PAGE_SIZE, memory.address)]), "overlap"),
            (lambda: net.write_iotlb(IotlbMessage(MessageType.UPDATE, 0, PAGE_SIZE, memory.address, Access.RW, asid=1)),
             "needs IOTLB_ASID acked first"),
            (lambda: net.write_iotlb(IotlbMessage(MessageType.BATCH_BEGIN)), "needs IOTLB_BATCH acked first"),
            (lambda: net.write_iotlb(IotlbMessage(MessageType.ACCESS_FAIL, 0, PAGE_SIZE)), "not a message userspace writes"),
        ]
        for call, problem in refused:
            with pytest.raises(InvalidArgument, match=problem):
                call()
        # The kernel itself acts on no ACCESS_FAIL write: the check above only says why first.
        raw = IotlbMessage(MessageType.ACCESS_FAIL, 0, PAGE_SIZE).encode(net.iotlb_version)
        with pytest.raises(OSError) as bare:
            os.write(net.fileno(), raw)
        assert bare.value.errno == errno.EFAULT


@pytest.mark.parametrize("acked", [BackendFeature(0), BackendFeature.IOTLB_MSG_V2], ids=["v1", "v2"])
def test_device_iotlb_miss(vhost_net_node, memory, tap, eventfds, acked):
    """With ACCESS_PLATFORM the rings are IOVAs: a kick makes the device ask for what it lacks."""
    with debug_logging(), structlog.testing.capture_logs() as events, VhostNet(vhost_net_node) as net:
        net.set_owner()
        net.set_backend_features(acked)
        net.set_features(VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM)
        net.set_mem_table([])  # unused for translation now, but vhost wants a table before a backend
        rx = rings(IOVA, RX)
        net.set_vring_num(RX, RING)
        net.set_vring_addr(RX, rx)
        net.set_vring_base(RX, 0)
        kick, call = eventfds[0], eventfds[1]
        net.set_vring_kick(RX, kick)
        net.set_vring_call(RX, call)

        def update(iova: int, perm: Access) -> IotlbMessage:
            page = iova - iova % PAGE_SIZE
            return IotlbMessage(MessageType.UPDATE, page, PAGE_SIZE, memory.address + (page - IOVA), perm)

        # Attaching the backend writes the used ring: map it first.
        net.write_iotlb(update(rx.used, Access.RW))
        net.set_backend(RX, tap)
        with pytest.raises(TimeoutError):
            net.read_iotlb(timeout=0.3)  # nothing asked before the kick
        os.write(kick, (1).to_bytes(8, "little"))
        # The device checks the descriptor table, then the available ring (the used
        # ring is mapped): one MISS each, each answered with an UPDATE that wakes it.
        for expected in (rx.desc, rx.avail):
            miss = net.read_iotlb(timeout=10)
            assert (miss.type, miss.iova, miss.perm, miss.asid) == (MessageType.MISS, expected, Access.RO, 0)
            net.write_iotlb(update(miss.iova, Access.RO))
        with pytest.raises(TimeoutError):
            net.read_iotlb(timeout=1)  # all it needs is mapped now
        assert net.get_vring_base(RX) == 0
        # The unmap goes through the write loop, framed as the fd acked (v1 or v2).
        assert net.write_iotlb_batch(IotlbBatch(0, [(IOVA, 16 * PAGE_SIZE)])) == 1
        net.set_backend(RX, None)
    framing = "V2" if acked else "V1"
    assert [(e["version"], e["type"], e["iova"]) for e in events if e["event"] == "iotlb.read"] == [
        (framing, "MISS", rx.desc), (framing, "MISS", rx.avail)]
    assert {e["version"] for e in events if e["event"] == "iotlb.write"} == {framing}


@pytest.mark.parametrize("traced", [False, True], ids=["quiet", "traced"])
@pytest.mark.parametrize("acked", [BackendFeature(0), BackendFeature.IOTLB_MSG_V2], ids=["v1", "v2"])
def test_a_miss_loop_answers_from_its_table_and_hands_back_what_it_cannot(vhost_net_node, memory, tap, eventfds,
                                                                           acked, traced):
    """The C loop a miss service runs: it answers a MISS its table covers with no Python on the way, hands
    back one it cannot (here: a permission the entry lacks), and answers that one once the table is fixed."""
    logging = debug_logging() if traced else contextlib.nullcontext()
    with logging, structlog.testing.capture_logs() as events, VhostNet(vhost_net_node) as net:
        net.set_owner()
        net.set_backend_features(acked)
        net.set_features(VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM)
        net.set_mem_table([])
        rx = rings(IOVA, RX)
        net.set_vring_num(RX, RING)
        net.set_vring_addr(RX, rx)
        net.set_vring_base(RX, 0)
        net.set_vring_kick(RX, eventfds[0])
        net.set_vring_call(RX, eventfds[1])

        def quad(iova: int, perm: Access) -> list[int]:
            page = iova - iova % PAGE_SIZE
            return [page, PAGE_SIZE, memory.address + (page - IOVA), int(perm)]

        used = quad(rx.used, Access.RW)
        net.write_iotlb(IotlbMessage(MessageType.UPDATE, *used[:3], Access.RW))  # attaching writes it
        net.set_backend(RX, tap)
        loop = MissLoop(8)
        with loop.lock:
            loop.serving = True
            loop.load(array("Q", quad(rx.desc, Access.RO) + quad(rx.avail, Access.WO)))  # avail: not readable
        flags = fcntl.fcntl(net.fileno(), fcntl.F_GETFL)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        try:
            with net.iotlb_channel() as channel:
                assert fcntl.fcntl(net.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
                os.write(eventfds[0], (1).to_bytes(8, "little"))
                back = loop.run(channel, stop_r)  # the desc MISS was answered in C; avail's comes back
                assert (back.event, back.type, back.iova, back.perm) == (
                    MissEvent.UNANSWERED, MessageType.MISS, rx.avail, Access.RO)
                assert loop.served == 1
                with loop.lock:
                    assert loop.take_held() == [0]  # the desc entry
                    loop.load(array("Q", quad(rx.desc, Access.RO) + quad(rx.avail, Access.RO)))
                    answered = loop.answer(channel, back)
                    assert (answered.event, answered.update) == (MissEvent.ANSWERED, tuple(quad(rx.avail, Access.RO)))
                    assert loop.take_held() == [1] and loop.take_held() == []
                    times = loop.times()
                assert loop.served == 2 and len(times) == 2 and all(0 < t < 10**10 for t in times)
                os.write(stop_w, b"x")
                assert loop.run(channel, stop_r).event is MissEvent.STOPPED
            assert fcntl.fcntl(net.fileno(), fcntl.F_GETFL) == flags  # the shared file's flags are given back
            with pytest.raises(TimeoutError):
                net.read_iotlb(timeout=1)  # both answers landed: the device asks nothing more
            net.set_backend(RX, None)
        finally:
            os.close(stop_r)
            os.close(stop_w)
    framing = "V2" if acked else "V1"
    traced_reads = [(e["version"], e["type"], e["iova"]) for e in events if e["event"] == "iotlb.read"]
    traced_updates = [e["iova"] for e in events if e["event"] == "iotlb.write" and e["type"] == "UPDATE"]
    if traced:
        assert traced_reads == [(framing, "MISS", rx.desc), (framing, "MISS", rx.avail)]
        assert traced_updates == [used[0], quad(rx.desc, Access.RO)[0], quad(rx.avail, Access.RO)[0]]
    else:
        assert traced_reads == [] and traced_updates == []
