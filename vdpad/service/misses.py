"""Device-IOTLB misses of a vhost core device (vhost-net with ACCESS_PLATFORM), answered from a domain.

The device asks for a translation by a MISS message on its fd and waits
until an UPDATE covers it. One thread per device (`MissServer`) runs the C
loop of vdpad.device.miss_loop on the fd: it answers each MISS with one
UPDATE for the covering mapping of a table loaded from the domain's map,
with no Python and no hop through the trio loop (whose wake-up under TCG
costs more than the whole answer). The table is loaded lazily: an
invalidation empties it, and the first miss it cannot answer comes back to
the thread, which loads the domain's current map and asks again.

A MISS the domain cannot answer (nothing mapped there, or a permission the
mapping lacks) gets no UPDATE: vhost has no reply for that (ACCESS_FAIL is
the kernel's own message to userspace) and keeps the queue waiting, as under
QEMU. It is counted, logged (rate-limited) and kept as pending, and answered
by the first domain change that maps it.

The loop's lock orders answers against invalidations: the C loop looks up
and writes each UPDATE under it, and a domain change swaps its map before it
takes the lock to empty the table and INVALIDATE, so no UPDATE from the old
map can land after the INVALIDATE that revokes it.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from vdpad.device.core import U64
from vdpad.device.iotlb_io import IotlbChannel
from vdpad.device.miss_loop import MissEvent, MissLoop, MissReport
from vdpad.device.iotlb_msg import Access, IotlbBatch, IotlbMessage, MessageType
from vdpad.device.net import VhostNet
from vdpad.iotlb.space import AddressMap, Mapping, describe_range

log = structlog.get_logger("vdpad.service")

SERVICE_WINDOW = 1 << 16  # answers whose service times the percentiles are taken over
HELD_SHOWN = 1024  # translations a session's description lists
LOG_BURST, LOG_INTERVAL = 10, 1.0  # unanswered misses logged per device: a burst, then one summary per second


class Translations(Protocol):
    """Where answers come from: a domain's current map (an immutable snapshot, swapped whole)."""

    @property
    def map(self) -> AddressMap: ...


@dataclass
class MissCounters:
    served: int = 0  # MISSes answered with an UPDATE
    unmapped: int = 0  # MISSes for an IOVA the domain does not map
    denied: int = 0  # MISSes for an access the covering mapping does not allow
    late: int = 0  # unanswered MISSes answered later, when the domain came to map them
    prefetched: int = 0  # UPDATEs written before the device asked (its used rings, at start)
    refused: int = 0  # answers the kernel refused (its IOTLB gone meanwhile: a reset); the device asks again
    invalidated: int = 0  # INVALIDATEs written

    @property
    def answered(self) -> int:
        """Misses answered, at once or once mapped: what a session counts as served."""
        return self.served + self.late

    @property
    def unanswered(self) -> int:
        return self.unmapped + self.denied


@dataclass(frozen=True)
class Unanswered:
    iova: int
    perm: Access
    why: str  # unmapped | denied


class RateLimitedLog:
    """At most LOG_BURST events per LOG_INTERVAL; the rest are counted and told in the next one let through."""

    def __init__(self, bound) -> None:
        self._log = bound
        self._window = 0.0
        self._told = 0
        self._suppressed = 0

    def warning(self, event: str, **fields) -> None:
        now = time.monotonic()
        if now - self._window >= LOG_INTERVAL:
            self._window, self._told = now, 0
        if self._told >= LOG_BURST:
            self._suppressed += 1
            return
        self._told += 1
        if self._suppressed:
            fields["suppressed"], self._suppressed = self._suppressed, 0
        self._log.warning(event, **fields)


def answer_for(mapping: Mapping | None, perm: int) -> str | None:
    """Why `mapping` cannot answer a miss for access `perm` (unmapped, denied), or None when it can."""
    if mapping is None:
        return "unmapped"
    if perm & ~mapping.perm._value_:  # on ints: Flag arithmetic costs more than the rest of an answer
        return "denied"
    return None


