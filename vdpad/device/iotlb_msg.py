"""The IOTLB messages written to (and read from) a vhost fd, v1 and v2."""

from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

from vdpad._uapi import ffi, lib
from vdpad.device.core import U32, U64


class MessageType(enum.IntEnum):
    MISS = lib.VHOST_IOTLB_MISS
    UPDATE = lib.VHOST_IOTLB_UPDATE
    INVALIDATE = lib.VHOST_IOTLB_INVALIDATE
    ACCESS_FAIL = lib.VHOST_IOTLB_ACCESS_FAIL
    BATCH_BEGIN = lib.VHOST_IOTLB_BATCH_BEGIN
    BATCH_END = lib.VHOST_IOTLB_BATCH_END


class Access(enum.IntFlag):
    NONE = 0
    RO = lib.VHOST_ACCESS_RO
    WO = lib.VHOST_ACCESS_WO
    RW = lib.VHOST_ACCESS_RW


class Version(enum.IntEnum):
    """The framing: struct vhost_msg (v1) or struct vhost_msg_v2."""

    V1 = lib.VHOST_IOTLB_MSG
    V2 = lib.VHOST_IOTLB_MSG_V2

    @property
    def struct(self) -> str:
        return "struct vhost_msg" if self is Version.V1 else "struct vhost_msg_v2"

    @property
    def size(self) -> int:
        return _SIZES[self]

    def check_asid(self, asid: int) -> None:
        if self is Version.V1 and asid:
            raise CodecError(f"asid={asid} needs a v2 message")

    @property
    def layout(self) -> struct.Struct:
        """The message as a struct format, fields in order: version word, (asid,) iova, size, uaddr, perm, type."""
        return _LAYOUTS[self]


def _layout(version: Version) -> struct.Struct:
    # Read off the C struct cffi compiled from the uapi header: the layout's one home stays the kernel's.
    fields = [(0, "I")] + ([(ffi.offsetof(version.struct, "asid"), "I")] if version is Version.V2 else [])
    base = ffi.offsetof(version.struct, "iotlb")
    for name, code in (("iova", "Q"), ("size", "Q"), ("uaddr", "Q"), ("perm", "B"), ("type", "B")):
        fields.append((base + ffi.offsetof("struct vhost_iotlb_msg", name), code))
    fmt, at = "=", 0
    for offset, code in fields:
        fmt += f"{offset - at}x{code}"
        at = offset + struct.calcsize("=" + code)
    layout = struct.Struct(f"{fmt}{version.size - at}x")
    assert layout.size == version.size, (fmt, version.size)
    return layout


_SIZES = {version: ffi.sizeof(version.struct) for version in Version}  # asked on every write: once here
_LAYOUTS = {version: _layout(version) for version in Version}


# The message types the kernel's write handler acts on; it answers any other with EFAULT.
WRITABLE = frozenset({MessageType.UPDATE, MessageType.INVALIDATE, MessageType.BATCH_BEGIN, MessageType.BATCH_END})
_IOTLB_OFFSET = ffi.offsetof("struct vhost_msg_v2", "iotlb")
_IOTLB_END = _IOTLB_OFFSET + ffi.offsetof("struct vhost_iotlb_msg", "type") + 1


class CodecError(ValueError):
    """Bytes that are not an IOTLB message, or a message that cannot be framed."""


