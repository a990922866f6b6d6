"""The vring ioctls: those every vhost device serves, and legacy endianness and busy polling, which only some do."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vdpad._uapi import ffi, lib
from vdpad.device.core import U64, FdCore

# vhost core takes a ring size up to 0xffff that is a power of two.
LARGEST_VRING_NUM = 1 << 15


@dataclass(frozen=True)
class VringAddr:
    """Userspace addresses (IOVAs where an IOTLB is used) of one vring's parts."""

    desc: int
    used: int
    avail: int
    log: int = 0
    flags: int = 0


class VringEndian(enum.IntEnum):
    """Byte order of a legacy (pre-VERSION_1) ring."""

    LITTLE = lib.VHOST_VRING_LITTLE_ENDIAN
    BIG = lib.VHOST_VRING_BIG_ENDIAN


# Split-ring alignment (virtio spec 2.7); the kernel refuses others with EINVAL.
_ALIGNMENT = (("desc", 16), ("avail", 2), ("used", 4), ("log", 4))


class Vrings(FdCore):
    """What every vhost fd kind serves for its rings: size, base, addresses, eventfds."""

    def _vring_num_limit(self) -> int:
        return LARGEST_VRING_NUM

    def set_vring_num(self, index: int, num: int) -> None:
        op = "SET_VRING_NUM"
        self._check_vq(op, index)
        if num <= 0 or num & (num - 1):
            self._refuse(op, f"num={num} is not a power of two")
        limit = self._vring_num_limit()
        if num > limit:
            self._refuse(op, f"num={num} is above the device's largest vring size {limit}")
        self._vring_state(op, lib.VHOST_SET_VRING_NUM, index, num, num=num)

    def set_vring_base(self, index: int, base: int) -> None:
        """The next available index the device reads (split rings: a u16)."""
        self._check_vq("SET_VRING_BASE", index)
        self._check_u32("SET_VRING_BASE", base=base)
        self._vring_state("SET_VRING_BASE", lib.VHOST_SET_VRING_BASE, index, base, base=base)

    def get_vring_base(self, index: int) -> int:
        self._check_vq("GET_VRING_BASE", index)
        return self._vring_state("GET_VRING_BASE", lib.VHOST_GET_VRING_BASE, index)

    def set_vring_addr(self, index: int, addr: VringAddr) -> None:
        op = "SET_VRING_ADDR"
        self._check_vq(op, index)
        for name, align in _ALIGNMENT:
            value = getattr(addr, name)
            if not 0 <= value <= U64:
                self._refuse(op, f"{name}={value!r} does not fit in 64 bits")
            if value % align:
                self._refuse(op, f"{name}={value:#x} is not {align}-byte aligned")
        if addr.flags & ~(1 << lib.VHOST_VRING_F_LOG):
            self._refuse(op, f"flags={addr.flags:#x}: only VHOST_VRING_F_LOG ({1 << lib.VHOST_VRING_F_LOG:#x}) exists")
        raw = ffi.new("struct vhost_vring_addr *", {
            "index": index, "flags": addr.flags, "desc_user_addr": addr.desc,
            "used_user_addr": addr.used, "avail_user_addr": addr.avail, "log_guest_addr": addr.log})
        self._ioctl(op, lib.VHOST_SET_VRING_ADDR, raw, index=index,
                    desc=addr.desc, avail=addr.avail, used=addr.used, log=addr.log, flags=addr.flags)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the driver signals; None unbinds."""
        self._check_vq("SET_VRING_KICK", index)
        self._vring_file("SET_VRING_KICK", lib.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the device signals; None unbinds."""
        self._check_vq("SET_VRING_CALL", index)
        self._vring_file("SET_VRING_CALL", lib.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """The eventfd the device signals when it cannot use the ring; None unbinds."""
        self._check_vq("SET_VRING_ERR", index)
        self._vring_file("SET_VRING_ERR", lib.VHOST_SET_VRING_ERR, index, fd)


class LegacyEndian(FdCore):
    """The byte order of legacy rings: vhost core devices on kernels with cross-endian legacy support.

    vhost-vdpa serves modern (VERSION_1, little-endian) devices only.
    """

    def set_vring_endian(self, index: int, endian: VringEndian) -> None:
        """Only kernels built with cross-endian legacy support know this (ENOTTY otherwise)."""
        op = "SET_VRING_ENDIAN"
        self._check_vq(op, index)
        value = VringEndian(endian)
        self._vring_state(op, lib.VHOST_SET_VRING_ENDIAN, index, value, endian=value.name)

    def get_vring_endian(self, index: int) -> VringEndian:
        self._check_vq("GET_VRING_ENDIAN", index)
        return VringEndian(self._vring_state("GET_VRING_ENDIAN", lib.VHOST_GET_VRING_ENDIAN, index))


class Busyloop(FdCore):
    """How long vhost-net's worker polls a ring before it sleeps (vhost core stores it; only vhost-net reads it)."""

    def set_vring_busyloop_timeout(self, index: int, microseconds: int) -> None:
        """How long the worker polls the ring before sleeping."""
        op = "SET_VRING_BUSYLOOP_TIMEOUT"
        self._check_vq(op, index)
        self._check_u32(op, microseconds=microseconds)
        self._vring_state(op, lib.VHOST_SET_VRING_BUSYLOOP_TIMEOUT, index, microseconds, timeout=microseconds)

    def get_vring_busyloop_timeout(self, index: int) -> int:
        op = "GET_VRING_BUSYLOOP_TIMEOUT"
        self._check_vq(op, index)
        return self._vring_state(op, lib.VHOST_GET_VRING_BUSYLOOP_TIMEOUT, index)
