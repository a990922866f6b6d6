"""The kernel's "vdpa" generic netlink family (include/uapi/linux/vdpa.h, Linux 6.12), through pyroute2.

VdpaNetlink is synchronous: one socket, one request at a time, for the CLI
and for worker threads (vdpad.mgmt.aio runs it from trio). pyroute2's
synchronous sockets keep their asyncio loop per thread, so a VdpaNetlink
belongs to the thread that made it.
"""

from __future__ import annotations

import enum
import errno

import structlog
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket, GenericNetlinkSocket

from vdpad.device.errors import InvalidArgument
from vdpad.device.flags import VirtioDeviceId
from vdpad.mgmt import model
from vdpad.mgmt.errors import ModuleMissing, refused
from vdpad.mgmt.model import DeviceConfig, Device, MgmtDev, QueueStats

log = structlog.get_logger("vdpad.mgmt")

FAMILY = "vdpa"
FAMILY_VERSION = 1
FAMILY_MODULE = "vdpa"


class Command(enum.IntEnum):
    """enum vdpa_command. The kernel answers a GET with the matching NEW."""

    MGMTDEV_NEW = 1
    MGMTDEV_GET = 2
    DEV_NEW = 3
    DEV_DEL = 4
    DEV_GET = 5
    DEV_CONFIG_GET = 6
    DEV_VSTATS_GET = 7
    DEV_ATTR_SET = 8


