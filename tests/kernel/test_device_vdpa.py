"""VhostVdpa against vdpa_sim: every method, and what the kernel answers to each."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import platform
import struct
import subprocess
from pathlib import Path

import pytest
import structlog

from tests.sim import debug_logging, sim_mode, vdpa_device
from vdpad._uapi import lib
from vdpad.device import (
    Access, BackendFeature, BlkFeature, DeviceStatus, InvalidArgument, IotlbMessage, IotlbWriteError,
    MessageType, NetFeature, NotSupportedError, VhostError, VhostVdpa, VirtioFeature, VringAddr,
)
from vdpad.iotlb import PAGE_SIZE, MemoryRegion
from vdpad.mgmt import Driver, NotFound, VdpaNetlink, attach, detach
from vdpad.mgmt.binding import holders

pytestmark = pytest.mark.kernel

U64 = (1 << 64) - 1
RING = 256
IOVA = 0x100000  # where the tests map their memory
VQ_SPAN = 3 * PAGE_SIZE  # one page each for desc, avail, used

SHAPES = {  # kernel-facts.md: what vdpa_sim builds
    "vdpasim_net": dict(device_id=1, vqs=3, groups=2, spaces=2, config_size=24, vq_groups=[0, 0, 1]),
    "vdpasim_blk": dict(device_id=2, vqs=1, groups=1, spaces=1, config_size=96, vq_groups=[0]),
}


def ring(index: int) -> VringAddr:
    base = IOVA + index * VQ_SPAN
    return VringAddr(desc=base, avail=base + PAGE_SIZE, used=base + 2 * PAGE_SIZE)


def kernel_config(option: str) -> str | None:
    """The running kernel's build option, from the config shipped beside its modules."""
    release = platform.release()
    config = Path("/lib/modules", release).resolve().parents[2] / "boot" / f"config-{release}"
    for line in config.read_text().splitlines():
        if line.startswith(f"{option}="):
            return line.split("=", 1)[1]
    return None


def ioctl_ops(logs: list[dict]) -> list[str]:
    return [event["op"] for event in logs if event["event"] == "ioctl"]


@pytest.fixture
def kernel_events():
    """Every ioctl and IOTLB message as a structlog event (loggers bind their level: open devices after)."""
    with debug_logging(), structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture(params=sorted(SHAPES))
def sim(request, sim_device):
    return sim_device(request.param), SHAPES[request.param]


@pytest.fixture
def memory():
    with MemoryRegion(16 * PAGE_SIZE, "test-device") as region:
        yield region


def start(fd: VhostVdpa, memory: MemoryRegion, acked: BackendFeature, ring_num: int = RING) -> None:
    """Bring an owned device to DRIVER_OK with every ring set up in mapped memory (no traffic)."""
    fd.set_backend_features(acked)
    fd.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    fd.set_features(fd.get_features())
    fd.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
    fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA, memory.size, memory.address, Access.RW))
    for index in range(fd.get_vqs_count()):
        fd.set_vring_num(index, ring_num)
        fd.set_vring_addr(index, ring(index))
        fd.set_vring_base(index, 3 + index)
        fd.set_vring_enable(index, True)
    fd.set_status(fd.get_status() | DeviceStatus.DRIVER_OK)


# -- identity and shape ------------------------------------------------------------
def test_shape(sim):
    dev, shape = sim
    with VhostVdpa(dev.node) as fd:
        # These are answered without ownership.
        assert fd.get_device_id() == shape["device_id"]
        assert fd.get_vqs_count() == shape["vqs"]
        assert fd.get_group_num() == shape["groups"]
        assert fd.get_as_num() == shape["spaces"]
        assert fd.get_config_size() == shape["config_size"]
        assert fd.get_vring_num() == RING
        # vdpa_sim maps through the owner's page tables: every IOVA is usable.
        iova_range = fd.get_iova_range()
        assert (iova_range.first, iova_range.last) == (0, U64)
        with pytest.raises(VhostError) as refused:
            fd.get_vring_group(0)
        assert refused.value.errno == errno.EPERM  # vring ioctls need an owner
        fd.set_owner()
        assert [fd.get_vring_group(i) for i in range(shape["vqs"])] == shape["vq_groups"]
    assert fd.closed
    with VhostVdpa(dev.node) as again:  # closing gave up ownership
        again.set_owner()


