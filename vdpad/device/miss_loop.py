"""Device-IOTLB misses answered in C: the MISS read, the lookup and the UPDATE with no Python on the way.

A vhost core device with ACCESS_PLATFORM acked asks for each translation by
a MISS on its fd and waits until an UPDATE covers it. Answered from Python,
a miss costs about three times what a bare C loop takes under TCG: the
interpreter, and the GIL handed over around each syscall. So `MissLoop`
keeps a table of translations in C (the UPDATE quads the caller loads,
sorted by IOVA) and `run` reads, looks up and writes with the GIL released,
coming back only for a miss that needs Python: one the table cannot answer,
an UPDATE the kernel refused, a message that is no MISS (and, while debug
events go somewhere, every answer, to trace it).

The loop's `lock` (re-entrant) is a Python RLock plus the C mutex the loop
takes around each answer: a thread holding it knows no answer is written
meanwhile, and may load the table, take what was answered from it, and write
to the device itself.
"""

from __future__ import annotations

import enum
import errno
import threading
from array import array
from dataclasses import dataclass

from vdpad._uapi import ffi, lib
from vdpad.device.errors import VhostError
from vdpad.device.iotlb_io import IotlbChannel
from vdpad.device.iotlb_msg import Access, CodecError, MessageType


class MissEvent(enum.IntEnum):
    """Why the loop handed a message back."""

    STOPPED = lib.VDPAD_MISS_STOPPED  # the stop fd became readable
    ANSWERED = lib.VDPAD_MISS_ANSWERED  # an UPDATE was written (reported while tracing, or to `answer`)
    UNANSWERED = lib.VDPAD_MISS_UNANSWERED  # the table maps nothing there, or not with that permission
    REFUSED = lib.VDPAD_MISS_REFUSED  # the kernel refused the UPDATE (`error`)
    UNEXPECTED = lib.VDPAD_MISS_UNEXPECTED  # a message other than MISS


@dataclass(frozen=True)
class MissReport:
    event: MissEvent
    type: int  # of the message read
    iova: int
    size: int
    perm: int
    started: int  # CLOCK_MONOTONIC ns just after it was read: an answer's service time runs from here
    error: int = 0  # REFUSED: the errno
    update: tuple[int, int, int, int] | None = None  # ANSWERED, REFUSED: the UPDATE (iova, size, uaddr, perm)


class LoopLock:
    """Re-entrant: a Python RLock, and the C loop's mutex for as long as a thread holds it."""

    def __init__(self, core):
        self._rlock = threading.RLock()
        self._core = core
        self._depth = 0
        self._owner: int | None = None

    def __enter__(self) -> LoopLock:
        self._rlock.acquire()
        if self._depth == 0:
            try:
                lib.vdpad_miss_lock(self._core)  # cffi lets go of the GIL while it waits
            except BaseException:
                self._rlock.release()
                raise
            self._owner = threading.get_ident()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            lib.vdpad_miss_unlock(self._core)
        self._rlock.release()

    def check(self, op: str) -> None:
        if self._owner != threading.get_ident():
            raise RuntimeError(f"MissLoop.{op} needs the loop's lock held by the calling thread")


def _type_name(kind: int) -> str | int:
    try:
        return MessageType(kind).name
    except ValueError:
        return kind