@dataclass(frozen=True)
class IotlbMessage:
    type: MessageType
    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: Access = Access.NONE
    asid: int = 0

    def __post_init__(self) -> None:
        for name in ("iova", "size", "uaddr"):
            if not 0 <= getattr(self, name) <= U64:
                raise CodecError(f"{name}={getattr(self, name)!r} does not fit in 64 bits")
        if not 0 <= self.asid <= U32:
            raise CodecError(f"asid={self.asid!r} does not fit in 32 bits")
        try:
            object.__setattr__(self, "type", MessageType(self.type))
        except ValueError:
            raise CodecError(f"unknown IOTLB message type {self.type!r}") from None
        if not 0 <= int(self.perm) <= Access.RW:
            raise CodecError(f"perm={int(self.perm)!r} is not an access mode (RO=1, WO=2, RW=3)")
        object.__setattr__(self, "perm", Access(self.perm))

    @property
    def last(self) -> int:
        """The last IOVA covered (inclusive), as the kernel counts."""
        return self.iova + self.size - 1

    def problem_for_write(self) -> str | None:
        """Why the kernel would refuse this message when written, or None.

        The kernel answers every one of these with a bare EFAULT; here each
        gets its reason.
        """
        kind = self.type.name
        if self.type not in WRITABLE:
            return f"{kind} is not a message userspace writes (the kernel acts on UPDATE, INVALIDATE, BATCH_BEGIN, BATCH_END)"
        if self.type in (MessageType.BATCH_BEGIN, MessageType.BATCH_END):
            if self.iova or self.size or self.uaddr or self.perm:
                return f"{kind} carries no range: iova, size, uaddr and perm must be 0"
            return None
        if self.size == 0:
            return f"{kind} with size 0 covers nothing"
        if self.last > U64:
            return f"iova={self.iova:#x} + size={self.size:#x} runs past the end of the 64-bit IOVA space"
        if self.type is MessageType.UPDATE:
            if self.uaddr + self.size - 1 > U64:
                return f"uaddr={self.uaddr:#x} + size={self.size:#x} runs past the end of the address space"
            if self.perm not in (Access.RO, Access.WO, Access.RW):
                return f"UPDATE needs perm RO, WO or RW, not {self.perm.name}"
        elif self.perm:
            return f"INVALIDATE takes no perm (got {self.perm.name})"
        return None

    def encode(self, version: Version = Version.V2) -> bytes:
        version.check_asid(self.asid)
        msg = ffi.new(version.struct + " *")
        msg.type = version
        if version is Version.V2:
            msg.asid = self.asid
        msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr = self.iova, self.size, self.uaddr
        msg.iotlb.perm, msg.iotlb.type = self.perm, self.type
        return bytes(ffi.buffer(msg))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> IotlbMessage:
        """A message as the kernel frames it; the version is read from its first word."""
        data = bytes(data)
        if len(data) < 4:
            raise CodecError(f"{len(data)} bytes is too short for an IOTLB message")
        version_word = int.from_bytes(data[:4], "little")
        try:
            version = Version(version_word)
        except ValueError:
            raise CodecError(f"unknown IOTLB message version {version_word}") from None
        if len(data) != version.size:
            raise CodecError(f"a {version.name} message is {version.size} bytes, not {len(data)}")
        if version is Version.V1 and any(data[4:_IOTLB_OFFSET]):
            raise CodecError(f"a V1 message has padding (no asid) at bytes 4..{_IOTLB_OFFSET - 1}: found {data[4:_IOTLB_OFFSET].hex()}")
        if any(data[_IOTLB_END:]):
            raise CodecError(f"bytes {_IOTLB_END}..{len(data) - 1} are padding and must be 0")
        msg = ffi.new(version.struct + " *")
        ffi.memmove(msg, data, version.size)
        return cls(msg.iotlb.type, msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr, msg.iotlb.perm,
                   msg.asid if version is Version.V2 else 0)


def flatten(invalidate: Iterable[tuple[int, int]], update: Iterable[tuple[int, int, int, int]]) -> tuple[array, array]:
    """(iova, size) pairs and (iova, size, uaddr, perm) quads run into two arrays of u64 (OverflowError for a
    value no u64 holds): the form the C side takes a batch in."""
    return (array("Q", chain.from_iterable(invalidate)) if invalidate else array("Q"),
            array("Q", chain.from_iterable(update)) if update else array("Q"))


def as_u64s(values: array):
    """An array('Q') as the C side's uint64_t *, without a copy."""
    return ffi.from_buffer("uint64_t[]", values)


def outside_window(message: IotlbMessage, window: tuple[int, int]) -> str | None:
    """Why an UPDATE may not be written where it is: outside the (first, last) IOVAs the device translates."""
    first, last = window
    if message.type is MessageType.UPDATE and not first <= message.iova <= message.last <= last:
        return f"iova={message.iova:#x} size={message.size:#x} is outside the device's IOVA range {first:#x}..{last:#x}"
    return None