def test_features(sim):
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        offered = fd.get_features()
        assert offered & VirtioFeature.VERSION_1
        assert offered & VirtioFeature.ACCESS_PLATFORM
        backend = fd.get_backend_features()
        assert backend == (BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH | BackendFeature.IOTLB_ASID
                           | BackendFeature.SUSPEND | BackendFeature.RESUME
                           | BackendFeature.ENABLE_AFTER_DRIVER_OK | BackendFeature.IOTLB_PERSIST)
        with pytest.raises(NotSupportedError) as refused:
            fd.set_backend_features(backend | BackendFeature.DESC_ASID)
        assert refused.value.errno == errno.EOPNOTSUPP
        assert "SET_BACKEND_FEATURES" in str(refused.value) and "not supported by this device" in str(refused.value)
        assert fd.acked_backend_features == BackendFeature(0)  # a refused ack is not remembered
        fd.set_backend_features(backend)
        assert fd.acked_backend_features == backend


# -- config space ------------------------------------------------------------------
def vdpa_tool_config(name: str) -> dict:
    shown = subprocess.run(["vdpa", "-j", "dev", "config", "show", name], capture_output=True, text=True, check=True)
    # iproute2 6.1 prints some keys with a trailing space ("link "): compare by the bare name.
    return {key.strip(): value for key, value in json.loads(shown.stdout)["config"][name].items()}


def test_net_config(vdpa_net):
    with VhostVdpa(vdpa_net.node) as fd:
        fd.set_owner()
        features = fd.get_features()
        config = fd.get_config(0, 24)
        # virtio_net_config: mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu, ...
        mac, status, pairs, mtu = struct.unpack_from("<6sHHH", config)
        reported = vdpa_tool_config(vdpa_net.name)  # the same config, decoded by iproute2 over netlink
        assert mac.hex(":") == reported["mac"]
        assert bool(status & 1) == (reported["link"] == "up")
        assert mtu == reported["mtu"]
        if "max_vq_pairs" in reported:  # the kernel reports it only when MQ (or RSS) is offered
            assert pairs == reported["max_vq_pairs"]
        assert features & NetFeature.MAC and features & NetFeature.STATUS
        # A window reads the same bytes as the whole.
        assert fd.get_config(6, 2) == config[6:8]
        assert fd.get_config(23, 1) == config[23:]
        # The MAC is writable on vdpa_sim: the device keeps what it was given.
        new_mac = bytes.fromhex("020000c0ffee")
        fd.set_config(0, new_mac)
        assert fd.get_config(0, 6) == new_mac
        assert vdpa_tool_config(vdpa_net.name)["mac"] == new_mac.hex(":")


def test_blk_config(vdpa_blk):
    with VhostVdpa(vdpa_blk.node) as fd:
        fd.set_owner()
        features = fd.get_features()
        config = fd.get_config(0, fd.get_config_size())
        capacity, = struct.unpack_from("<Q", config, 0)  # in 512-byte sectors
        assert capacity > 0
        assert fd.get_config(0, 8) == config[:8]
        if features & BlkFeature.BLK_SIZE:
            blk_size, = struct.unpack_from("<I", config, 20)
            assert blk_size >= 512 and blk_size & (blk_size - 1) == 0


def test_config_refused_before_the_syscall(sim, kernel_events):
    dev, shape = sim
    size = shape["config_size"]
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        fd.get_config_size()  # the size is known from here on
        kernel_events.clear()
        for call in (lambda: fd.get_config(size - 2, 3), lambda: fd.get_config(0, 0),
                     lambda: fd.get_config(-1, 2), lambda: fd.set_config(size, b"\x00")):
            with pytest.raises(InvalidArgument, match=f"{size}-byte config space|must be positive"):
                call()
        assert kernel_events == []


