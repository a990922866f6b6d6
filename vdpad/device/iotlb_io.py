"""IOTLB messages through the fd: written by every vhost device, read from vhost core devices."""

from __future__ import annotations

import errno
import os
import select

from vdpad.device.errors import IotlbWriteError, VhostError
from vdpad.device.features import Features
from vdpad.device.flags import BackendFeature
from vdpad.device.iotlb_msg import CodecError, IotlbMessage, MessageType, Version

_READ_SIZE = max(Version.V1.size, Version.V2.size)


def _fields(message: IotlbMessage) -> dict[str, object]:
    return dict(type=message.type.name, iova=message.iova, size=message.size,
                uaddr=message.uaddr, perm=message.perm.name, asid=message.asid)


class IotlbWriter(Features):
    """Every vhost device takes IOTLB messages by write(), one message per call."""

    @property
    def iotlb_version(self) -> Version:
        return Version.V2 if BackendFeature.IOTLB_MSG_V2 in self.acked_backend_features else Version.V1

    def _check_iotlb(self, op: str, message: IotlbMessage) -> None:
        """What the device knows beyond the message itself (address spaces)."""

    def write_iotlb(self, message: IotlbMessage) -> None:
        """Write one IOTLB message; v2 framing once IOTLB_MSG_V2 was acked."""
        op = f"IOTLB {message.type.name}"
        problem = message.problem_for_write()
        if problem:
            self._refuse(op, problem)
        acked = self.acked_backend_features
        if message.asid and BackendFeature.IOTLB_ASID not in acked:
            self._refuse(op, f"asid={message.asid} needs IOTLB_ASID acked first")
        if message.type in (MessageType.BATCH_BEGIN, MessageType.BATCH_END) and BackendFeature.IOTLB_BATCH not in acked:
            self._refuse(op, f"{message.type.name} needs IOTLB_BATCH acked first")
        self._check_iotlb(op, message)
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
