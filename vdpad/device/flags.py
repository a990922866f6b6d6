"""Named values for what the kernel reports: device ids, device status and feature bits; masks read from names."""

from __future__ import annotations

import enum

from vdpad._uapi import lib


class DeviceStatus(enum.IntFlag):
    """virtio device status (virtio spec 2.1)."""

    RESET = 0
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


class VirtioDeviceId(enum.IntEnum):
    """Virtio device IDs (virtio spec 5), as GET_DEVICE_ID and the vdpa netlink family report them."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    NINE_P = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    FS = 26

    @property
    def class_name(self) -> str:
        """The name the vdpa tool and vdpad's command line give the class ("net", "block", "9p")."""
        return "9p" if self is VirtioDeviceId.NINE_P else self.name.lower()


def _bit(n: int) -> int:
    return 1 << n


class BackendFeature(enum.IntFlag):
    """VHOST_BACKEND_F_*; the uapi gives bit numbers, these are masks."""

    IOTLB_MSG_V2 = _bit(lib.VHOST_BACKEND_F_IOTLB_MSG_V2)
    IOTLB_BATCH = _bit(lib.VHOST_BACKEND_F_IOTLB_BATCH)
    IOTLB_ASID = _bit(lib.VHOST_BACKEND_F_IOTLB_ASID)
    SUSPEND = _bit(lib.VHOST_BACKEND_F_SUSPEND)
    RESUME = _bit(lib.VHOST_BACKEND_F_RESUME)
    ENABLE_AFTER_DRIVER_OK = _bit(lib.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK)
    DESC_ASID = _bit(lib.VHOST_BACKEND_F_DESC_ASID)
    IOTLB_PERSIST = _bit(lib.VHOST_BACKEND_F_IOTLB_PERSIST)


class VirtioFeature(enum.IntFlag):
    """Device-independent virtio feature bits (virtio spec 6) and vhost's own."""

    NOTIFY_ON_EMPTY = _bit(24)
    LOG_ALL = _bit(lib.VHOST_F_LOG_ALL)
    ANY_LAYOUT = _bit(27)
    INDIRECT_DESC = _bit(28)
    EVENT_IDX = _bit(29)
    VERSION_1 = _bit(32)
    ACCESS_PLATFORM = _bit(33)
    RING_PACKED = _bit(34)
    IN_ORDER = _bit(35)
    ORDER_PLATFORM = _bit(36)
    SR_IOV = _bit(37)
    NOTIFICATION_DATA = _bit(38)
    NOTIF_CONFIG_DATA = _bit(39)
    RING_RESET = _bit(40)
    ADMIN_VQ = _bit(41)


class NetFeature(enum.IntFlag):
    """virtio-net device feature bits (virtio spec 5.1.3)."""

    CSUM = _bit(0)
    GUEST_CSUM = _bit(1)
    CTRL_GUEST_OFFLOADS = _bit(2)
    MTU = _bit(3)
    MAC = _bit(5)
    GSO = _bit(6)  # legacy
    GUEST_TSO4 = _bit(7)
    GUEST_TSO6 = _bit(8)
    GUEST_ECN = _bit(9)
    GUEST_UFO = _bit(10)
    HOST_TSO4 = _bit(11)
    HOST_TSO6 = _bit(12)
    HOST_ECN = _bit(13)
    HOST_UFO = _bit(14)
    MRG_RXBUF = _bit(15)
    STATUS = _bit(16)
    CTRL_VQ = _bit(17)
    CTRL_RX = _bit(18)
    CTRL_VLAN = _bit(19)
    CTRL_RX_EXTRA = _bit(20)
    GUEST_ANNOUNCE = _bit(21)
    MQ = _bit(22)
    CTRL_MAC_ADDR = _bit(23)
    VHOST_NET_HDR = _bit(lib.VHOST_NET_F_VIRTIO_NET_HDR)  # vhost-net only (virtio's ANY_LAYOUT bit)
    DEVICE_STATS = _bit(50)
    VQ_NOTF_COAL = _bit(52)
    NOTF_COAL = _bit(53)
    GUEST_USO4 = _bit(54)
    GUEST_USO6 = _bit(55)
    HOST_USO = _bit(56)
    HASH_REPORT = _bit(57)
    GUEST_HDRLEN = _bit(59)
    RSS = _bit(60)
    RSC_EXT = _bit(61)
    STANDBY = _bit(62)
    SPEED_DUPLEX = _bit(63)


class BlkFeature(enum.IntFlag):
    """virtio-blk device feature bits (virtio spec 5.2.3)."""

    SIZE_MAX = _bit(1)
    SEG_MAX = _bit(2)
    GEOMETRY = _bit(4)
    RO = _bit(5)
    BLK_SIZE = _bit(6)
    FLUSH = _bit(9)
    TOPOLOGY = _bit(10)
    CONFIG_WCE = _bit(11)
    MQ = _bit(12)
    DISCARD = _bit(13)
    WRITE_ZEROES = _bit(14)
    LIFETIME = _bit(15)
    SECURE_ERASE = _bit(16)
    ZONED = _bit(17)


def describe(value: int, *kinds: type[enum.IntFlag]) -> list[str]:
    """Names of the set bits, by the first kind that names each; unknown ones as bitN."""
    names = []
    for bit in range(64):
        mask = 1 << bit
        if not value & mask:
            continue
        for kind in kinds:
            try:
                member = kind(mask)
            except ValueError:
                continue
            if member.name:
                names.append(member.name)
                break
        else:
            names.append(f"bit{bit}")
    return names


# What a feature name may mean: "" (no prefix) looks in every kind.
_FEATURE_KINDS: dict[str, tuple[type[enum.IntFlag], ...]] = {
    "": (VirtioFeature, NetFeature, BlkFeature),
    "net": (VirtioFeature, NetFeature),
    "blk": (VirtioFeature, BlkFeature),
}


def parse_features(text: str) -> int:
    """A feature mask from a number (0x.., 0b.., decimal) or names joined by commas: describe()'s inverse.

    Names are those describe() prints (VERSION_1, MAC, FLUSH, bit40); one that
    net and blk both define with different bits (MQ) takes a prefix: net.MQ, blk.MQ.
    """
    text = text.strip()
    try:
        value = int(text, 0)
    except ValueError:
        pass
    else:
        if not 0 <= value < 1 << 64:
            raise ValueError(f"features {text!r} does not fit in 64 bits")
        return value
    mask = 0
    for word in filter(None, (w.strip() for w in text.split(","))):
        kind, _, name = word.rpartition(".")
        if kind.lower() not in _FEATURE_KINDS:
            raise ValueError(f"feature {word!r}: prefix {kind!r} is not net or blk")
        mask |= _feature_bit(name.upper(), kind.lower(), word)
    if not mask:
        raise ValueError(f"no feature in {text!r}: give a number (0x...) or names (VERSION_1,MAC)")
    return mask


def _feature_bit(name: str, kind: str, word: str) -> int:
    if name.startswith("BIT") and name[3:].isdigit() and int(name[3:]) < 64:
        return 1 << int(name[3:])
    bits = {int(k[name]) for k in _FEATURE_KINDS[kind] if name in k.__members__}
    if not bits:
        raise ValueError(f"unknown feature {word!r} (names as `vdpad mgmtdev list` prints them, or bitN)")
    if len(bits) > 1:
        raise ValueError(f"feature {word!r} means different bits for net and blk: write net.{name} or blk.{name}")
    return bits.pop()