def test_config_call(sim):
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        call = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            fd.set_config_call(call)
            fd.set_config_call(None)
            with pytest.raises(VhostError) as refused:
                fd.set_config_call(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))  # not an eventfd
            assert refused.value.errno == errno.EINVAL
            assert "SET_CONFIG_CALL(fd=" in str(refused.value)
        finally:
            os.close(call)


# -- status --------------------------------------------------------------------------
def test_status_transitions(sim):
    dev, _ = sim
    S = DeviceStatus
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        assert fd.get_status() == S.RESET
        fd.set_status(S.ACKNOWLEDGE)
        assert fd.get_status() == S.ACKNOWLEDGE
        fd.set_status(S.ACKNOWLEDGE | S.DRIVER)
        assert fd.get_status() == S.ACKNOWLEDGE | S.DRIVER
        offered = fd.get_features()
        with pytest.raises(VhostError) as refused:  # vdpa_sim needs the driver to map DMA itself
            fd.set_features(offered & ~VirtioFeature.ACCESS_PLATFORM)
        assert refused.value.errno == errno.EINVAL
        fd.set_features(offered)
        fd.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        assert fd.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
        with pytest.raises(VhostError) as refused:
            fd.set_features(offered)
        assert refused.value.errno == errno.EBUSY  # features are frozen once FEATURES_OK is set
        with pytest.raises(VhostError) as refused:
            fd.set_status(S.ACKNOWLEDGE)  # status bits are only ever added
        assert refused.value.errno == errno.EINVAL
        assert str(refused.value).startswith(f"SET_STATUS(status='ACKNOWLEDGE') on {dev.node} failed")
        with pytest.raises(InvalidArgument, match="does not fit in 8 bits"):
            fd.set_status(0x100)
        assert fd.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
        fd.set_status(S.RESET)
        assert fd.get_status() == S.RESET


# -- virtqueues ------------------------------------------------------------------------
def test_started_device_suspend_and_resume(sim, memory):
    dev, shape = sim
    acked = BackendFeature.IOTLB_MSG_V2 | BackendFeature.SUSPEND | BackendFeature.RESUME
    events = []
    with VhostVdpa(dev.node) as fd:
        try:
            fd.set_owner()
            for index in range(shape["vqs"]):
                kick, call, err = (os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3))
                events += [kick, call, err]
                fd.set_vring_kick(index, kick)
                fd.set_vring_call(index, call)
                fd.set_vring_err(index, err)
            start(fd, memory, acked)
            assert DeviceStatus.DRIVER_OK in fd.get_status() and not fd.suspended
            fd.suspend()
            assert fd.suspended
            # The bases given before DRIVER_OK, read back from the device.
            assert [fd.get_vring_base(i) for i in range(shape["vqs"])] == [3 + i for i in range(shape["vqs"])]
            fd.set_vring_base(0, 40)  # a suspended device takes a new state...
            assert fd.get_vring_base(0) == 40
            fd.resume()
            assert not fd.suspended
            assert DeviceStatus.DRIVER_OK in fd.get_status()
            fd.set_vring_enable(0, False)  # ENABLE_AFTER_DRIVER_OK is offered
            for index in range(shape["vqs"]):
                fd.set_vring_kick(index, None)
                fd.set_vring_call(index, None)
                fd.set_vring_err(index, None)
            fd.set_status(0)
            assert fd.get_status() == DeviceStatus.RESET
        finally:
            for event in events:
                os.close(event)


def test_vring_sizes_and_descriptor_groups(sim):
    dev, shape = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        fd.set_backend_features(fd.get_backend_features())
        for index in range(shape["vqs"]):
            # vdpa_sim on 6.12 has no descriptor groups (get_vq_desc_group), and
            # answers the ring size only without batch mapping (its default is on).
            with pytest.raises(NotSupportedError, match=rf"GET_VRING_SIZE\(index={index}\) .*not supported by this device"):
                fd.get_vring_size(index)
            with pytest.raises(NotSupportedError) as refused:
                fd.get_vring_desc_group(index)
            assert refused.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("mgmtdev", sorted(SHAPES))
