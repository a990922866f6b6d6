"""Errors of device management: each says what was asked, of what, and what the kernel answered.

Every class is an OSError with the errno the kernel (or sysfs) gave, so a
caller may catch by errno or by kind. Input refused before anything is sent
is vdpad.device.InvalidArgument (a ValueError), as in the device layer.
"""

from __future__ import annotations

import errno as _errno
import os


class MgmtError(OSError):
    """A management request the kernel or sysfs refused."""

    def __init__(self, errno: int, message: str):
        super().__init__(errno, message)

    def __str__(self) -> str:  # OSError's own prefixes "[Errno N]" to a message that already explains
        return self.strerror


class NotFound(MgmtError):
    """No such device or management device."""


class AlreadyExists(MgmtError):
    """A device of that name exists already."""


class PermissionDenied(MgmtError):
    """The caller lacks CAP_NET_ADMIN (netlink) or write access (sysfs)."""


class NotSupported(MgmtError):
    """The kernel or the management device cannot do what was asked."""


class ModuleMissing(NotSupported):
    """What was asked needs a kernel module that is not loaded; `module` names it."""

    def __init__(self, module: str, message: str):
        super().__init__(_errno.ENOENT, f"{message}: load the kernel module ({'modprobe ' + module})")
        self.module = module


class Busy(MgmtError):
    """The device is in use: its node is open."""


class WaitTimeout(MgmtError):
    """Something the kernel should have made did not appear in time."""


_BY_ERRNO: dict[int, type[MgmtError]] = {
    _errno.ENODEV: NotFound,
    _errno.ENOENT: NotFound,
    _errno.EEXIST: AlreadyExists,
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
    _errno.EOPNOTSUPP: NotSupported,
    _errno.EBUSY: Busy,
    _errno.ETIMEDOUT: WaitTimeout,
}


def refused(errno: int, what: str, reason: str | None = None) -> MgmtError:
    """The error for `what` failing with `errno`; `reason` is the kernel's extack text if it gave one."""
    text = reason.rstrip(".") if reason else os.strerror(errno)
    name = _errno.errorcode.get(errno, str(errno))
    return _BY_ERRNO.get(errno, MgmtError)(errno, f"{what}: {text} ({name})")