@dataclass(frozen=True)
class IotlbBatch:
    """The messages of one change to one address space, in the order vhost-vdpa takes them.

    BATCH_BEGIN (when `begin`), the INVALIDATEs, the UPDATEs, BATCH_END
    (when `end`). Kept as plain tuples, packed at once for one write loop:
    no IotlbMessage per message unless one is asked for (`messages()`).
    """

    asid: int = 0
    invalidate: Sequence[tuple[int, int]] = ()  # (iova, size)
    update: Sequence[tuple[int, int, int, int]] = ()  # (iova, size, uaddr, perm)
    begin: bool = False
    end: bool = False

    def __len__(self) -> int:
        return self.begin + len(self.invalidate) + len(self.update) + self.end

    def messages(self) -> list[IotlbMessage]:
        asid = self.asid
        return ([IotlbMessage(MessageType.BATCH_BEGIN, asid=asid)] * self.begin
                + [IotlbMessage(MessageType.INVALIDATE, iova, size, asid=asid) for iova, size in self.invalidate]
                + [IotlbMessage(MessageType.UPDATE, *row, asid=asid) for row in self.update]
                + [IotlbMessage(MessageType.BATCH_END, asid=asid)] * self.end)

    def flat(self) -> tuple[array, array]:
        """The INVALIDATE (iova, size) pairs and the UPDATE (iova, size, uaddr, perm) quads, each run into
        one array of u64 as the C side takes them. CodecError for a row of the wrong shape, OverflowError
        for a value no u64 holds."""
        invalidate, update = flatten(self.invalidate, self.update)
        if len(invalidate) != 2 * len(self.invalidate) or len(update) != 4 * len(self.update):
            raise CodecError("each INVALIDATE is (iova, size) and each UPDATE (iova, size, uaddr, perm)")
        return invalidate, update

    @classmethod
    def of_flat(cls, asid: int, invalidate: array, update: array, begin: bool, end: bool) -> IotlbBatch:
        """The batch whose flat arrays (flat()) these are."""
        return cls(asid, list(zip(invalidate[::2], invalidate[1::2])),
                   list(zip(update[::4], update[1::4], update[2::4], update[3::4])), begin, end)

    def problem_for_write(self, window: tuple[int, int] = (0, U64)) -> tuple[int, str] | None:
        """(index, problem) of the first message the kernel would refuse when written, or None.

        `window` is the (first, last) IOVA UPDATEs must lie in. One C pass
        finds the message; IotlbMessage.problem_for_write (the rules' one
        home for words) says what is wrong with it. A value that does not fit
        its field raises CodecError as building that message would.
        """
        first, last = window
        if not 0 <= self.asid <= U32:
            self.messages()  # names it (CodecError)
        try:
            invalidate, update = self.flat()
            found = lib.vdpad_iotlb_check(as_u64s(invalidate), len(self.invalidate), as_u64s(update), len(self.update),
                                          first, last)
        except OverflowError:  # a value fits no u64 field: building the messages names it
            self.messages()
            raise
        if found == len(self.invalidate) + len(self.update):
            return None
        index = self.begin + found
        message = self.messages()[index]
        return index, message.problem_for_write() or outside_window(message, window) or "refused by the C check"

    def pack(self, version: Version = Version.V2) -> bytes:
        """Every message framed as IotlbMessage.encode frames it, back to back (framed in C)."""
        version.check_asid(self.asid)
        out = ffi.new("char[]", len(self) * version.size)
        try:
            invalidate, update = self.flat()
            if update and max(update[3::4]) > 0xFF:  # the field is a byte: a wider value is named, not cut
                raise OverflowError
            lib.vdpad_iotlb_pack(version, self.asid, self.begin, self.end, as_u64s(invalidate), len(self.invalidate),
                                 as_u64s(update), len(self.update), out)
        except OverflowError:
            for message in self.messages():  # names the value that does not fit
                message.encode(version)
            raise
        return ffi.buffer(out)[:]

    @classmethod
    def of(cls, messages: Sequence[IotlbMessage]) -> IotlbBatch:
        """The batch that writes `messages` (CodecError when they are not in a batch's shape)."""
        if not messages:
            return cls()
        asid = messages[0].asid
        begin = messages[0].type is MessageType.BATCH_BEGIN
        end = len(messages) > begin and messages[-1].type is MessageType.BATCH_END
        body = messages[begin:len(messages) - end]
        invalidate = [(m.iova, m.size) for m in body if m.type is MessageType.INVALIDATE]
        update = [(m.iova, m.size, m.uaddr, m.perm) for m in body if m.type is MessageType.UPDATE]
        batch = cls(asid, invalidate, update, begin, end)
        if batch.messages() != list(messages):
            raise CodecError("a batch is one address space: BATCH_BEGIN?, INVALIDATEs, UPDATEs, BATCH_END?, "
                             "each bracket message bare (no range)")
        return batch


