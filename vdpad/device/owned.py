"""One owned file descriptor: closed exactly once, never used after, never closed under a call.

A closed owner forgets its number at once (`fd` reads -1), so a late call
from another thread raises instead of landing on whatever file the kernel
gave that number to next. A call in flight keeps the number open: close()
marks the owner closed and the last call to finish closes the fd.
"""

from __future__ import annotations

import fcntl
import os
import threading
import warnings


class OwnedFd:
    """The one owner of `fd`; `what` names the object in errors ("/dev/vhost-vdpa-0 is closed")."""

    def __init__(self, fd: int, what: str):
        self._fd = fd
        self.what = what
        self._lock = threading.Lock()
        self._calls = 0  # calls in flight on the number
        self._unclosed = -1  # the number close() left to the last call in flight

    @property
    def fd(self) -> int:
        """The number, or -1 once closed."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def released(self) -> bool:
        """Closed for real: no call in flight still holds the number (the kernel let go of the file)."""
        with self._lock:
            return self._fd < 0 and self._unclosed < 0

    def fileno(self) -> int:
        """The number, for a call that takes its own reference to the file (poll, SET_VRING_KICK...).

        Use `use()` to hold the number across a syscall another thread might race with close().
        """
        fd = self._fd
        if fd < 0:
            raise ValueError(f"{self.what} is closed")
        return fd

    def use(self) -> OwnedFd:
        """`with owned.use() as fd:` the number, kept open until the block ends even if another thread
        closes meanwhile. The owner is its own context manager (it keeps no state per use), so a call
        costs no generator: every ioctl and IOTLB write takes this path."""
        return self

    def __enter__(self) -> int:
        with self._lock:
            fd = self._fd
            if fd < 0:
                raise ValueError(f"{self.what} is closed")
            self._calls += 1
        return fd

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._calls -= 1
            last = self._unclosed if not self._calls else -1
        if last >= 0:  # the last call out closes what close() left open; `released` once it is shut
            os.close(last)
            with self._lock:
                self._unclosed = -1

    def close(self) -> bool:
        """Mark closed; close the fd now, or when the last call in flight ends. True the first time."""
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd < 0:
                return False
            if self._calls:
                self._unclosed = fd
                return True
        os.close(fd)
        return True

    def __del__(self, _close=os.close, _warn=warnings.warn) -> None:
        # Bound as defaults: at interpreter shutdown the modules may already be gone.
        # No call can be in flight here: use() holds a reference to self.
        fd = getattr(self, "_fd", -1)
        if fd < 0:
            return
        self._fd = -1
        try:
            _warn(f"unclosed {self.what} (fd {fd})", ResourceWarning, stacklevel=2, source=self)
        except Exception:  # noqa: BLE001 - warnings machinery torn down at shutdown
            pass
        _close(fd)

    def __repr__(self) -> str:
        return f"<OwnedFd {self._fd} {self.what}>"


def duplicate_of_kind(fd: int, what: str, fdinfo_field: str, kind: str) -> int:
    """A duplicate (close-on-exec) of another process's `fd`, checked to be a `kind` by the field its
    /proc/self/fdinfo shows (ValueError, nothing left open, otherwise): the kernel would take any fd and
    only fail when it uses it."""
    own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    try:
        with open(f"/proc/self/fdinfo/{own}") as info:
            if not any(line.startswith(fdinfo_field) for line in info):
                raise ValueError(f"{what}: fd {fd} is not {kind}")
    except BaseException:
        os.close(own)
        raise
    return own
