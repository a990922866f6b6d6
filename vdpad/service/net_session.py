"""A session on a vhost core device: /dev/vhost-net with a tap, translating through a domain.

vhost-net has no virtio status and no config space; the session keeps the
status a virtio driver sets, so the same driver (vdpad.virtio) runs over it
as over a vhost-vdpa session. Its device IOTLB is the session's domain's:
ACCESS_PLATFORM must be acked, every translation comes from a miss the
daemon answers (vdpad.service.misses), and DRIVER_OK attaches the tap to the
enabled queues. A reset detaches them and gives the device up and back
(RESET_OWNER, SET_OWNER), which drops its rings, its IOTLB and any miss a
queue waited on.
"""

from __future__ import annotations

import errno
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from vdpad.device import BackendFeature, DeviceStatus, EventFd, VirtioFeature, VringAddr
from vdpad.device.core import U64
from vdpad.device.errors import InvalidArgument, NotSupportedError
from vdpad.device.flags import VirtioDeviceId
from vdpad.device.iotlb_msg import Access
from vdpad.device.net import VHOST_NET_VQS, VhostNet
from vdpad.device.owned import OwnedFd, duplicate_of_kind
from vdpad.device.vdpa import IovaRange
from vdpad.device.vring import LARGEST_VRING_NUM
from vdpad.service.calls import DEVICE_CALLS
from vdpad.service.misses import MissCounters, MissServer
from vdpad.service.sessions import BindsEventfds, Counters, Peer

if TYPE_CHECKING:
    from vdpad.service.domains import Domain

log = structlog.get_logger("vdpad.service")

VHOST_NET_NODE = "/dev/vhost-net"
_FORWARDED = frozenset({"set_vring_num", "set_vring_base", "get_vring_base"})  # as vhost-net takes them
_EVENTFDS = frozenset({"set_vring_kick", "set_vring_call"})
NET_DEVICE = "vhost-net"  # what session.open names it; each open is a device of its own


def adopt_tap(fd: int, what: str) -> OwnedFd:
    """An owner of a duplicate of `fd`, which must be a tap (a /dev/net/tun file after TUNSETIFF)."""
    return OwnedFd(duplicate_of_kind(fd, what, "iff:", "a tap (a /dev/net/tun file after TUNSETIFF)"), what)


