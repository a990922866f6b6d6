"""Decoding the vdpa family's replies and encoding its requests, against bytes laid out as the kernel does.

The messages here are packed by hand from include/uapi/linux/vdpa.h (6.12):
attribute numbers and widths come from the table below, not from vdpad, so
a wrong number or width in vdpad's message class shows up as a failure.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpad.device.errors import InvalidArgument
from vdpad.mgmt import model
from vdpad.mgmt.netlink import Command, VdpaMessage, build

# enum vdpa_attr: number and payload format (native order, as nla_put_u* writes)
UAPI = {
    "PAD": (0, None),
    "MGMTDEV_BUS_NAME": (1, "z"), "MGMTDEV_DEV_NAME": (2, "z"), "MGMTDEV_SUPPORTED_CLASSES": (3, "Q"),
    "DEV_NAME": (4, "z"), "DEV_ID": (5, "I"), "DEV_VENDOR_ID": (6, "I"), "DEV_MAX_VQS": (7, "I"),
    "DEV_MAX_VQ_SIZE": (8, "H"), "DEV_MIN_VQ_SIZE": (9, "H"),
    "DEV_NET_CFG_MACADDR": (10, "6s"), "DEV_NET_STATUS": (11, "H"), "DEV_NET_CFG_MAX_VQP": (12, "H"),
    "DEV_NET_CFG_MTU": (13, "H"), "DEV_NEGOTIATED_FEATURES": (14, "Q"), "DEV_MGMTDEV_MAX_VQS": (15, "I"),
    "DEV_SUPPORTED_FEATURES": (16, "Q"), "DEV_QUEUE_INDEX": (17, "I"), "DEV_VENDOR_ATTR_NAME": (18, "z"),
    "DEV_VENDOR_ATTR_VALUE": (19, "Q"), "DEV_FEATURES": (20, "Q"),
    "DEV_BLK_CFG_CAPACITY": (21, "Q"), "DEV_BLK_CFG_SIZE_MAX": (22, "I"), "DEV_BLK_CFG_BLK_SIZE": (23, "I"),
    "DEV_BLK_CFG_SEG_MAX": (24, "I"), "DEV_BLK_CFG_NUM_QUEUES": (25, "H"), "DEV_BLK_CFG_PHY_BLK_EXP": (26, "B"),
    "DEV_BLK_CFG_ALIGN_OFFSET": (27, "B"), "DEV_BLK_CFG_MIN_IO_SIZE": (28, "H"),
    "DEV_BLK_CFG_OPT_IO_SIZE": (29, "I"), "DEV_BLK_CFG_MAX_DISCARD_SEC": (30, "I"),
    "DEV_BLK_CFG_MAX_DISCARD_SEG": (31, "I"), "DEV_BLK_CFG_DISCARD_SEC_ALIGN": (32, "I"),
    "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC": (33, "I"), "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG": (34, "I"),
    "DEV_BLK_READ_ONLY": (35, "B"), "DEV_BLK_FLUSH": (36, "B"),
}
BY_NUMBER = {number: name for name, (number, _) in UAPI.items()}
BLK_FIELDS = {  # BlkConfig field -> attribute; apart from vdpad's own map on purpose: it is what is checked
    "capacity": "DEV_BLK_CFG_CAPACITY", "size_max": "DEV_BLK_CFG_SIZE_MAX", "blk_size": "DEV_BLK_CFG_BLK_SIZE",
    "seg_max": "DEV_BLK_CFG_SEG_MAX", "num_queues": "DEV_BLK_CFG_NUM_QUEUES",
    "physical_block_exp": "DEV_BLK_CFG_PHY_BLK_EXP", "alignment_offset": "DEV_BLK_CFG_ALIGN_OFFSET",
    "min_io_size": "DEV_BLK_CFG_MIN_IO_SIZE", "opt_io_size": "DEV_BLK_CFG_OPT_IO_SIZE",
    "max_discard_sectors": "DEV_BLK_CFG_MAX_DISCARD_SEC", "max_discard_seg": "DEV_BLK_CFG_MAX_DISCARD_SEG",
    "discard_sector_alignment": "DEV_BLK_CFG_DISCARD_SEC_ALIGN",
    "max_write_zeroes_sectors": "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC",
    "max_write_zeroes_seg": "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG",
}
FAMILY_ID = 0x1F


def pack_attr(name: str, value: object) -> bytes:
    number, fmt = UAPI[name]
    if fmt == "z":
        payload = value.encode() + b"\0"
    elif fmt is None:
        payload = b""
    else:
        payload = struct.pack(f"={fmt}", value)
    length = 4 + len(payload)
    return struct.pack("=HH", length, number) + payload + bytes(-length % 4)


def kernel_reply(cmd: Command, *attrs: tuple[str, object]) -> VdpaMessage:
    """A reply as the kernel sends it (nlmsghdr, genlmsghdr, attributes), decoded by vdpad's class."""
    body = struct.pack("=BBH", cmd, 1, 0) + b"".join(pack_attr(n, v) for n, v in attrs)
    msg = VdpaMessage(struct.pack("=IHHII", 16 + len(body), FAMILY_ID, 0, 1, 0) + body)
    msg.decode()
    return msg