class MissLoop:
    """A table of translations and the C loop that answers a device's misses from it.

    The table and its bookkeeping outlive any one run: a loop is made before
    the device is served and freed with this object.
    """

    def __init__(self, window: int):
        """`window`: how many of the latest service times are kept (`times`)."""
        if window < 1:
            raise ValueError(f"a miss loop keeps at least one service time, not {window}")
        core = lib.vdpad_miss_new(window)
        if core == ffi.NULL:
            raise MemoryError(f"no memory for a miss loop keeping {window} service times")
        self._core = ffi.gc(core, lib.vdpad_miss_free)
        self.window = window
        self.lock = LoopLock(self._core)
        self._table = None  # the quads the C side answers from, kept alive here

    # -- read without the lock: plain counters ------------------------------------------------------
    @property
    def served(self) -> int:
        """UPDATEs written for misses, by `run` and `answer`."""
        return self._core.served

    @property
    def serving(self) -> bool:
        return bool(self._core.serving)

    # -- with the lock held ---------------------------------------------------------------------------
    @serving.setter
    def serving(self, value: bool) -> None:
        """False: a MISS read from now on is dropped unanswered."""
        self.lock.check("serving")
        self._core.serving = int(value)

    def load(self, quads: bytes | array) -> None:
        """Answer from these UPDATE quads (iova, size, uaddr, perm; sorted by IOVA, disjoint) from now on;
        what was answered from the old table and not taken is forgotten with it."""
        self.lock.check("load")
        table = ffi.from_buffer("uint64_t[]", quads)
        # SAFETY: the C side reads the quads in place: self._table keeps them alive until the next load.
        failed = lib.vdpad_miss_load(self._core, table, len(table) // 4)
        self._table = table if not failed else None
        if failed:
            raise MemoryError(f"no memory for a miss table of {len(table) // 4} entries")

    def take_held(self) -> list[int]:
        """The table indices answered from since the last take (each once per load): what the device may
        hold now."""
        self.lock.check("take_held")
        room = self._core.fresh
        if not room:
            return []
        out = ffi.new("uint32_t[]", room)
        return ffi.unpack(out, lib.vdpad_miss_take_held(self._core, out, room))

    def times(self) -> list[int]:
        """The latest service times in ns (MISS read to UPDATE written), oldest first."""
        self.lock.check("times")
        out = ffi.new("int64_t[]", self.window)
        return ffi.unpack(out, lib.vdpad_miss_times(self._core, out, self.window))

    def answer(self, channel: IotlbChannel, miss: MissReport) -> MissReport:
        """Answer `miss` (read by `run`) from the table as it is now: ANSWERED, UNANSWERED or REFUSED."""
        self.lock.check("answer")
        report = ffi.new("struct vdpad_miss_report *", {"type": miss.type, "perm": miss.perm, "iova": miss.iova,
                                                        "size": miss.size, "started": miss.started})
        # SAFETY: the channel holds the fd open; the lock keeps the loop's answers out meanwhile.
        lib.vdpad_miss_answer(self._core, channel.fd, channel.version, report)
        return self._reported(channel, report, read=False)

    # -- in the thread that serves the device ---------------------------------------------------------
    def run(self, channel: IotlbChannel, stop_fd: int) -> MissReport:
        """Answer the device's misses until one needs the caller (or `stop_fd` is readable: STOPPED).
        Raises VhostError when the fd cannot be read, CodecError for a message of the wrong shape."""
        report = ffi.new("struct vdpad_miss_report *")
        trace = channel.trace is not None
        while True:
            # SAFETY: the channel holds the fd open and non-blocking for the whole run; the core lives as
            # long as self; the GIL is released until a message needs Python.
            lib.vdpad_miss_serve(self._core, channel.fd, stop_fd, channel.version, trace, report)
            if report.what == lib.VDPAD_MISS_FAILED:
                raise VhostError(report.error, "IOTLB read", channel.path)
            if report.what == lib.VDPAD_MISS_MALFORMED:
                raise CodecError(f"{channel.path} sent {report.error} bytes with version word {report.version}, "
                                 f"not a {channel.version.name} message")
            if report.what == lib.VDPAD_MISS_STOPPED:
                return MissReport(MissEvent.STOPPED, 0, 0, 0, 0, 0)
            reported = self._reported(channel, report, read=True)
            if reported.event is not MissEvent.ANSWERED:  # answers come back only to be traced
                return reported

    @staticmethod
    def _reported(channel: IotlbChannel, report, *, read: bool) -> MissReport:
        """The report as a value; while debug events go somewhere, its message traced (`read`) and so is the
        UPDATE tried for it."""
        event = MissEvent(report.what)
        update = tuple(report.update) if event in (MissEvent.ANSWERED, MissEvent.REFUSED) else None
        trace = channel.trace
        if trace is not None:
            version = channel.version.name
            if read:
                trace.debug("iotlb.read", version=version, type=_type_name(report.type), iova=report.iova,
                            size=report.size, perm=Access(report.perm).name)
            if update is not None:
                iova, size, uaddr, perm = update
                refusal = {"errno": errno.errorcode.get(report.error, report.error)} if report.error else {}
                trace.debug("iotlb.write", version=version, type="UPDATE", iova=iova, size=size, uaddr=uaddr,
                            perm=Access(perm).name, **refusal)
        return MissReport(event, report.type, report.iova, report.size, report.perm, report.started,
                          report.error, update)