def test_vring_size_without_batch_mapping(sim_modules, mgmtdev, memory):
    with sim_mode(batch_mapping=False), vdpa_device(f"size{os.getpid() % 1000}", mgmtdev) as node, VhostVdpa(node) as fd:
        fd.set_owner()
        vqs = fd.get_vqs_count()
        # Before DRIVER_OK each queue offers the device's largest ring; after, the size in use.
        assert [fd.get_vring_size(i) for i in range(vqs)] == [fd.get_vring_num()] * vqs
        start(fd, memory, BackendFeature.IOTLB_MSG_V2, ring_num=64)
        assert [fd.get_vring_size(i) for i in range(vqs)] == [64] * vqs
        fd.set_status(0)


def raw_ioctl(fd: VhostVdpa, request: int, arg: bytes) -> bytes:
    """The ioctl without the device layer: what vhost-vdpa answers to calls VhostVdpa does not offer."""
    buffer = bytearray(arg)
    fcntl.ioctl(fd.fileno(), request, buffer)
    return bytes(buffer)


def vring_state(index: int, num: int = 0) -> bytes:
    return struct.pack("=II", index, num)  # struct vhost_vring_state


def test_no_vring_endian(sim):
    """VhostVdpa has no endian methods: vhost-vdpa devices are modern (little-endian) only."""
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        for request in (lib.VHOST_SET_VRING_ENDIAN, lib.VHOST_GET_VRING_ENDIAN):
            if kernel_config("CONFIG_VHOST_CROSS_ENDIAN_LEGACY") == "y":
                raw_ioctl(fd, request, vring_state(0, lib.VHOST_VRING_LITTLE_ENDIAN))
            else:
                with pytest.raises(OSError) as refused:
                    raw_ioctl(fd, request, vring_state(0, lib.VHOST_VRING_LITTLE_ENDIAN))
                assert refused.value.errno == errno.ENOTTY


def test_busyloop_timeout_is_stored_and_unused(sim):
    """VhostVdpa has no busyloop methods: vhost core keeps the value, but only vhost-net's worker polls."""
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        raw_ioctl(fd, lib.VHOST_SET_VRING_BUSYLOOP_TIMEOUT, vring_state(0, 50))
        assert raw_ioctl(fd, lib.VHOST_GET_VRING_BUSYLOOP_TIMEOUT, vring_state(0)) == vring_state(0, 50)


def test_no_dirty_log(sim):
    """VhostVdpa has no log methods: vhost-vdpa leaves dirty tracking to the device, and refuses the ioctls."""
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        for request, arg in ((lib.VHOST_SET_LOG_BASE, struct.pack("=Q", 0x1000)),
                             (lib.VHOST_SET_LOG_FD, struct.pack("=i", -1))):
            with pytest.raises(OSError) as refused:
                raw_ioctl(fd, request, arg)
            assert refused.value.errno == errno.ENOTTY


def test_an_fd_dropped_open_is_closed_so_detach_succeeds(sim_modules):
    """Without the owner's close on collection the node would stay open and detach be refused (or hang)."""
    name = f"drop{os.getpid() % 1000}"
    with VdpaNetlink() as nl:
        node = attach(nl, name, "vdpasim_net", driver=Driver.VHOST_VDPA).binding.node
        try:
            fd = VhostVdpa(node)
            fd.set_owner()
            assert os.getpid() in holders(node)
            with pytest.warns(ResourceWarning, match=f"unclosed VhostVdpa {node}"):
                del fd
                gc.collect()
            assert holders(node) == []
            detach(nl, name)
            with pytest.raises(NotFound):
                nl.device(name)
        finally:
            with contextlib.suppress(NotFound):
                detach(nl, name)


