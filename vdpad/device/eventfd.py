"""An eventfd: the counter a driver and a vhost device signal each other through (vring kick and call)."""

from __future__ import annotations

import os
import select

from vdpad.device.owned import OwnedFd, duplicate_of_kind


class EventFd:
    """One eventfd, closed exactly once; a context manager.

    Hand `fileno()` to an ioctl that binds it (SET_VRING_KICK/CALL): the
    kernel takes its own reference, so closing this one later is safe.
    """

    def __init__(self, name: str = "eventfd", *, nonblocking: bool = False):
        self.name = name
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self._owned = OwnedFd(os.eventfd(0, flags), f"EventFd {name!r}")

    @classmethod
    def adopt(cls, fd: int, name: str = "eventfd") -> EventFd:
        """An owner of a duplicate of `fd` (another process's eventfd, passed over a socket).

        ValueError, nothing left open, if `fd` is not an eventfd: the kernel would take
        any fd for a kick or call and only fail when it signals.
        """
        own = duplicate_of_kind(fd, name, "eventfd-count:", "an eventfd")
        adopted = cls.__new__(cls)
        adopted.name = name
        adopted._owned = OwnedFd(own, f"EventFd {name!r}")
        return adopted

    @property
    def fd(self) -> int:
        """The number, or -1 once closed."""
        return self._owned.fd

    @property
    def closed(self) -> bool:
        return self._owned.closed

    def fileno(self) -> int:
        return self._owned.fileno()

    def write(self, value: int = 1) -> None:
        """Add `value` to the counter (wakes a reader)."""
        with self._owned.use() as fd:
            os.eventfd_write(fd, value)

    def read(self) -> int:
        """Take the counter, resetting it to 0. Blocks while it is 0, or raises
        BlockingIOError if made `nonblocking`."""
        with self._owned.use() as fd:
            return os.eventfd_read(fd)

    def wait(self, timeout: float | None) -> bool:
        """Whether the counter became non-zero within `timeout` seconds (None: wait for it)."""
        with self._owned.use() as fd:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def close(self) -> None:
        """Close once; a read or wait another thread has in flight keeps the fd until it returns."""
        self._owned.close()

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EventFd {self.name!r}{' closed' if self.closed else f' fd {self.fd}'}>"
