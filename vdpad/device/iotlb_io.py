"""IOTLB messages through the fd: written by every vhost device, read from vhost core devices."""

from __future__ import annotations

import errno
import fcntl
import os
import select
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vdpad._uapi import ffi, lib
from vdpad.device.errors import InvalidArgument, IotlbWriteError, VhostError
from vdpad.device.features import Features
from vdpad.device.flags import BackendFeature
from vdpad.device.core import U64
from vdpad.device.iotlb_msg import CodecError, IotlbBatch, IotlbMessage, MessageType, Version, as_u64s, outside_window

_READ_SIZE = max(Version.V1.size, Version.V2.size)
_MSG_V2, _ASID, _BATCH = map(int, (BackendFeature.IOTLB_MSG_V2, BackendFeature.IOTLB_ASID, BackendFeature.IOTLB_BATCH))


def _version(acked: int) -> Version:
    """The framing the fd takes, from its acked backend features as an int (asked on every write)."""
    return Version.V2 if acked & _MSG_V2 else Version.V1


def _fields(message: IotlbMessage) -> dict[str, object]:
    return dict(type=message.type.name, iova=message.iova, size=message.size,
                uaddr=message.uaddr, perm=message.perm.name, asid=message.asid)


class IotlbWriter(Features):
    """Every vhost device takes IOTLB messages by write(), one message per call."""

    @property
    def iotlb_version(self) -> Version:
        return _version(int(self.acked_backend_features))

    def _iotlb_window(self, op: str, asid: int) -> tuple[int, int]:
        """The (first, last) IOVA UPDATEs to address space `asid` may use, refusing an asid the device lacks."""
        return 0, U64

    def _check_bracket(self, op: str, asid: int, *, bracket: MessageType | None) -> None:
        """The features the messages need acked: IOTLB_ASID for asid > 0, IOTLB_BATCH for a BATCH_BEGIN/END."""
        acked = int(self.acked_backend_features)  # int arithmetic: Flag's `in` costs a Python call, on every write
        if asid and not acked & _ASID:
            self._refuse(op, f"asid={asid} needs IOTLB_ASID acked first")
        if bracket is not None and not acked & _BATCH:
            self._refuse(op, f"{bracket.name} needs IOTLB_BATCH acked first")

    def write_iotlb(self, message: IotlbMessage) -> None:
        """Write one IOTLB message; v2 framing once IOTLB_MSG_V2 was acked."""
        op = f"IOTLB {message.type.name}"
        problem = message.problem_for_write()
        if problem:
            self._refuse(op, problem)
        self._check_bracket(op, message.asid, bracket=message.type
                            if message.type in (MessageType.BATCH_BEGIN, MessageType.BATCH_END) else None)
        if problem := outside_window(message, self._iotlb_window(op, message.asid)):
            self._refuse(op, problem)
        version = self.iotlb_version
        data = message.encode(version)
        fields = _fields(message)
        try:
            with self._owned.use() as fd:
                # SAFETY: one whole message per write(); the kernel copies it.
                os.write(fd, data)
        except OSError as error:
            self._log.debug("iotlb.write", version=version.name, **fields, errno=errno.errorcode.get(error.errno))
            raise IotlbWriteError(error.errno, op, self.path, {k: v for k, v in fields.items() if k != "type"}) from None
        self._log.debug("iotlb.write", version=version.name, **fields)

    def write_iotlb_batch(self, batch: IotlbBatch) -> int:
        """Write every message of `batch` in order, by one C loop (GIL released), one write() each.

        The checks of write_iotlb are made for the whole batch before
        anything is written (InvalidArgument: nothing was sent). Returns how
        many messages the kernel took, all of them; a refusal raises
        IotlbWriteError for the refused message, `.accepted` telling how many
        before it the kernel took (and holds).
        """
        try:
            invalidate, update = batch.flat()
        except OverflowError:  # a value no field holds: the codec names it (CodecError)
            batch.problem_for_write()
            raise
        return self.write_iotlb_ranges(batch.asid, invalidate, update, begin=batch.begin, end=batch.end)

    def write_iotlb_ranges(self, asid: int, invalidate: array, update: array, *,
                           begin: bool = False, end: bool = False) -> int:
        """write_iotlb_batch for the batch whose flat arrays (IotlbBatch.flat) these are: a commit's
        messages come this way, an IotlbBatch made only to name a refused message or to trace."""
        op = "IOTLB batch"
        acked = int(self.acked_backend_features)
        if (asid and not acked & _ASID) or ((begin or end) and not acked & _BATCH):
            self._check_bracket(op, asid, bracket=MessageType.BATCH_BEGIN if begin
                                else MessageType.BATCH_END if end else None)
        window = first, last = self._iotlb_window(op, asid)
        version = _version(acked)
        if asid:
            version.check_asid(asid)
        error = ffi.new("int *")
        try:
            with self._owned.use() as fd:
                # SAFETY: the arrays hold their pairs and quads, alive for the call; the C side
                # checks every message before writing any, and writes each one whole.
                taken = lib.vdpad_iotlb_write(fd, version, asid, begin, end, as_u64s(invalidate),
                                              len(invalidate) >> 1, as_u64s(update), len(update) >> 2,
                                              first, last, error)
        except OverflowError:  # an asid beyond 32 bits: the codec names it (CodecError)
            IotlbBatch.of_flat(asid, invalidate, update, begin, end).problem_for_write(window)
            raise
        refused = error[0]
        if refused < 0:
            index, problem = IotlbBatch.of_flat(asid, invalidate, update, begin, end).problem_for_write(window)
            self._refuse(op, f"message {index}: {problem}")
        if refused or self._debug:
            messages = IotlbBatch.of_flat(asid, invalidate, update, begin, end).messages()
            for message in messages[:taken]:
                self._log.debug("iotlb.write", version=version.name, **_fields(message))
        if refused:
            fields = _fields(messages[taken])
            self._log.debug("iotlb.write", version=version.name, **fields, errno=errno.errorcode.get(refused))
            raise IotlbWriteError(refused, f"IOTLB {fields.pop('type')}", self.path, fields, accepted=taken)
        return taken