class VdpaMessage(genlmsg):
    """One message of the family; the attributes of enum vdpa_attr, in number order from 0."""

    prefix = "VDPA_ATTR_"
    nla_map = (
        ("VDPA_ATTR_UNSPEC", "none"),  # also VDPA_ATTR_PAD, the 64-bit alignment pad
        ("VDPA_ATTR_MGMTDEV_BUS_NAME", "asciiz"),
        ("VDPA_ATTR_MGMTDEV_DEV_NAME", "asciiz"),
        ("VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", "uint64"),
        ("VDPA_ATTR_DEV_NAME", "asciiz"),
        ("VDPA_ATTR_DEV_ID", "uint32"),
        ("VDPA_ATTR_DEV_VENDOR_ID", "uint32"),
        ("VDPA_ATTR_DEV_MAX_VQS", "uint32"),
        ("VDPA_ATTR_DEV_MAX_VQ_SIZE", "uint16"),
        ("VDPA_ATTR_DEV_MIN_VQ_SIZE", "uint16"),
        ("VDPA_ATTR_DEV_NET_CFG_MACADDR", "l2addr"),
        # The header says u8; 6.12's vdpa.c puts a u16 (virtio_net_config.status is le16).
        ("VDPA_ATTR_DEV_NET_STATUS", "uint16"),
        ("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", "uint16"),
        ("VDPA_ATTR_DEV_NET_CFG_MTU", "uint16"),
        ("VDPA_ATTR_DEV_NEGOTIATED_FEATURES", "uint64"),
        ("VDPA_ATTR_DEV_MGMTDEV_MAX_VQS", "uint32"),
        ("VDPA_ATTR_DEV_SUPPORTED_FEATURES", "uint64"),
        ("VDPA_ATTR_DEV_QUEUE_INDEX", "uint32"),
        ("VDPA_ATTR_DEV_VENDOR_ATTR_NAME", "asciiz"),
        ("VDPA_ATTR_DEV_VENDOR_ATTR_VALUE", "uint64"),
        ("VDPA_ATTR_DEV_FEATURES", "uint64"),
        ("VDPA_ATTR_DEV_BLK_CFG_CAPACITY", "uint64"),
        ("VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_SEG_MAX", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES", "uint16"),
        ("VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP", "uint8"),
        ("VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET", "uint8"),
        ("VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE", "uint16"),
        ("VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC", "uint32"),
        ("VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG", "uint32"),
        ("VDPA_ATTR_DEV_BLK_READ_ONLY", "uint8"),
        ("VDPA_ATTR_DEV_BLK_FLUSH", "uint8"),
    )


def build(cmd: Command, attrs: list[tuple[str, object]]) -> VdpaMessage:
    msg = VdpaMessage()
    msg["cmd"] = cmd
    msg["version"] = FAMILY_VERSION
    msg["attrs"] = [(f"VDPA_ATTR_{name}", value) for name, value in attrs]
    return msg


class _AsyncVdpaSocket(AsyncGenericNetlinkSocket):
    module_err_level = "debug"  # a missing family becomes ModuleMissing, not a log line


class _VdpaSocket(GenericNetlinkSocket):
    async_class = _AsyncVdpaSocket


class VdpaNetlink:
    """A socket bound to the vdpa family. Typed requests, no policy; a context manager."""

    def __init__(self) -> None:
        sock = _VdpaSocket(ext_ack=True)  # ext_ack: the kernel's own words come back with errors
        try:
            sock.bind(FAMILY, VdpaMessage)
        except NetlinkError as error:
            sock.close()
            if error.code == errno.ENOENT:
                raise ModuleMissing(FAMILY_MODULE, "the kernel has no vdpa netlink family") from None
            raise refused(error.code, "resolving the vdpa netlink family", error.args[1]) from None
        self._sock = sock

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> VdpaNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- management devices --------------------------------------------------
    def mgmtdevs(self) -> list[MgmtDev]:
        return [model.decode_mgmtdev(m) for m in self._dump(Command.MGMTDEV_GET, "MGMTDEV_GET")]

    def mgmtdev(self, handle: str) -> MgmtDev:
        (reply,) = self._do(Command.MGMTDEV_GET, self._handle_attrs("MGMTDEV_GET", handle),
                            f"MGMTDEV_GET {handle}")
        return model.decode_mgmtdev(reply)

    # -- devices -------------------------------------------------------------
    def devices(self) -> list[Device]:
        return [model.decode_device(m) for m in self._dump(Command.DEV_GET, "DEV_GET")]

    def device(self, name: str) -> Device:
        (reply,) = self._do(Command.DEV_GET, [("DEV_NAME", model.check_name("DEV_GET", name))],
                            f"DEV_GET {name}")
        return model.decode_device(reply)

    def configs(self) -> list[DeviceConfig]:
        return [model.decode_config(m) for m in self._dump(Command.DEV_CONFIG_GET, "DEV_CONFIG_GET")]

    def config(self, name: str) -> DeviceConfig:
        (reply,) = self._do(Command.DEV_CONFIG_GET, [("DEV_NAME", model.check_name("DEV_CONFIG_GET", name))],
                            f"DEV_CONFIG_GET {name}")
        return model.decode_config(reply)

    def vstats(self, name: str, queue: int) -> QueueStats:
        """Vendor counters of one queue; the kernel wants features negotiated (FEATURES_OK) first."""
        attrs = [("DEV_NAME", model.check_name("DEV_VSTATS_GET", name)),
                 ("DEV_QUEUE_INDEX", model.check_queue("DEV_VSTATS_GET", name, queue))]
        (reply,) = self._do(Command.DEV_VSTATS_GET, attrs, f"DEV_VSTATS_GET {name} queue {queue}")
        return model.decode_stats(reply)

    def new_device(self, name: str, mgmtdev: str, *, mac: str | None = None, mtu: int | None = None,
                   max_vqp: int | None = None, features: int | None = None) -> None:
        op = "DEV_NEW"
        attrs = self._handle_attrs(op, mgmtdev)
        attrs.append(("DEV_NAME", model.check_name(op, name)))
        if mac is not None:
            attrs.append(("DEV_NET_CFG_MACADDR", model.parse_mac(op, name, mac)))
        if mtu is not None:
            attrs.append(("DEV_NET_CFG_MTU", model.check_mtu(op, name, mtu)))
        if max_vqp is not None:
            attrs.append(("DEV_NET_CFG_MAX_VQP", model.check_max_vqp(op, name, max_vqp)))
        if features is not None:
            attrs.append(("DEV_FEATURES", model.check_features(op, name, features)))
        self._do(Command.DEV_NEW, attrs, f"{op} {name} on {mgmtdev}")

    def delete_device(self, name: str) -> None:
        self._do(Command.DEV_DEL, [("DEV_NAME", model.check_name("DEV_DEL", name))], f"DEV_DEL {name}")

    def set_mac(self, name: str, mac: str) -> None:
        """DEV_ATTR_SET: a net device's MAC address in its config space."""
        op = "DEV_ATTR_SET"
        attrs = [("DEV_NAME", model.check_name(op, name)), ("DEV_NET_CFG_MACADDR", model.parse_mac(op, name, mac))]
        # 6.12 acks DEV_ATTR_SET on a device of another class without doing anything: check first.
        if (device_id := self.device(name).device_id) != VirtioDeviceId.NET:
            raise InvalidArgument(op, name, f"a MAC address is set on net devices; {name} is "
                                  f"{model.class_name(device_id)}")
        self._do(Command.DEV_ATTR_SET, attrs, f"{op} {name} mac {mac}")

    # -- the requests ----------------------------------------------------------
    @staticmethod
    def _handle_attrs(op: str, handle: str) -> list[tuple[str, object]]:
        bus, name = model.split_handle(op, handle)
        return ([("MGMTDEV_BUS_NAME", bus)] if bus else []) + [("MGMTDEV_DEV_NAME", name)]

    def _dump(self, cmd: Command, what: str) -> list[VdpaMessage]:
        return self._send(cmd, [], NLM_F_REQUEST | NLM_F_DUMP, what)

    def _do(self, cmd: Command, attrs: list[tuple[str, object]], what: str) -> list[VdpaMessage]:
        return self._send(cmd, attrs, NLM_F_REQUEST | NLM_F_ACK, what)

    def _send(self, cmd: Command, attrs: list[tuple[str, object]], flags: int, what: str) -> list[VdpaMessage]:
        prid = self._sock.prid
        log.debug("netlink", cmd=cmd.name, dump=bool(flags & NLM_F_DUMP), **dict(attrs))
        try:
            replies = self._sock.nlm_request(build(cmd, attrs), msg_type=prid, msg_flags=flags)
        except NetlinkError as error:
            reason = error.args[1] if len(error.args) > 1 else None
            if error.code == errno.EPERM:
                reason = f"{reason or 'not permitted'}: this needs CAP_NET_ADMIN"
            log.debug("netlink", cmd=cmd.name, errno=errno.errorcode.get(error.code, error.code), reason=reason)
            raise refused(error.code, what, reason) from None
        # Only the family's own messages: acks and the dump's end are not answers.
        return [reply for reply in replies if reply["header"]["type"] == prid]