def test_vring_arguments_refused_before_the_syscall(sim, kernel_events):
    dev, shape = sim
    vqs = shape["vqs"]
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        kernel_events.clear()
        refused = [
            (lambda: fd.set_vring_num(vqs, RING), f"queue index {vqs} is out of range: the device has {vqs} virtqueues"),
            (lambda: fd.get_vring_base(vqs), "out of range"),
            (lambda: fd.set_vring_kick(vqs, None), "out of range"),
            (lambda: fd.set_vring_enable(-1, True), "does not fit in 32 bits"),
            (lambda: fd.get_vring_group(vqs + 5), "out of range"),
            (lambda: fd.set_vring_num(0, 100), "num=100 is not a power of two"),
            (lambda: fd.set_vring_num(0, 2 * RING), f"num={2 * RING} is above the device's largest vring size {RING}"),
            (lambda: fd.set_vring_addr(0, VringAddr(desc=IOVA + 8, avail=IOVA, used=IOVA)), "not 16-byte aligned"),
            (lambda: fd.set_vring_kick(0, -5), "not a file descriptor"),
            (lambda: fd.set_group_asid(shape["groups"], 0), f"group={shape['groups']} is out of range"),
            (lambda: fd.set_group_asid(0, shape["spaces"]), f"asid={shape['spaces']} is out of range"),
        ]
        for call, problem in refused:
            with pytest.raises(InvalidArgument, match=problem) as error:
                call()
            assert "nothing was sent" in str(error.value) and str(dev.node) in str(error.value)
        # Only the one-time shape queries reached the kernel.
        assert set(ioctl_ops(kernel_events)) == {"GET_VQS_COUNT", "GET_VRING_NUM", "GET_GROUP_NUM", "GET_AS_NUM"}
        assert len(kernel_events) == 4  # each asked once


# -- the IOTLB -----------------------------------------------------------------------------
def test_update_then_invalidate(sim, memory):
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        fd.set_backend_features(BackendFeature.IOTLB_MSG_V2)
        update = IotlbMessage(MessageType.UPDATE, IOVA, memory.size, memory.address, Access.RW)
        # The 1:1 passthrough map covers everything: the first UPDATE replaces it.
        fd.write_iotlb(update)
        with pytest.raises(IotlbWriteError) as refused:
            fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA + PAGE_SIZE, PAGE_SIZE, memory.address, Access.RO))
        assert refused.value.errno == errno.EFAULT
        text = str(refused.value)
        assert text.startswith(f"IOTLB UPDATE(iova={IOVA + PAGE_SIZE:#x}, size={PAGE_SIZE:#x}, uaddr={memory.address:#x}, perm='RO'")
        assert str(dev.node) in text and "overlap" in text
        fd.write_iotlb(IotlbMessage(MessageType.INVALIDATE, IOVA, memory.size))
        fd.write_iotlb(update)  # accepted again: the INVALIDATE emptied the range


def test_batch(sim, memory):
    dev, _ = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        fd.set_backend_features(BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH)
        half = memory.size // 2
        fd.write_iotlb(IotlbMessage(MessageType.BATCH_BEGIN))
        fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA, half, memory.address, Access.RO))
        fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA + half, half, memory.address + half, Access.RW))
        fd.write_iotlb(IotlbMessage(MessageType.BATCH_END))
        with pytest.raises(IotlbWriteError):
            fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA + half, PAGE_SIZE, memory.address, Access.RW))


def test_address_spaces(vdpa_net, memory):
    with VhostVdpa(vdpa_net.node) as fd:
        fd.set_owner()
        fd.set_backend_features(BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_ASID)
        cvq = 2
        assert fd.get_vring_group(cvq) == 1
        fd.set_group_asid(1, 1)
        update = IotlbMessage(MessageType.UPDATE, IOVA, memory.size, memory.address, Access.RW)
        fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA, memory.size, memory.address, Access.RW, asid=1))
        fd.write_iotlb(update)  # the same IOVAs in AS 0: a separate map, no overlap
        with pytest.raises(IotlbWriteError) as refused:  # ...but AS 1 holds them now
            fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA, PAGE_SIZE, memory.address, Access.RO, asid=1))
        assert "asid=1" in str(refused.value)
        fd.write_iotlb(IotlbMessage(MessageType.INVALIDATE, IOVA, memory.size, asid=1))