class IotlbReader(Features):
    """Devices that translate through a device IOTLB send MISS messages to be read."""

    def read_iotlb(self, timeout: float | None = None) -> IotlbMessage:
        """The next message the kernel sent; waits up to `timeout` seconds (None: forever).

        Raises TimeoutError when none came in time.
        """
        with self._owned.use() as fd:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
                raise TimeoutError(f"no IOTLB message from {self.path} within {timeout} s")
            try:
                # SAFETY: the kernel hands out one whole message per read().
                data = os.read(fd, _READ_SIZE)
            except OSError as error:
                self._log.debug("iotlb.read", errno=errno.errorcode.get(error.errno))
                raise VhostError(error.errno, "IOTLB read", self.path) from None
        try:
            message = IotlbMessage.decode(data)
        except CodecError:
            self._log.debug("iotlb.read", raw=data.hex())
            raise
        self._log.debug("iotlb.read", version=Version(int.from_bytes(data[:4], "little")).name, **_fields(message))
        return message

    @contextmanager
    def iotlb_channel(self) -> Iterator[IotlbChannel]:
        """The fd held open for one thread that serves the device's misses (vdpad.device.miss_loop), and
        non-blocking for reads, until the block ends: close() from another thread waits for it."""
        with self._owned.use() as fd:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            try:
                yield IotlbChannel(fd, self.iotlb_version, self.path, self._log if self._debug else None)
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # the file is shared with the fd's other users


@dataclass(frozen=True)
class IotlbChannel:
    """A held, non-blocking fd that IOTLB messages are read from, framed in `version`; `trace` is the
    device's logger while its debug events go somewhere, else None."""

    fd: int
    version: Version
    path: str
    trace: Any
