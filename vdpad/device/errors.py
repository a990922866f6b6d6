"""Errors of the device layer: each names the operation, the device and the arguments."""

from __future__ import annotations

import errno as _errno
import os


def _describe(op: str, device: str, args: dict[str, object]) -> str:
    shown = ", ".join(f"{k}={_show(v)}" for k, v in args.items())
    return f"{op}({shown}) on {device}" if shown else f"{op} on {device}"


def _show(value: object) -> str:
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) and value > 9 else repr(value)


class VhostError(OSError):
    """An ioctl or IOTLB write the kernel refused."""

    def __init__(self, errno: int, op: str, device: str, args: dict[str, object] | None = None):
        self.op, self.device, self.args_shown = op, device, dict(args or {})
        reason = os.strerror(errno)
        if errno == _errno.EFAULT:
            # vhost answers every IOTLB-handler error (range, overlap, memlock...) with EFAULT.
            reason += " (the kernel's answer to any IOTLB error: range, overlap, owner or memlock)"
        super().__init__(errno, f"{_describe(op, device, self.args_shown)} failed: {reason}")

    def __str__(self) -> str:  # OSError's own adds "[Errno N]" before a message that already explains
        return self.strerror


class NotSupportedError(VhostError):
    """ENOTTY: the running kernel does not know this ioctl."""

    def __init__(self, op: str, device: str, args: dict[str, object] | None = None):
        super().__init__(_errno.ENOTTY, op, device, args)
        self.strerror = f"{_describe(op, device, self.args_shown)}: not supported by this kernel"


class InvalidArgument(ValueError):
    """An argument refused before any syscall: nothing was sent to the kernel."""

    def __init__(self, op: str, device: str, problem: str):
        self.op, self.device, self.problem = op, device, problem
        super().__init__(f"{op} on {device}: {problem} (nothing was sent)")


def raise_for(errno: int, op: str, device: str, args: dict[str, object] | None = None) -> None:
    if errno == _errno.ENOTTY:
        raise NotSupportedError(op, device, args)
    raise VhostError(errno, op, device, args)
