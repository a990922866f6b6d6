"""The open vhost fd itself: life cycle, the one raw ioctl call, argument checks."""

from __future__ import annotations

import errno
import os
from typing import Any

import structlog

from vdpad._uapi import ffi, lib
from vdpad.log import debug_enabled
from vdpad.device.errors import InvalidArgument, raise_for, strerror
from vdpad.device.owned import OwnedFd

log = structlog.get_logger("vdpad.device")

# The largest values of the uapi's __u32 and __u64 fields.
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


class FdCore:
    """One open vhost character device. Closed exactly once; a context manager.

    Subclasses say what they know about the device through `_vq_limit`, so a
    bad queue index is refused before any syscall.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise type(error)(error.errno, f"cannot open {self.path}: {strerror(error.errno)}") from None
        self._owned = OwnedFd(fd, f"{type(self).__name__} {self.path}")
        self._log = log.bind(device=self.path)  # its level is bound now: debug events go somewhere or nowhere
        self._debug = debug_enabled(self._log)

    # -- life cycle ------------------------------------------------------
    def fileno(self) -> int:
        """The fd's number (ValueError once closed); the calls below hold it open while they run."""
        return self._owned.fileno()

    @property
    def closed(self) -> bool:
        return self._owned.closed

    @property
    def released(self) -> bool:
        """Closed, and no call in flight holds the fd any more: the kernel has let go of the device."""
        return self._owned.released

    def close(self) -> None:
        """Close once. A call another thread has in flight keeps the fd until it returns; later calls raise."""
        if self._owned.close():
            self._log.debug("close")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}{' closed' if self.closed else ''}>"

    # -- the raw call ----------------------------------------------------
    def _ioctl(self, op: str, request: int, arg: Any = ffi.NULL, **shown: object) -> int:
        with self._owned.use() as fd:
            # SAFETY: `arg` is NULL or a cffi object of the struct/size the
            # request encodes, alive for the duration of the call.
            rc = lib.vdpad_ioctl_ptr(fd, request, arg)
        if rc < 0:
            err = ffi.errno
            self._log.debug("ioctl", op=op, request=hex(request), **shown, errno=errno.errorcode.get(err, err))
            raise_for(err, op, self.path, shown)
        self._log.debug("ioctl", op=op, request=hex(request), **shown)
        return rc

    def _get_u64(self, op: str, request: int) -> int:
        value = ffi.new("uint64_t *")
        self._ioctl(op, request, value)
        return value[0]

    def _set_u64(self, op: str, request: int, value: int, name: str) -> None:
        if not 0 <= value <= U64:
            self._refuse(op, f"{name}={value!r} does not fit in 64 bits")
        self._ioctl(op, request, ffi.new("uint64_t *", value), **{name: value})

    def _get_u32(self, op: str, request: int) -> int:
        value = ffi.new("uint32_t *")
        self._ioctl(op, request, value)
        return value[0]

    def _set_fd(self, op: str, request: int, fd: int | None) -> None:
        """An int-sized fd argument; None unbinds (-1)."""
        raw = self._fd_or_unbind(op, fd)
        self._ioctl(op, request, ffi.new("int *", raw), fd=raw)

    def _vring_state(self, op: str, request: int, index: int, num: int = 0, /, *,
                     index_name: str = "index", **shown: object) -> int:
        """One struct vhost_vring_state call; returns `num` as the kernel left it."""
        self._check_u32(op, **{index_name: index}, num=num)
        state = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        self._ioctl(op, request, state, **{index_name: index}, **shown)
        return state.num

    def _vring_file(self, op: str, request: int, index: int, fd: int | None) -> None:
        raw = self._fd_or_unbind(op, fd)
        vfile = ffi.new("struct vhost_vring_file *", {"index": index, "fd": raw})
        self._ioctl(op, request, vfile, index=index, fd=raw)

    # -- checks before the syscall ---------------------------------------
    def _refuse(self, op: str, problem: str):
        raise InvalidArgument(op, self.path, problem)

    def _check_u32(self, op: str, **values: int) -> None:
        for name, value in values.items():
            if not 0 <= value <= U32:
                self._refuse(op, f"{name}={value!r} does not fit in 32 bits")

    def _fd_or_unbind(self, op: str, fd: int | None) -> int:
        if fd is None:
            return lib.VHOST_FILE_UNBIND
        if not 0 <= fd <= 0x7FFFFFFF:
            self._refuse(op, f"fd={fd!r} is not a file descriptor (None unbinds)")
        return fd

    def _vq_limit(self) -> int | None:
        """How many virtqueues the device has, when known without asking the kernel to fail."""
        return None

    def _check_vq(self, op: str, index: int) -> None:
        self._check_u32(op, index=index)
        limit = self._vq_limit()
        if limit is not None and index >= limit:
            self._refuse(op, f"queue index {index} is out of range: the device has {limit} virtqueues (0..{limit - 1})")
