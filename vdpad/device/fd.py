"""What every vhost character device serves (ownership, features, vrings, IOTLB writes), and the dirty log."""

from __future__ import annotations

from vdpad._uapi import lib
from vdpad.device.core import FdCore
from vdpad.device.iotlb_io import IotlbWriter
from vdpad.device.vring import VringAddr, VringEndian, Vrings

__all__ = ["DirtyLog", "VhostFd", "VringAddr", "VringEndian"]


class DirtyLog(FdCore):
    """The dirty-page log for live migration (vhost core devices; vhost-vdpa leaves it to the device)."""

    def set_log_base(self, address: int) -> None:
        """Userspace address of the log bitmap, one bit per page written."""
        self._set_u64("SET_LOG_BASE", lib.VHOST_SET_LOG_BASE, address, "address")

    def set_log_fd(self, fd: int | None) -> None:
        """The eventfd the device signals after logging; None unbinds."""
        self._set_fd("SET_LOG_FD", lib.VHOST_SET_LOG_FD, fd)


class VhostFd(IotlbWriter, Vrings):
    """One open vhost character device, with what every kind serves. Closed exactly once; a context manager.

    Each kind adds the concerns its kernel driver serves (docs/kernel-notes.md
    has what vhost-vdpa refuses).
    """