def test_iotlb_refused_before_the_write(sim, memory, kernel_events):
    dev, shape = sim
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        fd.set_backend_features(BackendFeature.IOTLB_MSG_V2)
        M = MessageType
        refused = [
            (IotlbMessage(M.UPDATE, IOVA, 0, memory.address, Access.RW), "size 0 covers nothing"),
            (IotlbMessage(M.UPDATE, U64 - PAGE_SIZE + 2, PAGE_SIZE, memory.address, Access.RW), "runs past the end"),
            (IotlbMessage(M.UPDATE, IOVA, PAGE_SIZE, memory.address, Access.NONE), "UPDATE needs perm RO, WO or RW"),
            (IotlbMessage(M.INVALIDATE, IOVA, PAGE_SIZE, perm=Access.RO), "INVALIDATE takes no perm"),
            (IotlbMessage(M.MISS, IOVA, PAGE_SIZE), "MISS is not a message userspace writes"),
            (IotlbMessage(M.BATCH_BEGIN), "BATCH_BEGIN needs IOTLB_BATCH acked first"),
            (IotlbMessage(M.UPDATE, IOVA, PAGE_SIZE, memory.address, Access.RW, asid=1), "asid=1 needs IOTLB_ASID acked first"),
        ]
        for message, problem in refused:
            with pytest.raises(InvalidArgument, match=problem) as error:
                fd.write_iotlb(message)
            assert str(error.value).startswith(f"IOTLB {message.type.name} on {dev.node}")
        fd.set_backend_features(BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_ASID)
        with pytest.raises(InvalidArgument, match=f"asid={shape['spaces']} is out of range"):
            fd.write_iotlb(IotlbMessage(M.UPDATE, IOVA, PAGE_SIZE, memory.address, Access.RW, asid=shape["spaces"]))
        assert [e for e in kernel_events if e["event"] == "iotlb.write"] == []
        # What the pre-checks spare the user: the kernel's bare errnos for the same messages.
        for message, kernel_errno in ((IotlbMessage(M.UPDATE, IOVA, 0, memory.address, Access.RW), errno.EINVAL),
                                      (IotlbMessage(M.MISS, IOVA, PAGE_SIZE), errno.EFAULT)):
            with pytest.raises(OSError) as bare:
                os.write(fd.fileno(), message.encode())
            assert bare.value.errno == kernel_errno


def test_every_kernel_call_is_logged(vdpa_blk, memory, kernel_events):
    with VhostVdpa(vdpa_blk.node) as fd:
        fd.set_owner()
        fd.set_backend_features(BackendFeature.IOTLB_MSG_V2)
        fd.write_iotlb(IotlbMessage(MessageType.UPDATE, IOVA, PAGE_SIZE, memory.address, Access.RO))
        fd.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        with pytest.raises(VhostError):
            fd.set_status(DeviceStatus.ACKNOWLEDGE)
    events = [(e["event"], e.get("op", e.get("type")), e.get("errno")) for e in kernel_events]
    assert events == [
        ("ioctl", "SET_OWNER", None),
        ("ioctl", "SET_BACKEND_FEATURES", None),
        ("ioctl", "GET_AS_NUM", None),  # asked once, for the checks before any write
        ("ioctl", "GET_IOVA_RANGE", None),
        ("iotlb.write", "UPDATE", None),
        ("ioctl", "SET_STATUS", None),
        ("ioctl", "SET_STATUS", "EINVAL"),
        ("close", None, None),
    ]
    assert all(e["device"] == str(vdpa_blk.node) for e in kernel_events)


def test_suspend_before_driver_ok_suspends_nothing(vdpa_net):
    """vhost-vdpa answers 0 to SUSPEND before DRIVER_OK and suspends nothing: `suspended` says so."""
    with VhostVdpa(vdpa_net.node) as fd:
        fd.set_owner()
        fd.set_backend_features(BackendFeature.SUSPEND | BackendFeature.RESUME)
        fd.suspend()
        assert not fd.suspended