@dataclass
class NetSession(BindsEventfds):
    number: int
    owner: Peer
    dev: VhostNet
    tap: OwnedFd
    device: str = NET_DEVICE
    eventfds: dict[str, EventFd] = field(default_factory=dict)
    status: int = 0
    features: int = 0  # acked
    rings: dict[int, VringAddr] = field(default_factory=dict)
    enabled: set[int] = field(default_factory=set)
    attached: set[int] = field(default_factory=set)  # queues whose backend is the tap
    domain: Domain | None = None
    misses: MissServer | None = None
    own_counters: Counters = field(default_factory=Counters)
    opened: float = field(default_factory=time.time)
    resets: int = 0
    lane: trio.CapacityLimiter | None = None  # made by the first call, in the daemon's trio run

    @classmethod
    def open(cls, number: int, owner: Peer, tap_fd: int) -> NetSession:
        tap = adopt_tap(tap_fd, f"tap of session {number}")
        try:
            dev = VhostNet(VHOST_NET_NODE)
        except BaseException:
            tap.close()
            raise
        session = cls(number, owner, dev, tap)
        try:
            session._own()
        except BaseException:
            session.close()
            raise
        session._log().info("session.open", node=VHOST_NET_NODE)
        return session

    def _own(self) -> None:
        self.dev.set_owner()
        self.dev.set_backend_features(BackendFeature.IOTLB_MSG_V2)  # the asid word the miss service reads

    def close(self) -> list:
        """Stop the miss service, close the device (the kernel drops its IOTLB), the tap and the eventfds."""
        if self.domain is not None:
            self.domain.forget(self)
        for what, owned in [("device", self.dev), ("tap", self.tap),
                            *(("eventfd " + k, e) for k, e in self.eventfds.items())]:
            try:
                owned.close()
            except Exception as error:  # noqa: BLE001 - the rest still closes
                self._log().error("session.release_failed", what=what, error=repr(error))
        self.eventfds.clear()
        self._log().info("session.closed")
        return []  # the memory is the domain's

    def _log(self, **fields: Any) -> Any:
        return log.bind(session=self.number, device=self.device, **fields)

    async def in_lane(self, work):
        """`work` in this session's lane: a worker thread, in call order (as Session.in_lane)."""
        if self.lane is None:
            self.lane = trio.CapacityLimiter(1)
        try:
            return await trio.to_thread.run_sync(work, limiter=self.lane)
        except Exception:
            self.own_counters.errors += 1
            raise

    @property
    def counters(self) -> Counters:
        misses = self.misses.counters if self.misses is not None else MissCounters()
        return Counters(resets=self.resets, errors=self.own_counters.errors,
                        misses_served=self.own_counters.misses_served + misses.answered,
                        misses_unanswered=self.own_counters.misses_unanswered + misses.unanswered)

    # -- the domain (called by Domain, in a worker thread) ----------------------------------
    def serve(self, domain: Domain) -> None:
        """Answer this device's misses from `domain` from now on."""
        misses = MissServer(self.dev, domain, label=f"session {self.number}")
        for region in list(domain.regions.values()):
            region.add_mapper(misses)  # a region the device may hold refuses to close
        misses.start()
        self.misses, self.domain = misses, domain

    def unserve(self, *, closing: bool = False) -> None:
        """Stop answering; the device forgets every translation it had (the next access waits). `closing`:
        the fd closes next, which drops the device's IOTLB anyway."""
        misses = self.misses
        if misses is None:
            return
        # Without ACCESS_PLATFORM acked the device has no IOTLB, and holds nothing to forget.
        misses.retire(invalidate=not closing and bool(self.features & VirtioFeature.ACCESS_PLATFORM))
        self.misses, self.domain = None, None
        # What it did stays in the session's counters.
        self.own_counters.misses_served += misses.counters.answered
        self.own_counters.misses_unanswered += misses.counters.unanswered

    def revoke(self, ranges: list[tuple[int, int]]) -> int:
        """A domain commit landed: INVALIDATE what it took away, answer what waited and is mapped now.
        Returns how many INVALIDATEs were sent."""
        if self.misses is None:
            return 0
        if not self.features & VirtioFeature.ACCESS_PLATFORM:
            # No IOTLB on the device (reset, or not negotiated yet): nothing held, nothing waits; and the
            # miss table is dropped with the map it was loaded from, whatever comes to ask next.
            self.misses.forget_all()
            return 0
        if ranges:
            self.misses.invalidate(ranges)
        self.misses.retry_pending()
        return len(ranges)

    # -- the device calls a virtio driver makes ------------------------------------------------
    def call(self, name: str, args: dict[str, Any]) -> Any:
        """A DEVICE_CALLS entry, as a virtio driver makes it: kept here, forwarded to vhost-net, or refused."""
        spec = DEVICE_CALLS[name]
        if name in _FORWARDED:
            return getattr(self.dev, name)(*(args[a] for a in spec.args))
        if name in _EVENTFDS:
            return self._bind_eventfd(name, args)
        handler = getattr(self, f"_{name}", None)
        if handler is None:  # no config space, no suspend: not in vhost-net
            raise NotSupportedError(name.upper(), self.device, errno=errno.EOPNOTSUPP)
        return handler(**args)

    def _get_device_id(self) -> int:
        return VirtioDeviceId.NET

    def _get_features(self) -> int:
        return self.dev.get_features()

    def _set_features(self, features: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:  # as vhost-vdpa answers EBUSY: vhost would swap the IOTLB
            raise InvalidArgument("SET_FEATURES", self.device, "features are set before FEATURES_OK: reset first")
        if not features & VirtioFeature.ACCESS_PLATFORM:
            raise InvalidArgument("SET_FEATURES", self.device, "a vhost-net session translates through its "
                                  "domain: ACCESS_PLATFORM must be acked")
        with self._answers_held():
            self.dev.set_features(features)  # ACCESS_PLATFORM: vhost makes the device a new, empty IOTLB
            self.features = features
            if self.misses is not None:
                self.misses.forget_all()

    def _get_status(self) -> int:
        return self.status

    def _set_status(self, status: int) -> None:
        if status == 0:
            return self.reset()
        if lost := self.status & ~status:  # as vhost-vdpa refuses it: only a reset takes bits away
            raise InvalidArgument("SET_STATUS", self.device, f"status {status:#x} drops bits {lost:#x} of "
                                                             f"{self.status:#x}: set 0 to reset")
        if DeviceStatus.DRIVER_OK & status and not DeviceStatus.DRIVER_OK & self.status:
            self._start()
        self.status = status

    def _answers_held(self) -> Any:
        """The miss service's lock, while the device's IOTLB changes under it (no answer lands meanwhile)."""
        return self.misses.lock if self.misses is not None else nullcontext()

    def _get_vqs_count(self) -> int:
        return VHOST_NET_VQS

    def _get_vring_num(self) -> int:
        return LARGEST_VRING_NUM

    def _get_vring_size(self, index: int) -> int:
        self.dev._check_vq("GET_VRING_SIZE", index)
        return LARGEST_VRING_NUM

    def _get_vring_group(self, index: int) -> int:
        self.dev._check_vq("GET_VRING_GROUP", index)
        return 0

    def _get_iova_range(self) -> IovaRange:
        return IovaRange(0, U64)

    def _set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        addr = VringAddr(desc=desc, avail=avail, used=used)
        self.dev.set_vring_addr(index, addr)
        self.rings[index] = addr

    def _set_vring_enable(self, index: int, enabled: bool) -> None:
        self.dev._check_vq("SET_VRING_ENABLE", index)
        (self.enabled.add if enabled else self.enabled.discard)(index)
        if DeviceStatus.DRIVER_OK & self.status:
            self._attach(index) if enabled else self._detach(index)

    def _start(self) -> None:
        """DRIVER_OK: the tap becomes the backend of every enabled queue."""
        if self.misses is None:
            raise InvalidArgument("SET_STATUS", self.device, "DRIVER_OK needs a domain to translate through: "
                                  "attach the session to one first (domain.attach)")
        if not self.features & VirtioFeature.ACCESS_PLATFORM:
            raise InvalidArgument("SET_STATUS", self.device, "DRIVER_OK before ACCESS_PLATFORM was acked")
        self.dev.set_mem_table([])  # vhost wants a table before a backend; the IOTLB translates
        try:
            for index in sorted(self.enabled):
                self._attach(index)
        except BaseException:
            for index in sorted(self.attached):  # all queues, or none
                self._detach(index)
            raise

    def _attach(self, index: int) -> None:
        ring = self.rings.get(index)
        if self.misses is None:
            raise InvalidArgument("SET_VRING_ENABLE", self.device, f"queue {index}: the session translates "
                                  "through no domain now (domain.detach): attach it to one first")
        if ring is None:
            raise InvalidArgument("SET_STATUS", self.device, f"queue {index} is enabled but has no ring address")
        try:
            # vhost writes the used ring while attaching and fails rather than waits on a miss: as QEMU does
            # at start, the daemon translates it first.
            self.misses.prefetch(ring.used, Access.WO)
        except LookupError as error:
            raise InvalidArgument("SET_STATUS", self.device, f"queue {index}'s used ring: {error}") from None
        with self.tap.use() as tap:
            self.dev.set_backend(index, tap)
        self.attached.add(index)

    def _detach(self, index: int) -> None:
        if index in self.attached:
            self.dev.set_backend(index, None)
            self.attached.discard(index)

    def reset(self) -> None:
        """Status 0: the queues let go of the tap, and the device of everything it was set up with."""
        with self._answers_held():  # an answer landing between RESET_OWNER and SET_OWNER would be refused
            for index in sorted(self.attached):
                self._detach(index)
            self.dev.reset_owner()
            try:
                self._own()
            finally:  # the device has let go of its rings and IOTLB, whatever SET_OWNER does
                if self.misses is not None:
                    self.misses.forget_all()
                self.status, self.features, self.rings, self.enabled = 0, 0, {}, set()
                for eventfd in self.eventfds.values():
                    eventfd.close()
                self.eventfds.clear()
                self.resets += 1

    # -- what is visible -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"session": self.number, "device": self.device, "node": self.dev.path, "kind": "vhost-net",
                "owner": {"pid": self.owner.pid, "uid": self.owner.uid}, "opened": self.opened,
                "status": self.status, "queues_attached": sorted(self.attached),
                "domain": self.domain.name if self.domain else None,
                "misses": self.misses.describe() if self.misses else None,
                "eventfds": sorted(self.eventfds), "counters": vars(self.counters)}

    def info(self) -> dict[str, Any]:
        return {"session": self.number, "device": self.device, "node": self.dev.path, "kind": "vhost-net",
                "device_id": int(VirtioDeviceId.NET), "persistent": False, "backend_features": int(
                    self.dev.acked_backend_features), "as_num": 1, "group_num": 1,
                "iova_range": {"first": 0, "last": U64}}
