"""What the vdpa netlink family reports, as typed records; and the checks on what we send.

Pure logic: decoding works on any message with pyroute2's get_attr/get_attrs
(the kernel's replies, or messages built in a test), validation raises
InvalidArgument before anything reaches the kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from vdpad.device.errors import InvalidArgument
from vdpad.device.flags import NetFeature, VirtioDeviceId

# Short names for the two classes the decoding and checks below tell apart.

# struct virtio_net_config.status bits (virtio spec 5.1.4)
NET_S_LINK_UP = 1
NET_S_ANNOUNCE = 2

MTU_MIN = 68  # the kernel's policy for VDPA_ATTR_DEV_NET_CFG_MTU (virtio spec 5.1.4.1)
U16_MAX = 0xFFFF
MAX_VQ_PAIRS = 0x8000  # VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX
NAME_MAX = 255  # a device name becomes a sysfs directory name
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class Attrs(Protocol):
    def get_attr(self, name: str, default: Any = None) -> Any: ...
    def get_attrs(self, name: str) -> list[Any]: ...


def class_name(device_id: int) -> str:
    """The class name of a virtio device id ("net", "block"); "classN" for one virtio has not named."""
    try:
        return VirtioDeviceId(device_id).class_name
    except ValueError:
        return f"class{device_id}"


# -- records ------------------------------------------------------------------
@dataclass(frozen=True)
class MgmtDev:
    """A management device: what can create vdpa devices (a simulator, a PCI function...)."""

    bus: str | None
    name: str
    classes: tuple[int, ...]  # virtio device IDs it can create
    max_vqs: int
    supported_features: int

    @property
    def handle(self) -> str:
        """How commands name it: "bus/name" when it sits on a bus, else "name"."""
        return f"{self.bus}/{self.name}" if self.bus else self.name


@dataclass(frozen=True)
class Device:
    """A vdpa device on the bus, as DEV_GET reports it."""

    name: str
    mgmtdev: str  # the management device's handle
    device_id: int
    vendor_id: int
    max_vqs: int
    max_vq_size: int
    min_vq_size: int


@dataclass(frozen=True)
class NetConfig:
    """virtio-net config space fields; None where the device does not offer the feature."""

    mac: str | None
    status: int | None
    mtu: int | None
    max_vq_pairs: int | None

    @property
    def link_up(self) -> bool | None:
        return None if self.status is None else bool(self.status & NET_S_LINK_UP)

    @property
    def announce(self) -> bool | None:
        return None if self.status is None else bool(self.status & NET_S_ANNOUNCE)


@dataclass(frozen=True)
class BlkConfig:
    """virtio-blk config space fields; None where the device does not offer the feature."""

    capacity: int  # in 512-byte sectors
    size_max: int | None
    blk_size: int | None
    seg_max: int | None
    num_queues: int | None
    physical_block_exp: int | None
    alignment_offset: int | None
    min_io_size: int | None
    opt_io_size: int | None
    max_discard_sectors: int | None
    max_discard_seg: int | None
    discard_sector_alignment: int | None
    max_write_zeroes_sectors: int | None
    max_write_zeroes_seg: int | None
    read_only: bool
    flush: bool


# BlkConfig fields sent only when the device offers their feature -> their attributes
BLK_OPTIONAL = {
    "size_max": "DEV_BLK_CFG_SIZE_MAX", "blk_size": "DEV_BLK_CFG_BLK_SIZE", "seg_max": "DEV_BLK_CFG_SEG_MAX",
    "num_queues": "DEV_BLK_CFG_NUM_QUEUES", "physical_block_exp": "DEV_BLK_CFG_PHY_BLK_EXP",
    "alignment_offset": "DEV_BLK_CFG_ALIGN_OFFSET", "min_io_size": "DEV_BLK_CFG_MIN_IO_SIZE",
    "opt_io_size": "DEV_BLK_CFG_OPT_IO_SIZE", "max_discard_sectors": "DEV_BLK_CFG_MAX_DISCARD_SEC",
    "max_discard_seg": "DEV_BLK_CFG_MAX_DISCARD_SEG", "discard_sector_alignment": "DEV_BLK_CFG_DISCARD_SEC_ALIGN",
    "max_write_zeroes_sectors": "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC",
    "max_write_zeroes_seg": "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG",
}


@dataclass(frozen=True)
class DeviceConfig:
    """DEV_CONFIG_GET: the device's features and its class's config space."""

    name: str
    device_id: int
    features: int | None  # offered by the device
    negotiated_features: int | None  # None until a driver set FEATURES_OK
    net: NetConfig | None = None
    blk: BlkConfig | None = None


@dataclass(frozen=True)
class QueueStats:
    """DEV_VSTATS_GET: a queue's counters, named by the vendor driver, in the kernel's order."""

    name: str
    device_id: int
    queue_index: int
    negotiated_features: int
    max_vq_pairs: int | None
    counters: tuple[tuple[str, int], ...]

    @property
    def queue_type(self) -> str | None:
        """net: "rx" and "tx" alternate over the queue pairs, then the control queue (virtio spec 5.1.2)."""
        if self.device_id != VirtioDeviceId.NET:
            return None
        pairs = self.max_vq_pairs or 1  # the kernel sends it only with MQ or RSS negotiated
        if self.queue_index < 2 * pairs:
            return ("rx", "tx")[self.queue_index % 2]
        if self.queue_index == 2 * pairs and self.negotiated_features & NetFeature.CTRL_VQ:
            return "cvq"
        return None


# -- decoding -----------------------------------------------------------------
def _a(msg: Attrs, name: str) -> Any:
    return msg.get_attr(f"VDPA_ATTR_{name}")


def _required(msg: Attrs, name: str, what: str) -> Any:
    value = _a(msg, name)
    if value is None:
        raise ValueError(f"{what}: the kernel's reply has no VDPA_ATTR_{name}")
    return value


def _handle(msg: Attrs, what: str) -> str:
    bus = _a(msg, "MGMTDEV_BUS_NAME")
    name = _required(msg, "MGMTDEV_DEV_NAME", what)
    return f"{bus}/{name}" if bus else name


def decode_mgmtdev(msg: Attrs) -> MgmtDev:
    mask = _required(msg, "MGMTDEV_SUPPORTED_CLASSES", "MGMTDEV_GET")
    return MgmtDev(
        bus=_a(msg, "MGMTDEV_BUS_NAME") or None,
        name=_required(msg, "MGMTDEV_DEV_NAME", "MGMTDEV_GET"),
        classes=tuple(bit for bit in range(64) if mask >> bit & 1),
        max_vqs=_a(msg, "DEV_MGMTDEV_MAX_VQS") or 0,
        supported_features=_a(msg, "DEV_SUPPORTED_FEATURES") or 0,
    )


def decode_device(msg: Attrs) -> Device:
    return Device(
        name=_required(msg, "DEV_NAME", "DEV_GET"),
        mgmtdev=_handle(msg, "DEV_GET"),
        device_id=_required(msg, "DEV_ID", "DEV_GET"),
        vendor_id=_required(msg, "DEV_VENDOR_ID", "DEV_GET"),
        max_vqs=_required(msg, "DEV_MAX_VQS", "DEV_GET"),
        max_vq_size=_required(msg, "DEV_MAX_VQ_SIZE", "DEV_GET"),
        min_vq_size=_a(msg, "DEV_MIN_VQ_SIZE") or 1,
    )


def decode_config(msg: Attrs) -> DeviceConfig:
    device_id = _required(msg, "DEV_ID", "DEV_CONFIG_GET")
    net = blk = None
    if device_id == VirtioDeviceId.NET:
        net = NetConfig(
            mac=_a(msg, "DEV_NET_CFG_MACADDR"),
            status=_a(msg, "DEV_NET_STATUS"),
            mtu=_a(msg, "DEV_NET_CFG_MTU"),
            max_vq_pairs=_a(msg, "DEV_NET_CFG_MAX_VQP"),
        )
    elif device_id == VirtioDeviceId.BLOCK:
        blk = BlkConfig(
            capacity=_required(msg, "DEV_BLK_CFG_CAPACITY", "DEV_CONFIG_GET"),
            read_only=bool(_a(msg, "DEV_BLK_READ_ONLY")),
            flush=bool(_a(msg, "DEV_BLK_FLUSH")),
            **{field: _a(msg, attr) for field, attr in BLK_OPTIONAL.items()},
        )
    return DeviceConfig(
        name=_required(msg, "DEV_NAME", "DEV_CONFIG_GET"),
        device_id=device_id,
        features=_a(msg, "DEV_FEATURES"),
        negotiated_features=_a(msg, "DEV_NEGOTIATED_FEATURES"),
        net=net,
        blk=blk,
    )


def decode_stats(msg: Attrs) -> QueueStats:
    """Vendor counters come as NAME, VALUE, NAME, VALUE... attributes: pair them in order."""
    names = msg.get_attrs("VDPA_ATTR_DEV_VENDOR_ATTR_NAME")
    values = msg.get_attrs("VDPA_ATTR_DEV_VENDOR_ATTR_VALUE")
    if len(names) != len(values):
        raise ValueError(f"DEV_VSTATS_GET: {len(names)} counter names but {len(values)} values")
    return QueueStats(
        name=_required(msg, "DEV_NAME", "DEV_VSTATS_GET"),
        device_id=_required(msg, "DEV_ID", "DEV_VSTATS_GET"),
        queue_index=_required(msg, "DEV_QUEUE_INDEX", "DEV_VSTATS_GET"),
        negotiated_features=_required(msg, "DEV_NEGOTIATED_FEATURES", "DEV_VSTATS_GET"),
        max_vq_pairs=_a(msg, "DEV_NET_CFG_MAX_VQP"),
        counters=tuple(zip(names, values)),
    )


# -- what we send -------------------------------------------------------------
def check_name(op: str, name: str) -> str:
    if not name or len(name) > NAME_MAX or "/" in name or not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidArgument(op, repr(name), f"a device name is 1-{NAME_MAX} printable characters, "
                              "without '/' or spaces")
    return name


def split_handle(op: str, handle: str) -> tuple[str | None, str]:
    """"bus/name" or "name" -> (bus, name)."""
    bus, slash, name = handle.partition("/")
    if not slash:
        bus, name = "", handle
    if not name or (slash and not bus):
        raise InvalidArgument(op, repr(handle), "a management device is NAME or BUS/NAME")
    return bus or None, name


def parse_mac(op: str, device: str, text: str) -> str:
    """A unicast, non-zero MAC address as aa:bb:cc:dd:ee:ff -> its canonical lower-case form."""
    if not _MAC.match(text):
        raise InvalidArgument(op, device, f"mac={text!r} is not six hex bytes separated by ':'")
    octets = bytes.fromhex(text.replace(":", ""))
    if octets[0] & 1:
        raise InvalidArgument(op, device, f"mac={text} is a multicast address")
    if not any(octets):
        raise InvalidArgument(op, device, "mac=00:00:00:00:00:00 is not an address")
    return text.lower()


def check_mtu(op: str, device: str, mtu: int) -> int:
    if not MTU_MIN <= mtu <= U16_MAX:
        raise InvalidArgument(op, device, f"mtu={mtu} is outside {MTU_MIN}-{U16_MAX}")
    return mtu


def check_max_vqp(op: str, device: str, pairs: int) -> int:
    if not 1 <= pairs <= MAX_VQ_PAIRS:
        raise InvalidArgument(op, device, f"max_vqp={pairs} is outside 1-{MAX_VQ_PAIRS:#x}")
    return pairs


def check_features(op: str, device: str, features: int) -> int:
    if not 0 <= features < 1 << 64:
        raise InvalidArgument(op, device, f"features={features:#x} does not fit in 64 bits")
    return features


def check_queue(op: str, device: str, index: int) -> int:
    if not 0 <= index < 1 << 32:
        raise InvalidArgument(op, device, f"queue={index} does not fit in 32 bits")
    return index