def unpack_request(msg: VdpaMessage) -> tuple[int, int, list[tuple[str, bytes]]]:
    msg.encode()
    data = bytes(msg.data)
    length, = struct.unpack_from("=I", data)
    cmd, version = struct.unpack_from("=BB", data, 16)
    attrs, offset = [], 20
    while offset < length:
        size, number = struct.unpack_from("=HH", data, offset)
        attrs.append((BY_NUMBER[number], data[offset + 4: offset + size]))
        offset += (size + 3) & ~3
    return cmd, version, attrs


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
WIDTH = {"B": u8, "H": u16, "I": u32, "Q": u64}


# -- replies -----------------------------------------------------------------------
def test_mgmtdev_on_a_bus():
    reply = kernel_reply(Command.MGMTDEV_NEW, ("MGMTDEV_BUS_NAME", "pci"), ("MGMTDEV_DEV_NAME", "0000:01:00.2"),
                         ("MGMTDEV_SUPPORTED_CLASSES", (1 << 1) | (1 << 2)), ("PAD", None),
                         ("DEV_MGMTDEV_MAX_VQS", 17), ("DEV_SUPPORTED_FEATURES", 1 << 32 | 1 << 5))
    m = model.decode_mgmtdev(reply)
    assert m == model.MgmtDev("pci", "0000:01:00.2", (1, 2), 17, 1 << 32 | 1 << 5)
    assert m.handle == "pci/0000:01:00.2"


def test_device():
    reply = kernel_reply(Command.DEV_NEW, ("MGMTDEV_DEV_NAME", "vdpasim_net"), ("DEV_NAME", "vdpa0"),
                         ("DEV_ID", 1), ("DEV_VENDOR_ID", 0x1AF4), ("DEV_MAX_VQS", 3), ("DEV_MAX_VQ_SIZE", 256),
                         ("DEV_MIN_VQ_SIZE", 64))
    assert model.decode_device(reply) == model.Device("vdpa0", "vdpasim_net", 1, 0x1AF4, 3, 256, 64)


def test_a_reply_without_a_required_attribute_says_which():
    reply = kernel_reply(Command.DEV_NEW, ("MGMTDEV_DEV_NAME", "vdpasim_net"), ("DEV_NAME", "vdpa0"))
    with pytest.raises(ValueError, match="VDPA_ATTR_DEV_ID"):
        model.decode_device(reply)


@given(mac=st.binary(min_size=6, max_size=6), status=u16, mtu=u16, pairs=u16, features=u64,
       negotiated=st.none() | u64)
def test_net_config(mac, status, mtu, pairs, features, negotiated):
    attrs = [("DEV_NAME", "n0"), ("DEV_ID", 1), ("DEV_FEATURES", features), ("DEV_NET_CFG_MTU", mtu),
             ("DEV_NET_CFG_MACADDR", mac), ("DEV_NET_STATUS", status), ("DEV_NET_CFG_MAX_VQP", pairs)]
    if negotiated is not None:
        attrs.append(("DEV_NEGOTIATED_FEATURES", negotiated))
    config = model.decode_config(kernel_reply(Command.DEV_CONFIG_GET, *attrs))
    assert (config.name, config.device_id, config.features, config.negotiated_features) == (
        "n0", 1, features, negotiated)
    assert config.net == model.NetConfig(mac.hex(":"), status, mtu, pairs)
    assert config.net.link_up == bool(status & 1) and config.net.announce == bool(status & 2)
    assert config.blk is None


