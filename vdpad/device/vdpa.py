"""/dev/vhost-vdpa-N: a vDPA device driven from userspace."""

from __future__ import annotations

from dataclasses import dataclass

from vdpad._uapi import ffi, lib
from vdpad.device.errors import InvalidArgument
from vdpad.device.fd import VhostFd
from vdpad.device.flags import DeviceStatus


@dataclass(frozen=True)
class IovaRange:
    """The IOVAs the device can map, both ends inclusive."""

    first: int
    last: int

    def __contains__(self, span: tuple[int, int]) -> bool:
        iova, size = span
        return size > 0 and self.first <= iova and iova + size - 1 <= self.last


class VhostVdpa(VhostFd):
    """Typed vhost-vdpa ioctls. No policy: each method is one kernel call."""

    def get_device_id(self) -> int:
        value = ffi.new("uint32_t *")
        self._ioctl("GET_DEVICE_ID", lib.VHOST_VDPA_GET_DEVICE_ID, value)
        return value[0]

    def get_status(self) -> DeviceStatus:
        value = ffi.new("uint8_t *")
        self._ioctl("GET_STATUS", lib.VHOST_VDPA_GET_STATUS, value)
        return DeviceStatus(value[0])

    def set_status(self, status: DeviceStatus | int) -> None:
        if not 0 <= int(status) <= 0xFF:
            raise InvalidArgument("SET_STATUS", self.path, f"status={int(status)!r} does not fit in 8 bits")
        self._ioctl("SET_STATUS", lib.VHOST_VDPA_SET_STATUS, ffi.new("uint8_t *", int(status)),
                    status=str(DeviceStatus(int(status))))

    def get_config_size(self) -> int:
        return self._get_u32("GET_CONFIG_SIZE", lib.VHOST_VDPA_GET_CONFIG_SIZE)

    def get_vqs_count(self) -> int:
        return self._get_u32("GET_VQS_COUNT", lib.VHOST_VDPA_GET_VQS_COUNT)

    def get_group_num(self) -> int:
        return self._get_u32("GET_GROUP_NUM", lib.VHOST_VDPA_GET_GROUP_NUM)

    def get_as_num(self) -> int:
        return self._get_u32("GET_AS_NUM", lib.VHOST_VDPA_GET_AS_NUM)

    def get_vring_num(self) -> int:
        """The largest vring size the device supports."""
        value = ffi.new("uint16_t *")
        self._ioctl("GET_VRING_NUM", lib.VHOST_VDPA_GET_VRING_NUM, value)
        return value[0]

    def get_vring_group(self, index: int) -> int:
        """The virtqueue group vq `index` belongs to."""
        return self._vring_state("GET_VRING_GROUP", lib.VHOST_VDPA_GET_VRING_GROUP, index, 0)

    def set_group_asid(self, group: int, asid: int) -> None:
        """Make the vqs of `group` translate through address space `asid`."""
        self._vring_state("SET_GROUP_ASID", lib.VHOST_VDPA_SET_GROUP_ASID, group, asid, asid=asid)

    def get_iova_range(self) -> IovaRange:
        value = ffi.new("struct vhost_vdpa_iova_range *")
        self._ioctl("GET_IOVA_RANGE", lib.VHOST_VDPA_GET_IOVA_RANGE, value)
        return IovaRange(value.first, value.last)

    def _get_u32(self, op: str, request: int) -> int:
        value = ffi.new("uint32_t *")
        self._ioctl(op, request, value)
        return value[0]
