"""/dev/vhost-net: the kernel's virtio-net backend, fed by a tap device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vdpad._uapi import ffi, lib
from vdpad.device.core import U64
from vdpad.device.fd import DirtyLog, VhostFd
from vdpad.device.iotlb_io import IotlbReader
from vdpad.device.vring import Busyloop, LegacyEndian

# vhost-net has exactly two virtqueues: 0 receives, 1 transmits.
RX, TX = 0, 1
VHOST_NET_VQS = 2


@dataclass(frozen=True)
class GuestRegion:
    """One entry of the memory table: guest-physical [gpa, gpa+size) lives at uaddr."""

    guest_phys_addr: int
    size: int
    userspace_addr: int

    @property
    def last(self) -> int:
        return self.guest_phys_addr + self.size - 1


class VhostNet(VhostFd, DirtyLog, LegacyEndian, Busyloop, IotlbReader):
    """Typed vhost-net ioctls: vhost core's dirty log, legacy endianness and busy polling,
    and its device IOTLB (readable once ACCESS_PLATFORM is acked)."""

    def _vq_limit(self) -> int:
        return VHOST_NET_VQS

    def reset_owner(self) -> None:
        """Give up ownership: stop the rings and drop the memory table (vhost-vdpa has no such ioctl)."""
        self._ioctl("RESET_OWNER", lib.VHOST_RESET_OWNER)

    def set_mem_table(self, regions: Sequence[GuestRegion]) -> None:
        """Guest-physical to userspace translation, used while ACCESS_PLATFORM is not acked.

        vhost checks rings against a table even when a device IOTLB translates:
        set one (it may be empty) before attaching a backend.
        """
        op = "SET_MEM_TABLE"
        ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
        for region in ordered:
            if region.size <= 0:
                self._refuse(op, f"{region} has no size")
            if region.guest_phys_addr < 0 or region.last > U64:
                self._refuse(op, f"{region} runs past the end of the 64-bit guest-physical space")
            if region.userspace_addr < 0 or region.userspace_addr + region.size - 1 > U64:
                self._refuse(op, f"{region} runs past the end of the address space")
        for before, after in zip(ordered, ordered[1:]):
            if after.guest_phys_addr <= before.last:
                self._refuse(op, f"{before} and {after} overlap")
        table = ffi.new("struct vhost_memory *", {
            "nregions": len(ordered),
            "regions": [{"guest_phys_addr": r.guest_phys_addr, "memory_size": r.size,
                         "userspace_addr": r.userspace_addr} for r in ordered]})
        self._ioctl(op, lib.VHOST_SET_MEM_TABLE, table,
                    regions=[(hex(r.guest_phys_addr), hex(r.size), hex(r.userspace_addr)) for r in ordered])

    def set_backend(self, index: int, tap_fd: int | None) -> None:
        """Attach the virtqueue to a tap (or packet) socket's fd; None detaches."""
        self._check_vq("NET_SET_BACKEND", index)
        self._vring_file("NET_SET_BACKEND", lib.VHOST_NET_SET_BACKEND, index, tap_fd)
