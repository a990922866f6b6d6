"""Device-layer errors, the fd's life cycle, and the checks made before any syscall.

/dev/null stands in for a device here only where no kernel answer matters: it
answers every ioctl with ENOTTY, so an InvalidArgument (rather than a
NotSupportedError) proves the call was refused before reaching the kernel.
"""

from __future__ import annotations

import errno
import os

import pytest
import structlog

from tests.sim import debug_logging
from vdpad.device import (
    Access, BackendFeature, CodecError, GuestRegion, InvalidArgument, IotlbMessage, IotlbWriteError,
    MessageType, NotSupportedError, Version, VhostError, VhostFd, VhostNet, VhostVdpa, VringAddr,
)
from vdpad.device.errors import ENOTSUPP, raise_for, strerror

NULL = "/dev/null"


@pytest.fixture
def events():
    with debug_logging(), structlog.testing.capture_logs() as captured:
        yield captured


# -- messages ----------------------------------------------------------------------------
def test_vhost_error_names_op_device_and_arguments():
    error = VhostError(errno.EINVAL, "SET_VRING_ADDR", "/dev/vhost-vdpa-0",
                       {"index": 12, "desc": 0x10000, "fd": 14, "features": 3})
    assert isinstance(error, OSError) and error.errno == errno.EINVAL
    assert str(error) == ("SET_VRING_ADDR(index=12, desc=0x10000, fd=14, features=0x3) on /dev/vhost-vdpa-0 "
                          "failed: Invalid argument")
    assert VhostError(errno.EPERM, "SET_OWNER", "/dev/x").args_shown == {}
    assert str(VhostError(errno.EPERM, "SET_OWNER", "/dev/x")) == "SET_OWNER on /dev/x failed: Operation not permitted"


@pytest.mark.parametrize("code, who", [(errno.ENOTTY, "this kernel"), (errno.EOPNOTSUPP, "this device")])
def test_not_supported(code, who):
    with pytest.raises(NotSupportedError) as raised:
        raise_for(code, "SUSPEND", "/dev/vhost-vdpa-3")
    assert raised.value.errno == code
    assert str(raised.value) == f"SUSPEND on /dev/vhost-vdpa-3: not supported by {who}"


def test_enotsupp_reads_as_what_it_means():
    """524 is the kernel's ENOTSUPP: Python knows no name for it ("Unknown error 524")."""
    assert "Unknown" in os.strerror(ENOTSUPP)  # why vdpad words it itself
    assert strerror(ENOTSUPP).startswith("not supported (the kernel's ENOTSUPP, 524")
    assert "not cache-coherent" in strerror(ENOTSUPP)
    with pytest.raises(NotSupportedError) as raised:
        raise_for(ENOTSUPP, "SET_STATUS", "/dev/vhost-vdpa-3", {"status": 0})
    assert raised.value.errno == ENOTSUPP
    assert str(raised.value) == "SET_STATUS(status=0) on /dev/vhost-vdpa-3: not supported by this device (ENOTSUPP)"
    assert "Unknown" not in str(VhostError(ENOTSUPP, "IOTLB UPDATE", "/dev/v"))


def test_an_open_refused_with_enotsupp_says_why(monkeypatch):
    """No IOMMU here can refuse an open (vhost-vdpa does it for one that is not cache-coherent): os.open stands in."""
    def refuse(path, flags, *args):
        raise OSError(ENOTSUPP, os.strerror(ENOTSUPP), path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError) as raised:
        VhostVdpa("/dev/vhost-vdpa-7")
    assert raised.value.errno == ENOTSUPP
    assert str(raised.value) == f"[Errno 524] cannot open /dev/vhost-vdpa-7: {strerror(ENOTSUPP)}"
    assert "Unknown error" not in str(raised.value)


def test_other_errnos_stay_vhost_errors():
    with pytest.raises(VhostError) as raised:
        raise_for(errno.EBUSY, "SET_FEATURES", "/dev/v", {"features": 1 << 33})
    assert type(raised.value) is VhostError and "features=0x200000000" in str(raised.value)


def test_iotlb_efault_explains_itself():
    assert "any IOTLB error" in str(IotlbWriteError(errno.EFAULT, "IOTLB UPDATE", "/dev/v", {"iova": 0}))
    assert "any IOTLB error" not in str(IotlbWriteError(errno.EINVAL, "IOTLB UPDATE", "/dev/v"))


def test_invalid_argument_says_nothing_was_sent():
    error = InvalidArgument("SET_VRING_NUM", "/dev/v", "num=3 is not a power of two")
    assert isinstance(error, ValueError)
    assert str(error) == "SET_VRING_NUM on /dev/v: num=3 is not a power of two (nothing was sent)"


# -- life cycle ----------------------------------------------------------------------------
def test_closed_exactly_once(events):
    fd = VhostFd(NULL)
    with fd:
        assert fd.fileno() >= 0 and not fd.closed
    assert fd.closed
    fd.close()
    assert [e["event"] for e in events] == ["close"]
    with pytest.raises(ValueError, match="/dev/null is closed"):
        fd.fileno()
    assert repr(fd) == "<VhostFd /dev/null closed>"


