"""Messages on the control socket: one JSON object per SOCK_SEQPACKET message, fds as SCM_RIGHTS.

SOCK_SEQPACKET keeps message boundaries and delivers the fds with the message
they came with, so no framing or fd bookkeeping across messages is needed.
The blocking socket (the client) and the trio socket (the daemon) share the
encoding and the ancillary parsing below.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
from collections.abc import Sequence
from typing import Any

from vdpad.service.protocol import MAX_FDS, MAX_MESSAGE, ProtocolError

_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ReceivedFds:
    """The fds that came with one message, owned until close(); users take duplicates (os.dup semantics).

    Whatever a request does with them, close() (the end of the request) closes each exactly once.
    """

    def __init__(self, fds: Sequence[int] = ()):
        self._fds = list(fds)

    def __len__(self) -> int:
        return len(self._fds)

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < len(self._fds):
            raise ProtocolError(f"fd {index} was named but the message passed {len(self._fds)} fd(s)")
        fd = self._fds[index]
        if fd < 0:
            raise ProtocolError(f"fd {index} is closed")
        return fd

    def close(self) -> None:
        fds, self._fds = self._fds, [-1] * len(self._fds)
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> ReceivedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the limit of {MAX_MESSAGE}")
    return data


def ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"{len(fds)} fds in one message, over the limit of {MAX_FDS}")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def decode(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> tuple[dict[str, Any], ReceivedFds]:
    """The message and its fds; ProtocolError (every fd closed) for a message that is not one."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            passed = array.array("i")
            passed.frombytes(payload[: len(payload) - len(payload) % passed.itemsize])
            fds += passed
    received = ReceivedFds(fds)
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more fds than the limit of {MAX_FDS} in one message (the rest were dropped)")
        if flags & socket.MSG_TRUNC:
            raise ProtocolError(f"message over the limit of {MAX_MESSAGE} bytes")
        try:
            message = json.loads(data)
        except ValueError as error:  # bad UTF-8 or JSON; an integer of more digits than Python converts
            raise ProtocolError(f"message is not JSON: {error}") from None
        except RecursionError:
            raise ProtocolError("message is not JSON the daemon takes: nested too deep") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"message is a JSON {type(message).__name__}, not an object")
    except BaseException:
        received.close()
        raise
    return message, received


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    sock.sendmsg([encode(message)], ancillary(fds))


def receive(sock: socket.socket) -> tuple[dict[str, Any], ReceivedFds] | None:
    """The next message, or None when the peer has gone."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    if not data and not ancdata and peer_gone(sock):
        return None
    return decode(data, ancdata, flags)


def peer_gone(sock: Any) -> bool:
    """After an empty read: the peer closed (POLLRDHUP), rather than sent a message of no bytes."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return bool(poller.poll(0))  # no wait: the answer is there already


async def asend(sock: Any, data: bytes, fds: Sequence[int] = ()) -> None:
    """As send(), on a trio socket, of a message encode() made (so a caller can answer its refusal)."""
    await sock.sendmsg([data], ancillary(fds))


async def areceive(sock: Any) -> tuple[dict[str, Any], ReceivedFds] | None:
    """As receive(), on a trio socket."""
    data, ancdata, flags, _ = await sock.recvmsg(MAX_MESSAGE, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    if not data and not ancdata and peer_gone(sock):
        return None
    return decode(data, ancdata, flags)
