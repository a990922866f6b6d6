"""The IOTLB messages written to (and read from) a vhost fd, v1 and v2."""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import add

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
        return ffi.sizeof(self.struct)

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
        if version is Version.V1 and self.asid:
            raise CodecError(f"asid={self.asid} needs a v2 message")
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

    def _columns(self) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """iova, size, uaddr, perm and type of every message, in order (built by C-level list operations)."""
        invalidated, updated = len(self.invalidate), len(self.update)
        inv = list(zip(*self.invalidate)) or [(), ()]
        upd = list(zip(*self.update)) or [(), (), (), ()]
        head, tail = [0] * self.begin, [0] * self.end
        types = ([MessageType.BATCH_BEGIN] * self.begin + [MessageType.INVALIDATE] * invalidated
                 + [MessageType.UPDATE] * updated + [MessageType.BATCH_END] * self.end)
        return ([*head, *inv[0], *upd[0], *tail], [*head, *inv[1], *upd[1], *tail],
                [*head, *repeat(0, invalidated), *upd[2], *tail],
                [*head, *repeat(0, invalidated), *upd[3], *tail], types)

    def problem_for_write(self) -> tuple[int, str] | None:
        """(index, problem) of the first message the kernel would refuse when written, or None.

        The common case, every message plainly well formed, is told in bulk;
        otherwise each message is asked (IotlbMessage.problem_for_write: the
        rules' one home), and a value that does not fit its field raises
        CodecError as building that message would.
        """
        if self._plainly_writable():
            return None
        for index, message in enumerate(self.messages()):
            if problem := message.problem_for_write():
                return index, problem
        return None

    def _plainly_writable(self) -> bool:
        # What problem_for_write asks of each message, over whole columns; anything unusual
        # (a bound reached, a bad perm) falls to the message-by-message check.
        if not 0 <= self.asid <= U32:
            return False
        if self.invalidate:
            iovas, sizes = zip(*self.invalidate)
            if min(iovas) < 0 or min(sizes) <= 0 or max(sizes) > U64 or max(map(add, iovas, sizes)) > U64 + 1:
                return False
        if self.update:
            iovas, sizes, uaddrs, perms = zip(*self.update)
            if (min(iovas) < 0 or min(sizes) <= 0 or max(sizes) > U64 or min(uaddrs) < 0
                    or max(map(add, iovas, sizes)) > U64 + 1
                    or max(map(add, uaddrs, sizes)) > U64 + 1 or not set(perms) <= _UPDATE_PERMS):
                return False
        return True

    def update_span(self) -> tuple[int, int] | None:
        """(iova, size) from the lowest UPDATE to the end of the highest, None without UPDATEs."""
        if not self.update:
            return None
        iovas, sizes = list(zip(*self.update))[:2]
        first = min(iovas)
        return first, max(map(add, iovas, sizes)) - first

    def pack(self, version: Version = Version.V2) -> bytes:
        """Every message framed as IotlbMessage.encode frames it, back to back."""
        if version is Version.V1 and self.asid:
            raise CodecError(f"asid={self.asid} needs a v2 message")
        head = (repeat(version), repeat(self.asid)) if version is Version.V2 else (repeat(version),)
        try:
            return b"".join(map(version.layout.pack, *head, *self._columns()))
        except struct.error:
            for message in self.messages():  # names the value that does not fit
                message.encode(version)
            raise

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


_UPDATE_PERMS = frozenset({Access.RO, Access.WO, Access.RW})
