"""/dev/vhost-vdpa-N: a vDPA device driven from userspace."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vdpad._uapi import ffi, lib
from vdpad.device.fd import VhostFd
from vdpad.device.flags import DeviceStatus, describe

T = TypeVar("T")


@dataclass(frozen=True)
class IovaRange:
    """The IOVAs the device can map, both ends inclusive."""

    first: int
    last: int


class VhostVdpa(VhostFd):
    """Typed vhost-vdpa ioctls. No policy: each method is one kernel call.

    What the device is made of (virtqueues, groups, address spaces, config
    size, largest ring, IOVA range) never changes while it exists: each is
    asked once, when a check first needs it, so bad arguments are refused
    before the syscall.
    """

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self._shape: dict[str, Any] = {}
        self._suspended = False

    def _known(self, name: str, ask: Callable[[], T]) -> T:
        if name not in self._shape:
            self._shape[name] = ask()
        return self._shape[name]

    def _remember(self, name: str, value: T) -> T:
        self._shape[name] = value
        return value

    # -- identity and shape ----------------------------------------------
    def get_device_id(self) -> int:
        return self._get_u32("GET_DEVICE_ID", lib.VHOST_VDPA_GET_DEVICE_ID)

    def get_config_size(self) -> int:
        return self._remember("config_size", self._get_u32("GET_CONFIG_SIZE", lib.VHOST_VDPA_GET_CONFIG_SIZE))

    def get_vqs_count(self) -> int:
        return self._remember("vqs", self._get_u32("GET_VQS_COUNT", lib.VHOST_VDPA_GET_VQS_COUNT))

    def get_group_num(self) -> int:
        return self._remember("groups", self._get_u32("GET_GROUP_NUM", lib.VHOST_VDPA_GET_GROUP_NUM))

    def get_as_num(self) -> int:
        return self._remember("address_spaces", self._get_u32("GET_AS_NUM", lib.VHOST_VDPA_GET_AS_NUM))

    def get_vring_num(self) -> int:
        """The largest vring size the device supports."""
        value = ffi.new("uint16_t *")
        self._ioctl("GET_VRING_NUM", lib.VHOST_VDPA_GET_VRING_NUM, value)
        return self._remember("vring_num", value[0])

    def get_iova_range(self) -> IovaRange:
        value = ffi.new("struct vhost_vdpa_iova_range *")
        self._ioctl("GET_IOVA_RANGE", lib.VHOST_VDPA_GET_IOVA_RANGE, value)
        return self._remember("iova_range", IovaRange(value.first, value.last))

    def _vq_limit(self) -> int:
        return self._known("vqs", self.get_vqs_count)

    def _vring_num_limit(self) -> int:
        return self._known("vring_num", self.get_vring_num)

    # -- status --------------------------------------------------------------
    def get_status(self) -> DeviceStatus:
        value = ffi.new("uint8_t *")
        self._ioctl("GET_STATUS", lib.VHOST_VDPA_GET_STATUS, value)
        return DeviceStatus(value[0])

    def set_status(self, status: DeviceStatus | int) -> None:
        """Bits may only be added; 0 resets the device."""
        if not 0 <= int(status) <= 0xFF:
            self._refuse("SET_STATUS", f"status={int(status)!r} does not fit in 8 bits")
        self._ioctl("SET_STATUS", lib.VHOST_VDPA_SET_STATUS, ffi.new("uint8_t *", int(status)),
                    status="|".join(describe(int(status), DeviceStatus)) or "RESET")
        if not status:
            self._suspended = False  # a reset leaves the device stopped, not suspended

    def suspend(self) -> None:
        """Stop the rings, keeping their state (needs SUSPEND offered)."""
        self._ioctl("SUSPEND", lib.VHOST_VDPA_SUSPEND)
        # vhost-vdpa answers 0 and suspends nothing before DRIVER_OK (kernel-notes.md).
        self._suspended = DeviceStatus.DRIVER_OK in self.get_status()

    def resume(self) -> None:
        """Restart the rings after suspend (needs RESUME offered)."""
        self._ioctl("RESUME", lib.VHOST_VDPA_RESUME)
        self._suspended = False

    @property
    def suspended(self) -> bool:
        """Suspended through this fd and not resumed or reset since (the kernel has no getter)."""
        return self._suspended

    # -- config space ----------------------------------------------------------
    def _check_config(self, op: str, offset: int, length: int) -> None:
        size = self._known("config_size", self.get_config_size)
        if length <= 0:
            self._refuse(op, f"length={length} must be positive")
        if offset < 0 or offset + length > size:
            self._refuse(op, f"offset={offset} length={length} runs outside the {size}-byte config space")

    def get_config(self, offset: int, length: int) -> bytes:
        self._check_config("GET_CONFIG", offset, length)
        config = ffi.new("struct vhost_vdpa_config *", {"off": offset, "len": length, "buf": [0] * length})
        self._ioctl("GET_CONFIG", lib.VHOST_VDPA_GET_CONFIG, config, offset=offset, length=length)
        return bytes(ffi.buffer(config.buf, length))

    def set_config(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        self._check_config("SET_CONFIG", offset, len(data))
        config = ffi.new("struct vhost_vdpa_config *", {"off": offset, "len": len(data), "buf": list(data)})
        self._ioctl("SET_CONFIG", lib.VHOST_VDPA_SET_CONFIG, config, offset=offset, data=data.hex())

    def set_config_call(self, fd: int | None) -> None:
        """The eventfd signalled when the config space changes; None unbinds."""
        self._set_fd("SET_CONFIG_CALL", lib.VHOST_VDPA_SET_CONFIG_CALL, fd)

    # -- virtqueues, groups, address spaces ------------------------------------
    def set_vring_enable(self, index: int, enabled: bool) -> None:
        self._check_vq("SET_VRING_ENABLE", index)
        self._vring_state("SET_VRING_ENABLE", lib.VHOST_VDPA_SET_VRING_ENABLE, index, int(bool(enabled)),
                          enabled=bool(enabled))

    def get_vring_size(self, index: int) -> int:
        """This virtqueue's largest ring size."""
        self._check_vq("GET_VRING_SIZE", index)
        return self._vring_state("GET_VRING_SIZE", lib.VHOST_VDPA_GET_VRING_SIZE, index)

    def get_vring_group(self, index: int) -> int:
        """The group the virtqueue belongs to; a group shares one address space."""
        self._check_vq("GET_VRING_GROUP", index)
        return self._vring_state("GET_VRING_GROUP", lib.VHOST_VDPA_GET_VRING_GROUP, index)

    def get_vring_desc_group(self, index: int) -> int:
        """The group of the virtqueue's descriptor table (needs DESC_ASID acked)."""
        self._check_vq("GET_VRING_DESC_GROUP", index)
        return self._vring_state("GET_VRING_DESC_GROUP", lib.VHOST_VDPA_GET_VRING_DESC_GROUP, index)

    def set_group_asid(self, group: int, asid: int) -> None:
        """Put a virtqueue group into an address space."""
        op = "SET_GROUP_ASID"
        groups = self._known("groups", self.get_group_num)
        spaces = self._known("address_spaces", self.get_as_num)
        if not 0 <= group < groups:
            self._refuse(op, f"group={group} is out of range: the device has {groups} groups")
        if not 0 <= asid < spaces:
            self._refuse(op, f"asid={asid} is out of range: the device has {spaces} address spaces")
        self._vring_state(op, lib.VHOST_VDPA_SET_GROUP_ASID, group, asid, index_name="group", asid=asid)

    def _iotlb_window(self, op: str, asid: int) -> tuple[int, int]:
        limits = self._shape.get("iotlb_limits")  # asked on every write: one lookup once known
        if limits is None:
            spaces = self._known("address_spaces", self.get_as_num)
            window = self._known("iova_range", self.get_iova_range)
            limits = self._remember("iotlb_limits", (spaces, (window.first, window.last)))
        spaces, window = limits
        if asid >= spaces:
            self._refuse(op, f"asid={asid} is out of range: the device has {spaces} address spaces")
        return window
