"""The IOTLB message codec: v1 and v2 framing, round trips, malformed bytes, what may be written."""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from vdpad.device.iotlb_msg import WRITABLE, Access, CodecError, IotlbMessage, MessageType, Version

U64 = (1 << 64) - 1
u64 = st.integers(0, U64)
u32 = st.integers(0, 0xFFFFFFFF)
types = st.sampled_from(MessageType)
perms = st.sampled_from(Access)


@st.composite
def messages(draw, asid=u32):
    return IotlbMessage(draw(types), draw(u64), draw(u64), draw(u64), draw(perms), draw(asid))


def layout(version: int, asid: int, m: IotlbMessage) -> bytes:
    """The uapi layout written out by hand: u32 type, u32 asid (v1: padding), then
    struct vhost_iotlb_msg {u64 iova, size, uaddr; u8 perm, type} in a 64-byte union."""
    return struct.pack("<IIQQQBB38x", version, asid, m.iova, m.size, m.uaddr, m.perm, m.type)


@given(messages())
def test_v2_round_trip(message):
    data = message.encode(Version.V2)
    assert data == layout(2, message.asid, message)
    assert IotlbMessage.decode(data) == message


@given(messages(asid=st.just(0)))
def test_v1_round_trip(message):
    data = message.encode(Version.V1)
    assert data == layout(1, 0, message)
    assert IotlbMessage.decode(data) == message


@given(messages(asid=st.integers(1, 0xFFFFFFFF)))
def test_v1_has_no_asid(message):
    with pytest.raises(CodecError, match="needs a v2 message"):
        message.encode(Version.V1)


@pytest.mark.parametrize("version", list(Version))
def test_both_framings_are_72_bytes(version):
    # kernel-facts.md: vhost_msg_v2 is 72 bytes; vhost_msg's union of u64s aligns to 8 as well.
    assert version.size == 72
    assert len(IotlbMessage(MessageType.BATCH_END).encode(version)) == 72


@given(messages(), st.integers(0, 80).filter(lambda n: n != 72))
def test_wrong_length_is_refused(message, length):
    data = (message.encode() + bytes(80))[:length]
    with pytest.raises(CodecError, match="too short|bytes, not"):
        IotlbMessage.decode(data)


@given(messages(), u32.filter(lambda word: word not in (1, 2)))
def test_unknown_version_is_refused(message, word):
    data = struct.pack("<I", word) + message.encode()[4:]
    with pytest.raises(CodecError, match=f"unknown IOTLB message version {word}"):
        IotlbMessage.decode(data)


@given(messages(), st.integers(0, 255).filter(lambda t: t not in set(MessageType)))
def test_unknown_type_is_refused(message, kind):
    data = bytearray(message.encode())
    data[33] = kind
    with pytest.raises(CodecError, match=f"unknown IOTLB message type {kind}"):
        IotlbMessage.decode(data)


@given(messages(), st.integers(4, 255))
def test_unknown_perm_is_refused(message, perm):
    data = bytearray(message.encode())
    data[32] = perm
    with pytest.raises(CodecError, match=f"perm={perm} is not an access mode"):
        IotlbMessage.decode(data)


@given(messages(asid=st.just(0)), st.sampled_from(list(Version)), st.integers(34, 71), st.integers(1, 255))
def test_nonzero_padding_is_refused(message, version, where, value):
    data = bytearray(message.encode(version))
    data[where] = value
    with pytest.raises(CodecError, match="padding"):
        IotlbMessage.decode(data)


@given(messages(asid=st.just(0)), st.integers(4, 7), st.integers(1, 255))
def test_v1_hole_after_type_must_be_zero(message, where, value):
    data = bytearray(message.encode(Version.V1))
    data[where] = value
    with pytest.raises(CodecError, match="V1 message has padding"):
        IotlbMessage.decode(data)


@pytest.mark.parametrize("field, value", [("iova", -1), ("size", 1 << 64), ("uaddr", U64 + 1), ("asid", 1 << 32)])
def test_out_of_range_fields_are_refused(field, value):
    with pytest.raises(CodecError, match=f"{field}={value}"):
        IotlbMessage(MessageType.UPDATE, **{field: value})


def test_type_and_perm_are_typed():
    message = IotlbMessage(2, 0, 1, 0, 3)
    assert message.type is MessageType.UPDATE and message.perm is Access.RW
    with pytest.raises(CodecError, match="unknown IOTLB message type 9"):
        IotlbMessage(9)


# -- what the kernel acts on when written -----------------------------------------
ranges = st.tuples(u64, st.integers(1, 1 << 40), st.integers(0, 1 << 47))


@given(ranges, st.sampled_from([Access.RO, Access.WO, Access.RW]))
def test_a_fitting_update_may_be_written(span, perm):
    iova, size, uaddr = span
    assume(iova + size - 1 <= U64)
    assert IotlbMessage(MessageType.UPDATE, iova, size, uaddr, perm).problem_for_write() is None
    assert IotlbMessage(MessageType.INVALIDATE, iova, size).problem_for_write() is None


@st.composite
def wrapping(draw):
    """(iova, size) whose last byte lies beyond 2**64 - 1."""
    iova = draw(st.integers(2, U64))
    return iova, draw(st.integers(U64 - iova + 2, U64))


@given(wrapping(), st.sampled_from([MessageType.UPDATE, MessageType.INVALIDATE]))
def test_ranges_that_wrap_are_refused(span, kind):
    iova, size = span
    perm = Access.RW if kind is MessageType.UPDATE else Access.NONE
    problem = IotlbMessage(kind, iova, size, 0, perm).problem_for_write()
    assert problem and "runs past the end of the 64-bit IOVA space" in problem


@pytest.mark.parametrize("message, problem", [
    (IotlbMessage(MessageType.UPDATE, 0x1000, 0, 0x1000, Access.RW), "UPDATE with size 0 covers nothing"),
    (IotlbMessage(MessageType.INVALIDATE, 0, 0), "INVALIDATE with size 0 covers nothing"),
    (IotlbMessage(MessageType.UPDATE, 0x1000, 0x1000, U64 - 0xFFE, Access.RW), "uaddr=0x"),
    (IotlbMessage(MessageType.UPDATE, 0x1000, 0x1000, 0x1000, Access.NONE), "UPDATE needs perm RO, WO or RW, not NONE"),
    (IotlbMessage(MessageType.INVALIDATE, 0x1000, 0x1000, perm=Access.WO), "INVALIDATE takes no perm (got WO)"),
    (IotlbMessage(MessageType.MISS, 0x1000, 0x1000, perm=Access.RO), "MISS is not a message userspace writes"),
    (IotlbMessage(MessageType.ACCESS_FAIL, 0x1000, 0x1000), "ACCESS_FAIL is not a message userspace writes"),
    (IotlbMessage(MessageType.BATCH_BEGIN, 0x1000), "BATCH_BEGIN carries no range"),
    (IotlbMessage(MessageType.BATCH_END, perm=Access.RO), "BATCH_END carries no range"),
])
def test_refused_for_writing(message, problem):
    assert problem in message.problem_for_write()


@given(messages())
def test_only_writable_types_pass(message):
    if message.type not in WRITABLE:
        assert "is not a message userspace writes" in message.problem_for_write()


def test_batch_markers_may_be_written():
    for kind in (MessageType.BATCH_BEGIN, MessageType.BATCH_END):
        assert IotlbMessage(kind, asid=1).problem_for_write() is None