def test_net_config_without_optional_fields():
    config = model.decode_config(kernel_reply(Command.DEV_CONFIG_GET, ("DEV_NAME", "n0"), ("DEV_ID", 1),
                                              ("DEV_FEATURES", 0)))
    assert config.net == model.NetConfig(None, None, None, None)
    assert config.net.link_up is None


@given(st.fixed_dictionaries({field: WIDTH[UAPI[attr][1]] for field, attr in BLK_FIELDS.items()}),
       st.booleans(), st.booleans())
def test_blk_config(values, read_only, flush):
    attrs = [("DEV_NAME", "b0"), ("DEV_ID", 2), ("DEV_FEATURES", 1 << 9)]
    attrs += [(BLK_FIELDS[field], value) for field, value in values.items()]
    attrs += [("DEV_BLK_READ_ONLY", int(read_only)), ("DEV_BLK_FLUSH", int(flush))]
    config = model.decode_config(kernel_reply(Command.DEV_CONFIG_GET, *attrs))
    assert config.blk == model.BlkConfig(**values, read_only=read_only, flush=flush)
    assert config.net is None


def test_blk_config_with_only_what_is_always_sent():
    config = model.decode_config(kernel_reply(
        Command.DEV_CONFIG_GET, ("DEV_NAME", "b0"), ("DEV_ID", 2), ("DEV_FEATURES", 0),
        ("DEV_BLK_CFG_CAPACITY", 8), ("DEV_BLK_READ_ONLY", 1), ("DEV_BLK_FLUSH", 0)))
    assert config.blk.capacity == 8 and config.blk.read_only and not config.blk.flush
    assert config.blk.size_max is None and config.blk.num_queues is None


@given(st.lists(st.tuples(st.text("abcdefgh ", min_size=1, max_size=20), u64), max_size=8))
def test_vstats_pair_names_and_values_in_order(counters):
    attrs = [("DEV_NAME", "n0"), ("DEV_ID", 1), ("DEV_NEGOTIATED_FEATURES", 1 << 32), ("DEV_QUEUE_INDEX", 1)]
    for name, value in counters:
        attrs += [("DEV_VENDOR_ATTR_NAME", name), ("PAD", None), ("DEV_VENDOR_ATTR_VALUE", value)]
    stats = model.decode_stats(kernel_reply(Command.DEV_VSTATS_GET, *attrs))
    assert stats.counters == tuple(counters)
    assert (stats.queue_index, stats.negotiated_features, stats.max_vq_pairs) == (1, 1 << 32, None)


def test_vstats_with_a_name_short_of_a_value():
    reply = kernel_reply(Command.DEV_VSTATS_GET, ("DEV_NAME", "n0"), ("DEV_ID", 1), ("DEV_QUEUE_INDEX", 0),
                         ("DEV_NEGOTIATED_FEATURES", 0), ("DEV_VENDOR_ATTR_NAME", "rx packets"))
    with pytest.raises(ValueError, match="1 counter names but 0 values"):
        model.decode_stats(reply)


@pytest.mark.parametrize("index, pairs, features, expected", [
    (0, None, 1 << 17, "rx"), (1, None, 1 << 17, "tx"), (2, None, 1 << 17, "cvq"), (2, None, 0, None),
    (5, 4, 1 << 17, "tx"), (8, 4, 1 << 17, "cvq"), (9, 4, 1 << 17, None),
])
def test_net_queue_types(index, pairs, features, expected):
    stats = model.QueueStats("n0", 1, index, features, pairs, ())
    assert stats.queue_type == expected
    assert model.QueueStats("b0", 2, index, features, pairs, ()).queue_type is None


