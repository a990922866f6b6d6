"""The control protocol's shared facts: version, limits, error kinds (docs/protocol.md is the reference).

A request is one JSON object per SOCK_SEQPACKET message, `{"v": 1, "id": N,
"op": "...", "args": {...}}`, with the file descriptors it passes (memfds,
eventfds) as SCM_RIGHTS ancillary data; an argument names a passed fd by its
position (`{"fd": 0}`). A reply is `{"v": 1, "id": N, "ok": true, "result":
{...}}` with the fds it passes back, or `{"v": 1, "id": N, "ok": false,
"error": {"kind": ..., "errno": ..., "message": ...}}`.

Errors cross the socket as a kind, and the client raises a class with the
same bases as the one the daemon caught: the CLI's exit codes, and the
virtio driver's handling of what a device cannot do, are the same over a
session as over a direct fd.
"""

from __future__ import annotations

import errno as _errno
import functools
from typing import Any

from vdpad.device.errors import InvalidArgument, NotSupportedError, VhostError
from vdpad.iotlb.memory import RegionInUse
from vdpad.mgmt.errors import AlreadyExists, Busy, NotFound, NotSupported, PermissionDenied, WaitTimeout

VERSION = 1
MAX_MESSAGE = 192 << 10  # bytes of JSON in one message, either way: under the default socket buffer (wmem_default)
MAX_FDS = 16  # fds one message may pass


class ProtocolError(ValueError):
    """A request the daemon cannot take as asked: bad JSON, unknown op, a missing or mistyped argument."""


class Unauthorized(PermissionError):
    """The peer may not use the daemon, or not this session."""


# kind -> the local class a client raises for it (as a subclass with RemoteError). First match wins
# on the daemon's side, so subclasses come before their bases.
KINDS: tuple[tuple[str, type[BaseException]], ...] = (
    ("protocol", ProtocolError),
    ("unauthorized", Unauthorized),
    ("invalid", InvalidArgument),
    ("in_use", RegionInUse),
    ("not_supported", NotSupportedError),
    ("not_supported", NotSupported),
    ("not_found", NotFound),
    ("not_found", FileNotFoundError),
    ("exists", AlreadyExists),
    ("permission", PermissionDenied),
    ("permission", PermissionError),
    ("busy", Busy),
    ("timeout", WaitTimeout),
    ("kernel", VhostError),
    ("invalid", ValueError),
    ("system", OSError),
)
_RAISED_AS = {kind: cls for kind, cls in reversed(KINDS)}  # a kind's first class


def error_kind(error: BaseException) -> str:
    """The kind a daemon reports `error` as; "internal" for what it did not expect (a bug)."""
    if isinstance(error, OSError) and error.errno == _errno.EBUSY:
        return "busy"
    return next((kind for kind, cls in KINDS if isinstance(error, cls)), "internal")


def error_reply(error: BaseException) -> dict[str, Any]:
    message = str(error)
    notes = getattr(error, "__notes__", ())
    if notes:
        message += "; " + "; ".join(notes)
    return {"kind": error_kind(error), "errno": getattr(error, "errno", None), "message": message}


class RemoteError(Exception):
    """An error the daemon reported; also an instance of the class it stands for (`kind`)."""

    kind = "internal"

    def __str__(self) -> str:
        return self.message

    @property
    def message(self) -> str:
        return self._message


@functools.cache
def _remote_class(kind: str) -> type[RemoteError]:
    base = _RAISED_AS.get(kind, RuntimeError)

    def __init__(self, errno: int | None, message: str) -> None:  # noqa: N807
        if issubclass(base, OSError):
            OSError.__init__(self, errno or 0, message)
        else:
            Exception.__init__(self, message)
        self._message = message

    return type(f"Remote{base.__name__}", (RemoteError, base), {"kind": kind, "__init__": __init__})


def remote_error(reply: dict[str, Any]) -> RemoteError:
    """The exception a client raises for an error reply's `error` object."""
    kind = str(reply.get("kind", "internal"))
    errno = reply.get("errno")
    return _remote_class(kind)(errno if isinstance(errno, int) else None, str(reply.get("message", "")))
