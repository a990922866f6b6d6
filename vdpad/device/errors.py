"""Errors of the device layer: each names the operation, the device and the arguments."""

from __future__ import annotations

import errno as _errno
import os


# The kernel's own ENOTSUPP (include/linux/errno.h), which userspace headers and Python do not name.
# vhost-vdpa's open answers it when the parent's DMA sits behind an IOMMU that is not cache-coherent.
ENOTSUPP = 524
_STRERROR = {ENOTSUPP: "not supported (the kernel's ENOTSUPP, 524: for a vhost-vdpa open, the device sits "
                       "behind an IOMMU that is not cache-coherent)"}


def strerror(errno: int) -> str:
    """os.strerror, with words for the kernel-internal errnos that reach userspace ("Unknown error 524")."""
    return _STRERROR.get(errno) or os.strerror(errno)


# Addresses, sizes and bit masks read best in hex; indexes, fds and counts in decimal.
_HEX = frozenset({"iova", "size", "uaddr", "desc", "avail", "used", "log", "address", "features", "flags"})


def _describe(op: str, device: str, args: dict[str, object]) -> str:
    shown = ", ".join(f"{k}={_show(k, v)}" for k, v in args.items())
    return f"{op}({shown}) on {device}" if shown else f"{op} on {device}"


def _show(name: str, value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value) if name in _HEX else str(int(value))
    return repr(value)


class VhostError(OSError):
    """An ioctl or IOTLB write the kernel refused."""

    def __init__(self, errno: int, op: str, device: str, args: dict[str, object] | None = None):
        self.op, self.device, self.args_shown = op, device, dict(args or {})
        super().__init__(errno, f"{_describe(op, device, self.args_shown)} failed: {strerror(errno)}")

    def __str__(self) -> str:  # OSError's own adds "[Errno N]" before a message that already explains
        return self.strerror


class IotlbWriteError(VhostError):
    """An IOTLB message the kernel refused; `accepted`: how many of its batch the kernel took before it."""

    def __init__(self, errno: int, op: str, device: str, args: dict[str, object] | None = None,
                 accepted: int = 0):
        super().__init__(errno, op, device, args)
        self.accepted = accepted
        if errno == _errno.EFAULT:
            # vhost answers every IOTLB-handler error (range, overlap, memlock...) with EFAULT.
            self.strerror += " (the kernel's answer to any IOTLB error: overlap, range, owner or memlock)"


class NotSupportedError(VhostError):
    """ENOTTY: the running kernel does not know this ioctl; EOPNOTSUPP or ENOTSUPP: the device lacks the operation."""

    _WHO = {_errno.ENOTTY: "this kernel", _errno.EOPNOTSUPP: "this device", ENOTSUPP: "this device (ENOTSUPP)"}

    def __init__(self, op: str, device: str, args: dict[str, object] | None = None, errno: int = _errno.ENOTTY):
        super().__init__(errno, op, device, args)
        self.strerror = f"{_describe(op, device, self.args_shown)}: not supported by {self._WHO[errno]}"


class InvalidArgument(ValueError):
    """An argument refused before any syscall: nothing was sent to the kernel."""

    def __init__(self, op: str, device: str, problem: str):
        self.op, self.device, self.problem = op, device, problem
        super().__init__(f"{op} on {device}: {problem} (nothing was sent)")


def raise_for(errno: int, op: str, device: str, args: dict[str, object] | None = None) -> None:
    if errno in NotSupportedError._WHO:
        raise NotSupportedError(op, device, args, errno)
    raise VhostError(errno, op, device, args)
