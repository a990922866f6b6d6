"""What every vhost character device shares: ownership, features, vrings, IOTLB messages."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import structlog

from vdpad._uapi import ffi, lib
from vdpad.device.errors import InvalidArgument, VhostError, raise_for
from vdpad.device.flags import BackendFeature
from vdpad.device.iotlb_msg import IotlbMessage, Version

log = structlog.get_logger("vdpad.device")

U64 = (1 << 64) - 1


@dataclass(frozen=True)
class VringAddr:
    """Userspace addresses (IOVAs where an IOTLB is used) of one vring's parts."""

    desc: int
    used: int
    avail: int
    log: int = 0
    flags: int = 0


class VhostFd:
    """One open vhost character device. Closed exactly once; a context manager."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise type(error)(error.errno, f"cannot open {self.path}: {error.strerror}") from None
        self._closed = False
        self._backend_features = BackendFeature(0)
        self._log = log.bind(device=self.path)

    # -- life cycle ------------------------------------------------------
    def fileno(self) -> int:
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            self._log.debug("close")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}{' closed' if self._closed else ''}>"

    # -- the raw call ----------------------------------------------------
    def _ioctl(self, op: str, request: int, arg=ffi.NULL, **shown) -> int:
        fd = self.fileno()
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
            raise InvalidArgument(op, self.path, f"{name}={value!r} does not fit in 64 bits")
        self._ioctl(op, request, ffi.new("uint64_t *", value), **{name: value})

    def _vring_state(self, op: str, request: int, index: int, num: int, **checked) -> int:
        self._check_u32(op, index=index, num=num)
        state = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        self._ioctl(op, request, state, index=index, **checked)
        return state.num

    def _vring_file(self, op: str, request: int, index: int, fd: int | None) -> None:
        raw = lib.VHOST_FILE_UNBIND if fd is None else fd
        self._check_u32(op, index=index)
        if raw < -1:
            raise InvalidArgument(op, self.path, f"fd={raw} is not a file descriptor")
        vfile = ffi.new("struct vhost_vring_file *", {"index": index, "fd": raw})
        self._ioctl(op, request, vfile, index=index, fd=raw)

    def _check_u32(self, op: str, **values: int) -> None:
        for name, value in values.items():
            if not 0 <= value <= 0xFFFFFFFF:
                raise InvalidArgument(op, self.path, f"{name}={value!r} does not fit in 32 bits")

    # -- ownership and features -------------------------------------------
    def set_owner(self) -> None:
        self._ioctl("SET_OWNER", lib.VHOST_SET_OWNER)

    def reset_owner(self) -> None:
        self._ioctl("RESET_OWNER", lib.VHOST_RESET_OWNER)

    def get_features(self) -> int:
        return self._get_u64("GET_FEATURES", lib.VHOST_GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._set_u64("SET_FEATURES", lib.VHOST_SET_FEATURES, int(features), "features")

    def get_backend_features(self) -> BackendFeature:
        return BackendFeature(self._get_u64("GET_BACKEND_FEATURES", lib.VHOST_GET_BACKEND_FEATURES))

    def set_backend_features(self, features: BackendFeature | int) -> None:
        self._set_u64("SET_BACKEND_FEATURES", lib.VHOST_SET_BACKEND_FEATURES, int(features), "features")
        self._backend_features = BackendFeature(int(features))

    @property
    def acked_backend_features(self) -> BackendFeature:
        """What this fd last acked with set_backend_features (vhost has no getter for it)."""
        return self._backend_features

    # -- vrings -------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        if num == 0 or num & (num - 1):
            raise InvalidArgument("SET_VRING_NUM", self.path, f"num={num} is not a power of two")
        self._vring_state("SET_VRING_NUM", lib.VHOST_SET_VRING_NUM, index, num, num=num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._vring_state("SET_VRING_BASE", lib.VHOST_SET_VRING_BASE, index, base, base=base)

    def get_vring_base(self, index: int) -> int:
        return self._vring_state("GET_VRING_BASE", lib.VHOST_GET_VRING_BASE, index, 0)

    def set_vring_addr(self, index: int, addr: VringAddr) -> None:
        for name, value, align in (("desc", addr.desc, 16), ("avail", addr.avail, 2), ("used", addr.used, 4)):
            if value % align:
                raise InvalidArgument("SET_VRING_ADDR", self.path, f"{name}={value:#x} is not {align}-byte aligned")
        self._check_u32("SET_VRING_ADDR", index=index)
        raw = ffi.new("struct vhost_vring_addr *", {
            "index": index, "flags": addr.flags, "desc_user_addr": addr.desc,
            "used_user_addr": addr.used, "avail_user_addr": addr.avail, "log_guest_addr": addr.log})
        self._ioctl("SET_VRING_ADDR", lib.VHOST_SET_VRING_ADDR, raw, index=index,
                    desc=addr.desc, avail=addr.avail, used=addr.used)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the driver signals; None unbinds."""
        self._vring_file("SET_VRING_KICK", lib.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the device signals; None unbinds."""
        self._vring_file("SET_VRING_CALL", lib.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_file("SET_VRING_ERR", lib.VHOST_SET_VRING_ERR, index, fd)

    # -- IOTLB messages ---------------------------------------------------------
    @property
    def iotlb_version(self) -> Version:
        return Version.V2 if BackendFeature.IOTLB_MSG_V2 in self._backend_features else Version.V1

    def write_iotlb(self, message: IotlbMessage) -> None:
        """Write one IOTLB message; v2 framing once IOTLB_MSG_V2 was acked."""
        if message.asid and BackendFeature.IOTLB_ASID not in self._backend_features:
            raise InvalidArgument("IOTLB write", self.path,
                                  f"asid={message.asid} needs IOTLB_ASID acked first")
        data = message.encode(self.iotlb_version)
        fields = dict(type=message.type.name, iova=message.iova, size=message.size,
                      uaddr=message.uaddr, perm=message.perm.name, asid=message.asid)
        try:
            # SAFETY: one whole message per write(); the kernel copies it.
            os.write(self.fileno(), data)
        except OSError as error:
            self._log.debug("iotlb.write", **fields, errno=errno.errorcode.get(error.errno))
            raise VhostError(error.errno, f"IOTLB {message.type.name}", self.path,
                             {k: v for k, v in fields.items() if k != "type"}) from None
        self._log.debug("iotlb.write", **fields)