def test_open_failure_names_the_path():
    with pytest.raises(FileNotFoundError, match="cannot open /nonexistent/vhost-vdpa-9"):
        VhostVdpa("/nonexistent/vhost-vdpa-9")


# -- refused before the syscall ------------------------------------------------------------
def test_vhost_net_arguments(events):
    with VhostNet(NULL) as net:
        refused = [
            (lambda: net.set_vring_num(2, 256), "queue index 2 is out of range: the device has 2 virtqueues"),
            (lambda: net.set_vring_num(0, 0), "num=0 is not a power of two"),
            (lambda: net.set_vring_num(0, 48), "num=48 is not a power of two"),
            (lambda: net.set_vring_num(0, 1 << 16), "above the device's largest vring size 32768"),
            (lambda: net.set_vring_base(0, 1 << 32), "base=4294967296 does not fit in 32 bits"),
            (lambda: net.get_vring_base(-1), "index=-1 does not fit in 32 bits"),
            (lambda: net.set_vring_addr(0, VringAddr(desc=0x1008, avail=0, used=0)), "desc=0x1008 is not 16-byte aligned"),
            (lambda: net.set_vring_addr(0, VringAddr(desc=0, avail=1, used=0)), "avail=0x1 is not 2-byte aligned"),
            (lambda: net.set_vring_addr(0, VringAddr(desc=0, avail=0, used=2)), "used=0x2 is not 4-byte aligned"),
            (lambda: net.set_vring_addr(0, VringAddr(desc=0, avail=0, used=0, flags=2)), "only VHOST_VRING_F_LOG"),
            (lambda: net.set_vring_call(1, -2), "fd=-2 is not a file descriptor"),
            (lambda: net.set_backend(5, None), "queue index 5"),
            (lambda: net.set_features(-1), "does not fit in 64 bits"),
            (lambda: net.set_log_base(1 << 64), "does not fit in 64 bits"),
            (lambda: net.set_mem_table([GuestRegion(0x1000, 0, 0)]), "has no size"),
            (lambda: net.set_mem_table([GuestRegion((1 << 64) - 0x1000, 0x2000, 0)]), "64-bit guest-physical space"),
            (lambda: net.set_mem_table([GuestRegion(0, 0x2000, 0), GuestRegion(0x1000, 0x1000, 0)]), "overlap"),
        ]
        for call, problem in refused:
            with pytest.raises(InvalidArgument, match=problem):
                call()
    assert [e["event"] for e in events] == ["close"]


def test_iotlb_writes(events):
    with VhostNet(NULL) as net:
        update = IotlbMessage(MessageType.UPDATE, 0x1000, 0x1000, 0x7000, Access.RO, asid=1)
        with pytest.raises(InvalidArgument, match="asid=1 needs IOTLB_ASID acked first"):
            net.write_iotlb(update)
        with pytest.raises(InvalidArgument, match="BATCH_END needs IOTLB_BATCH acked first"):
            net.write_iotlb(IotlbMessage(MessageType.BATCH_END))
        with pytest.raises(InvalidArgument, match="^IOTLB UPDATE on /dev/null: UPDATE with size 0 covers nothing"):
            net.write_iotlb(IotlbMessage(MessageType.UPDATE, 0x1000, 0, 0x7000, Access.RO))
        assert events == []
        assert net.iotlb_version is Version.V1
        net.write_iotlb(IotlbMessage(MessageType.UPDATE, 0x1000, 0x1000, 0x7000, Access.RO))  # /dev/null takes it
    write = events[0]
    assert (write["event"], write["type"], write["iova"], write["perm"], write["device"]) == (
        "iotlb.write", "UPDATE", 0x1000, "RO", NULL)


def test_status_fits_a_byte():
    with VhostVdpa(NULL) as fd, pytest.raises(InvalidArgument, match="status=256 does not fit in 8 bits"):
        fd.set_status(0x100)


def test_every_ioctl_is_logged_with_its_errno(events):
    with VhostNet(NULL) as net:
        with pytest.raises(NotSupportedError):
            net.set_vring_num(1, 256)
        with pytest.raises(NotSupportedError):
            net.set_backend_features(BackendFeature.IOTLB_MSG_V2)
    assert net.acked_backend_features == BackendFeature(0)  # nothing acked when the kernel refused
    ioctls = [(e["op"], e.get("index"), e["errno"]) for e in events if e["event"] == "ioctl"]
    assert ioctls == [("SET_VRING_NUM", 1, "ENOTTY"), ("SET_BACKEND_FEATURES", None, "ENOTTY")]


def test_unreadable_message_is_logged_raw(events):
    with VhostNet(NULL) as net, pytest.raises(CodecError, match="0 bytes is too short"):
        net.read_iotlb(timeout=1)  # /dev/null reads as empty at once
    assert (events[0]["event"], events[0]["raw"]) == ("iotlb.read", "")
