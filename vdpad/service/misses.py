"""Device-IOTLB misses of a vhost core device (vhost-net with ACCESS_PLATFORM), answered from a domain.

The device asks for a translation by a MISS message on its fd and waits
until an UPDATE covers it. One thread per device (`MissServer`) sleeps in
poll() on the fd and answers each MISS with one UPDATE for the domain's
covering mapping: no hop through the trio loop, whose wake-up under TCG costs
more than the whole answer. A MISS the domain cannot answer (nothing mapped
there, or a permission the mapping lacks) gets no UPDATE: vhost has no reply
for that (ACCESS_FAIL is the kernel's own message to userspace) and keeps the
queue waiting, as under QEMU. It is counted, logged (rate-limited) and kept
as pending, and answered by the first domain change that maps it.

The server's lock orders answers against invalidations: a lookup and its
UPDATE happen under it, and a domain change swaps its map before it takes
the lock to INVALIDATE, so no UPDATE from the old map can land after the
INVALIDATE that revokes it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from vdpad.device.iotlb_io import IotlbChannel
from vdpad.device.iotlb_msg import Access
from vdpad.device.net import VhostNet
from vdpad.iotlb.space import AddressMap, Mapping

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
    invalidated: int = 0  # INVALIDATEs written


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
    """Serves the misses of one vhost core device from `domain` in a thread of its own, until stop()."""

    def __init__(self, dev: VhostNet, domain: Translations, *, label: str):
        self.dev, self.domain, self.label = dev, domain, label
        self.counters = MissCounters()
        self.pending: dict[tuple[int, int], Unanswered] = {}  # (iova, access) -> why it waits
        # What the device may hold now: the mappings sent (iova -> end), until an INVALIDATE covers them.
        self.held: dict[int, int] = {}
        self.lock = threading.Lock()
        # Service times of the latest answers (ns, MISS read to UPDATE written): told as percentiles.
        self.service_ns: deque[int] = deque(maxlen=SERVICE_WINDOW)
        self._log = log.bind(device=dev.path, session=label)
        self._limited = RateLimitedLog(self._log)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._channel: IotlbChannel | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"vdpad-misses {label}", daemon=True)

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Wake the thread and wait for it; the fd's hold ends with it. Once only."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join()
        os.close(self._stop_w)
        os.close(self._stop_r)
        self._stop_w = self._stop_r = -1

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        try:
            with self.dev.iotlb_channel() as channel:
                self._channel = channel
                self._ready.set()
                while True:
                    message = channel.read()
                    if message is None:
                        if not channel.wait(self._stop_r):
                            return
                        continue
                    started = time.perf_counter_ns()
                    kind, iova, _size, perm = message
                    if kind == channel.MISS:
                        self._answer(channel, iova, perm, started)
                    else:  # vhost sends nothing else today
                        self._log.warning("iotlb.unexpected", type=kind, iova=iova)
        except BaseException as error:  # noqa: BLE001 - told to start(), or logged: the session sees it stopped
            self._failure = error
            if self._ready.is_set():
                self._log.error("misses.stopped", error=repr(error))
            self._ready.set()
        finally:
            self._channel = None

    def _answer(self, channel: IotlbChannel, iova: int, perm: int, started: int) -> None:
        with self.lock:
            mapping = self.domain.map.lookup(iova)
            why = answer_for(mapping, perm)
            if why is None:
                channel.update(mapping.iova, mapping.size, mapping.uaddr, mapping.perm._value_)
                self.service_ns.append(time.perf_counter_ns() - started)  # read to written, as the C loop times
                self.held[mapping.iova] = mapping.iova + mapping.size
                self.counters.served += 1
                return
            setattr(self.counters, why, getattr(self.counters, why) + 1)
            self.pending[(iova, perm)] = Unanswered(iova, Access(perm), why)
        self._limited.warning("iotlb.miss_unanswered", iova=iova, perm=Access(perm).name, reason=why,
                              mapped=None if mapping is None else repr(mapping))

    # -- called by the domain, from its commit (a worker thread) ---------------------------------
    def _live(self) -> IotlbChannel:
        channel = self._channel
        if channel is None:
            raise RuntimeError(f"the miss service of {self.label} has stopped: {self._failure!r}")
        return channel

    def invalidate(self, ranges: Iterable[tuple[int, int]]) -> None:
        """INVALIDATE each (iova, size): the domain's map no longer says what the device may hold there."""
        with self.lock:
            channel = self._live()
            for iova, size in ranges:
                channel.invalidate(iova, size)
                self.counters.invalidated += 1
                end = iova + size
                for start in [s for s, e in self.held.items() if s < end and iova < e]:
                    del self.held[start]

    def retry_pending(self) -> int:
        """Answer the unanswered misses the domain maps now; returns how many."""
        answered = 0
        with self.lock:
            if not self.pending:
                return 0
            channel = self._live()
            for key, miss in list(self.pending.items()):
                mapping = self.domain.map.lookup(miss.iova)
                if answer_for(mapping, miss.perm) is None:
                    channel.update(mapping.iova, mapping.size, mapping.uaddr, mapping.perm._value_)
                    self.held[mapping.iova] = mapping.end
                    del self.pending[key]
                    self.counters.late += 1
                    answered += 1
        return answered

    def prefetch(self, iova: int, perm: Access) -> None:
        """Translate `iova` before the device asks (vhost writes its used rings while attaching a backend,
        and fails rather than waits on a miss there). Refused when the domain cannot answer it."""
        with self.lock:
            mapping = self.domain.map.lookup(iova)
            why = answer_for(mapping, perm)
            if why is not None:
                raise LookupError(f"IOVA {iova:#x} ({perm.name}) is {why} in the domain"
                                  + ("" if mapping is None else f": {mapping!r}"))
            self._live().update(mapping.iova, mapping.size, mapping.uaddr, mapping.perm._value_)
            self.held[mapping.iova] = mapping.end
            self.counters.prefetched += 1

    def forget_pending(self) -> None:
        """A reset: the device dropped what it waited for."""
        with self.lock:
            self.pending.clear()
            self.held.clear()  # RESET_OWNER dropped the device's IOTLB

    def describe(self) -> dict[str, object]:
        return {**vars(self.counters), "pending": [{"iova": m.iova, "perm": m.perm.name, "reason": m.why}
                                                   for m in list(self.pending.values())[:16]],
                "pending_count": len(self.pending), "running": self.running,
                "held": [[iova, end - iova] for iova, end in sorted(self.held.items())[:HELD_SHOWN]],
                "held_count": len(self.held), "service_us": service_percentiles(list(self.service_ns))}