def service_percentiles(times_ns: list[int]) -> dict[str, float | int] | None:
    """p50, p99 and max of service times, in µs, and how many they are over (None for none)."""
    if not times_ns:
        return None
    ordered = sorted(times_ns)
    at = lambda share: ordered[min(len(ordered) - 1, len(ordered) * share // 100)] / 1000  # noqa: E731
    return {"p50": at(50), "p99": at(99), "max": ordered[-1] / 1000, "count": len(ordered)}


class MissServer:
    """Serves the misses of one vhost core device from `domain` in a thread of its own, until retire().

    It is a mapper of the domain's memory (MemoryRegion.add_mapper): a region refuses to close while the
    device may hold a translation into it (`held`), whatever happens to the thread.
    """

    def __init__(self, dev: VhostNet, domain: Translations, *, label: str):
        self.dev, self.domain, self.label = dev, domain, label
        self._loop = MissLoop(SERVICE_WINDOW)
        # Orders answers against invalidations, resets and a closing region's question (holding()).
        self.lock = self._loop.lock
        self._tally = MissCounters()  # all but `served`, which the loop counts
        self.pending: dict[tuple[int, int], Unanswered] = {}  # (iova, access) -> why it waits
        # What the device may hold now: each mapping sent (by identity: a refused INVALIDATE can leave an old
        # mapping beside a new one at the same IOVA), until an INVALIDATE covers it. The loop's answers join
        # it when taken (_take_held), always before it is read.
        self.held: dict[int, Mapping] = {}
        self._table: AddressMap | None = None  # the map the loop's table was loaded from; None: empty
        self._log = log.bind(device=dev.path, session=label)
        self._limited = RateLimitedLog(self._log)
        self._stop: tuple[int, int] | None = None  # the pipe whose write end wakes the thread to stop
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def counters(self) -> MissCounters:
        """A snapshot, read without the lock."""
        return dataclasses.replace(self._tally, served=self._loop.served)

    @property
    def serving(self) -> bool:
        """False once retired: a MISS read after that gets no answer."""
        return self._loop.serving

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving: the thread holds the fd from now until retire()."""
        ready = threading.Event()
        with self.lock:
            self._load(self.domain.map)
            self._loop.serving = True
        self._stop = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, args=(ready, self._stop[0]),
                                        name=f"vdpad-misses {self.label}", daemon=True)
        try:
            self._thread.start()
            ready.wait()
            if self._failure is not None:
                raise self._failure
        except BaseException:
            self.retire(invalidate=False)
            raise

    def retire(self, *, invalidate: bool) -> None:
        """Stop answering, make the device forget every translation (`invalidate`; without it the caller
        knows the device holds none: its fd closes), and end the thread, whatever the INVALIDATE does. A
        refused INVALIDATE is raised, and tried again by the next call."""
        try:
            with self.lock:
                self._loop.serving = False  # nothing is answered from here on
                if invalidate:
                    self._invalidate([(0, U64)])
        finally:
            self._end_thread()

    def _end_thread(self) -> None:
        if self._stop is None:
            return
        os.write(self._stop[1], b"x")
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        for fd in self._stop:
            os.close(fd)
        self._stop = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve(self, ready: threading.Event, stop: int) -> None:
        try:
            with self.dev.iotlb_channel() as channel:
                ready.set()
                while (report := self._loop.run(channel, stop)).event is not MissEvent.STOPPED:
                    if report.event is MissEvent.UNANSWERED:
                        self._unanswered(channel, report)
                    elif report.event is MissEvent.REFUSED:
                        self._refused(report)
                    else:  # vhost sends nothing but MISS today
                        self._log.warning("iotlb.unexpected", type=report.type, iova=report.iova)
        except BaseException as error:  # noqa: BLE001 - told to start(), or logged: the session sees it stopped
            self._failure = error
            if ready.is_set():
                self._log.error("misses.stopped", error=repr(error))
            ready.set()

    # -- in the thread: what the C loop hands back ---------------------------------------------
    def _unanswered(self, channel: IotlbChannel, miss: MissReport) -> None:
        """A miss the loop's table did not answer: asked again when the domain's map changed since the table
        was loaded; else it waits, counted, until a change maps it."""
        with self.lock:
            if not self._loop.serving:
                return
            current = self.domain.map
            if current is not self._table:
                self._load(current)
                miss = self._loop.answer(channel, miss)
            if miss.event is MissEvent.UNANSWERED:
                mapping = current.lookup(miss.iova)
                why = answer_for(mapping, miss.perm)
                if why is None:  # the table is the map: it would have answered
                    raise RuntimeError(f"the miss table of {self.label} did not answer {miss.iova:#x}, "
                                       f"which {mapping!r} maps")
                setattr(self._tally, why, getattr(self._tally, why) + 1)
                self.pending[(miss.iova, miss.perm)] = Unanswered(miss.iova, Access(miss.perm), why)
        if miss.event is MissEvent.REFUSED:
            self._refused(miss)
        elif miss.event is MissEvent.UNANSWERED:
            self._limited.warning("iotlb.miss_unanswered", iova=miss.iova, perm=Access(miss.perm).name,
                                  reason=why, mapped=None if mapping is None else repr(mapping))

    def _refused(self, report: MissReport) -> None:
        """e.g. a reset dropped the device's IOTLB: it asks again."""
        self._tally.refused += 1
        self._limited.warning("iotlb.update_refused", iova=report.iova, update=report.update,
                              errno=report.error)

    # -- the loop's table, with the lock held ---------------------------------------------------------
    def _load(self, current: AddressMap | None) -> None:
        """Answer from `current` from now on (None: from nothing, so a miss asks the domain's map again)."""
        quads = current.tree.update_quads() if current is not None else b""
        self._take_held()
        self._table = None  # until loaded: a refused load leaves the loop's table empty
        self._loop.load(quads)
        self._table = current

    def _take_held(self) -> None:
        """What the loop answered joins `held` (a table index means nothing once another table is loaded)."""
        for index in self._loop.take_held():
            mapping = self._table.tree.at(index)
            self.held[id(mapping)] = mapping

    # -- called by the domain and the session, in worker threads: written through the device --------
    def _update(self, mapping: Mapping) -> None:
        self.dev.write_iotlb(IotlbMessage(MessageType.UPDATE, mapping.iova, mapping.size, mapping.uaddr,
                                          mapping.perm))
        self.held[id(mapping)] = mapping

    def _invalidate(self, ranges: list[tuple[int, int]]) -> None:
        self._load(None)  # answers from the map before the change end here
        self.dev.write_iotlb_batch(IotlbBatch(0, ranges))  # one C loop however many
        self._tally.invalidated += len(ranges)
        spans: list[tuple[int, int]] = []  # (start, end), sorted and merged: disjoint
        for iova, size in sorted(ranges):
            if spans and iova <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], iova + size))
            else:
                spans.append((iova, iova + size))
        starts = [start for start, _ in spans]
        for held in list(self.held.values()):
            # Of disjoint spans, only the last one starting before the mapping's end can reach into it.
            index = bisect.bisect_left(starts, held.end) - 1
            if index >= 0 and spans[index][1] > held.iova:
                del self.held[id(held)]

    def invalidate(self, ranges: list[tuple[int, int]]) -> None:
        """INVALIDATE each (iova, size): the domain's map no longer says what the device may hold there."""
        with self.lock:
            self._invalidate(ranges)

    def retry_pending(self) -> int:
        """Answer the unanswered misses the domain maps now; returns how many."""
        answered = 0
        with self.lock:
            if not self._loop.serving:
                return 0
            for key, miss in list(self.pending.items()):
                mapping = self.domain.map.lookup(miss.iova)
                if answer_for(mapping, miss.perm) is None:
                    self._update(mapping)
                    del self.pending[key]
                    self._tally.late += 1
                    answered += 1
        return answered

    def prefetch(self, iova: int, perm: Access) -> None:
        """Translate `iova` before the device asks (vhost writes its used rings while attaching a backend,
        and fails rather than waits on a miss there). Refused when the domain cannot answer it."""
        with self.lock:
            if not self._loop.serving:
                raise LookupError(f"IOVA {iova:#x}: the miss service of {self.label} has retired")
            mapping = self.domain.map.lookup(iova)
            why = answer_for(mapping, perm)
            if why is not None:
                raise LookupError(f"IOVA {iova:#x} ({perm.name}) is {why} in the domain"
                                  + ("" if mapping is None else f": {mapping!r}"))
            self._update(mapping)
            self._tally.prefetched += 1

    def forget_all(self) -> None:
        """The device dropped its IOTLB (a reset, new features): nothing is held, nothing waits."""
        with self.lock:
            self._load(None)  # and the table's marks of what was answered with it
            self.pending.clear()
            self.held.clear()

    # -- a mapper of the domain's memory (MemoryRegion.close asks) ----------------------------------
    def holding(self):
        return self.lock

    def mappings_of(self, region) -> list[str]:
        if self.dev.released:
            return []  # the fd is closed for real: the kernel dropped the device's IOTLB
        with self.lock:
            self._take_held()
            return [f"{describe_range(m.iova, m.size)} held by {self.dev.path} ({self.label})"
                    for m in self.held.values() if m.region is region]

    def service_times(self) -> list[int]:
        """The latest SERVICE_WINDOW service times in ns (MISS read to UPDATE written), oldest first."""
        with self.lock:
            return self._loop.times()

    def describe(self) -> dict[str, object]:
        with self.lock:
            self._take_held()
            held = list(self.held.values())
            pending = list(self.pending.values())
            times = self._loop.times()
        return {**vars(self.counters), "pending": [{"iova": m.iova, "perm": m.perm.name, "reason": m.why}
                                                   for m in pending[:16]],
                "pending_count": len(pending), "running": self.running,
                "held": sorted([m.iova, m.size] for m in held)[:HELD_SHOWN],
                "held_count": len(held), "service_us": service_percentiles(times)}