# -- requests ----------------------------------------------------------------------
def test_dev_new_request_layout():
    msg = build(Command.DEV_NEW, [("MGMTDEV_BUS_NAME", "pci"), ("MGMTDEV_DEV_NAME", "0000:01:00.2"),
                                  ("DEV_NAME", "vdpa0"), ("DEV_NET_CFG_MACADDR", "02:11:22:33:44:55"),
                                  ("DEV_NET_CFG_MTU", 9000), ("DEV_NET_CFG_MAX_VQP", 4),
                                  ("DEV_FEATURES", 1 << 63 | 1)])
    cmd, version, attrs = unpack_request(msg)
    assert (cmd, version) == (3, 1)
    assert attrs == [
        ("MGMTDEV_BUS_NAME", b"pci\0"), ("MGMTDEV_DEV_NAME", b"0000:01:00.2\0"), ("DEV_NAME", b"vdpa0\0"),
        ("DEV_NET_CFG_MACADDR", bytes.fromhex("021122334455")), ("DEV_NET_CFG_MTU", struct.pack("=H", 9000)),
        ("DEV_NET_CFG_MAX_VQP", struct.pack("=H", 4)), ("DEV_FEATURES", struct.pack("=Q", 1 << 63 | 1)),
    ]


def test_vstats_request_layout():
    cmd, _, attrs = unpack_request(build(Command.DEV_VSTATS_GET, [("DEV_NAME", "n0"), ("DEV_QUEUE_INDEX", 2)]))
    assert cmd == 7 and attrs == [("DEV_NAME", b"n0\0"), ("DEV_QUEUE_INDEX", struct.pack("=I", 2))]


def test_command_numbers():
    assert [c.value for c in Command] == list(range(1, 9))
    assert Command.DEV_ATTR_SET == 8 and Command.DEV_VSTATS_GET == 7


# -- validation ------------------------------------------------------------------
@given(st.binary(min_size=6, max_size=6).filter(lambda b: not b[0] & 1 and any(b)), st.booleans())
def test_unicast_macs_are_accepted_in_either_case(octets, upper):
    text = octets.hex(":")
    assert model.parse_mac("op", "d", text.upper() if upper else text) == text


@given(st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] | 1]) + b[1:]))
def test_multicast_macs_are_refused(octets):
    with pytest.raises(InvalidArgument, match="multicast"):
        model.parse_mac("op", "d", octets.hex(":"))


@pytest.mark.parametrize("text", ["", "02:00:00:00:00", "02:00:00:00:00:00:00", "02-00-00-00-00-01",
                                  "0g:00:00:00:00:01", "2:0:0:0:0:1", "00:00:00:00:00:00"])
def test_malformed_macs(text):
    with pytest.raises(InvalidArgument, match="nothing was sent"):
        model.parse_mac("DEV_NEW", "vdpa0", text)


@given(st.integers(-10, 70_000))
def test_mtu_range(mtu):
    if 68 <= mtu <= 0xFFFF:
        assert model.check_mtu("op", "d", mtu) == mtu
    else:
        with pytest.raises(InvalidArgument, match=f"mtu={mtu} "):
            model.check_mtu("op", "d", mtu)


@pytest.mark.parametrize("check, good, bad", [
    (model.check_max_vqp, [1, 0x8000], [0, 0x8001, -1]),
    (model.check_features, [0, (1 << 64) - 1], [-1, 1 << 64]),
    (model.check_queue, [0, (1 << 32) - 1], [-1, 1 << 32]),
])
def test_ranges(check, good, bad):
    for value in good:
        assert check("op", "d", value) == value
    for value in bad:
        with pytest.raises(InvalidArgument):
            check("op", "d", value)


@pytest.mark.parametrize("handle, expected", [
    ("vdpasim_net", (None, "vdpasim_net")), ("pci/0000:01:00.2", ("pci", "0000:01:00.2")),
])
def test_handles(handle, expected):
    assert model.split_handle("op", handle) == expected


@pytest.mark.parametrize("handle", ["", "/x", "pci/", "/"])
def test_bad_handles(handle):
    with pytest.raises(InvalidArgument, match="NAME or BUS/NAME"):
        model.split_handle("op", handle)


@pytest.mark.parametrize("name", ["", "a/b", "a b", "tab\there", "x" * 256, "nl\n"])
def test_bad_names(name):
    with pytest.raises(InvalidArgument, match="device name"):
        model.check_name("op", name)


@pytest.mark.parametrize("name", ["vdpa0", "x" * 255, "net-1.a_b:c"])
def test_good_names(name):
    assert model.check_name("op", name) == name
