"""A session: one client's hold on one vhost-vdpa device through the daemon.

The daemon opens the node, becomes its owner and keeps the device's
DeviceIotlb; the client's memory (memfds it passed, or the daemon made for it)
and eventfds are owned here and live exactly as long as the session. Every
call on the device runs in the engine's lane (a worker thread, in call order).

Closing resets the device and closes its fd, which makes the kernel drop
every mapping and unpin every page; only then is the memory closed, so no
page the device could reach is ever freed while mapped.
"""

from __future__ import annotations

import errno
import functools
import itertools
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from vdpad.device import BackendFeature, EventFd, VhostVdpa, VringAddr
from vdpad.device.errors import InvalidArgument, NotSupportedError
from vdpad.device.iotlb_msg import Access
from vdpad.iotlb import DeviceIotlb, Mapping, MemoryRegion, Plan, Transaction
from vdpad.iotlb.tree import MappingTree
from vdpad.mgmt import binding
from vdpad.mgmt.errors import NotFound
from vdpad.mgmt.netlink import VdpaNetlink
from vdpad.mgmt.parent import MapKind, map_kind_of_mgmtdev, pins_pages_of_mgmtdev
from vdpad.service.calls import DEVICE_CALLS
from vdpad.service.memory import MemoryHolder
from vdpad.service.migration import DriverSettings

log = structlog.get_logger("vdpad.service")
T = TypeVar("T")

# Acked along with the engine's own features, when offered: a session may suspend and resume.
SESSION_BACKEND_FEATURES = BackendFeature.SUSPEND | BackendFeature.RESUME
PERMS = {"ro": Access.RO, "wo": Access.WO, "rw": Access.RW}
_EVENTFD_ROLES = {"set_vring_kick": "kick", "set_vring_call": "call", "set_config_call": "config call"}


@dataclass(frozen=True)
class Peer:
    """A connected client, from SO_PEERCRED (and SO_PEERGROUPS)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"


@dataclass
class Counters:
    commits: int = 0
    iotlb_messages: int = 0
    resets: int = 0
    errors: int = 0
    misses_served: int = 0  # device-IOTLB misses answered (vhost core sessions)
    misses_unanswered: int = 0  # ...and those the domain could not answer (unmapped, or denied)


@dataclass(frozen=True)
class MapOp:
    """One operation of a commit: map `size` bytes of registered memory at `iova`, or unmap them."""

    kind: str  # map | unmap
    iova: int
    size: int
    memory: str | None = None
    offset: int = 0
    perm: Access = Access.RW


def vm_pinned() -> int:
    """Bytes this process has pinned now (VmPin: the kernel's own count)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmPin:"):
                return int(line.split()[1]) * 1024
    return 0


class PinBudget:
    """The daemon's RLIMIT_MEMLOCK, shared by every session's lane: what commits in flight will pin counts
    with what is pinned already, so two sessions cannot both take the last of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._promised = 0

    @contextmanager
    def promise(self, device: str, added: int) -> Iterator[None]:
        """Hold `added` bytes for one commit; refused, with the numbers, where the kernel would give a bare
        EFAULT. Conservative while a commit pins: its pages count in VmPin and in its promise until it ends."""
        with self._lock:
            self._refuse_beyond(device, added)
            self._promised += added
        try:
            yield
        finally:
            with self._lock:
                self._promised -= added

    def check(self, device: str, added: int) -> None:
        """Refuse now what promise() would refuse, holding nothing (a migration's load checks before it acts)."""
        with self._lock:
            self._refuse_beyond(device, added)

    def _refuse_beyond(self, device: str, added: int) -> None:
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        if limit == resource.RLIM_INFINITY:
            return
        pinned, promised = vm_pinned(), self._promised
        if pinned + promised + added > limit:
            raise InvalidArgument("iotlb.commit", device,
                                  f"mapping {added:#x} more bytes would pin {pinned + promised + added:#x} "
                                  f"bytes; the daemon has {pinned:#x} pinned"
                                  + (f" and {promised:#x} promised to commits in flight" if promised else "")
                                  + f", and its RLIMIT_MEMLOCK is {limit:#x} (this device pins every mapped page)")


PIN_BUDGET = PinBudget()  # one per process: RLIMIT_MEMLOCK and VmPin are the process's


class BindsEventfds:
    """Binds the eventfds a client passes (a duplicate each, owned by the session from then on)."""

    number: int
    dev: Any
    eventfds: dict[str, EventFd]

    def _bind_eventfd(self, name: str, args: dict[str, Any]) -> None:
        """Bind the passed eventfd (a duplicate the session owns from now on), or unbind with None."""
        index = args.get("index")
        key = _EVENTFD_ROLES[name] + ("" if index is None else f" {index}")
        fd = args["fd"]
        adopted = EventFd.adopt(fd, f"{key} of session {self.number}") if fd is not None else None
        try:
            method = getattr(self.dev, name)
            method(*(() if index is None else (index,)), None if adopted is None else adopted.fileno())
        except BaseException:
            if adopted is not None:
                adopted.close()
            raise
        old = self.eventfds.pop(key, None)
        if adopted is not None:
            self.eventfds[key] = adopted
        if old is not None:
            old.close()  # the kernel holds its own reference to what is bound now


@dataclass
class Session(MemoryHolder, BindsEventfds):
    number: int
    owner: Peer
    device: str
    dev: VhostVdpa
    iotlb: DeviceIotlb
    pins_pages: bool
    regions: dict[str, MemoryRegion] = field(default_factory=dict)
    eventfds: dict[str, EventFd] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    opened: float = field(default_factory=time.time)
    # What the client set that vhost cannot read back, for a migration's save (vdpad.service.switchover).
    driver_settings: DriverSettings = field(default_factory=DriverSettings)
    domains: dict[int, str] = field(default_factory=dict)  # address space -> the domain it follows

    # -- life cycle (run in a worker thread) -------------------------------------------------
    @classmethod
    def open(cls, number: int, owner: Peer, device: str, *, persist: bool = True) -> Session:
        """Open device NAME's vhost-vdpa node, own it, negotiate; a half-open device is closed again."""
        bound = binding.binding_of(device)
        if bound.node is None:
            raise NotFound(errno.ENODEV, f"device {device} has no vhost-vdpa node (bound to "
                                         f"{bound.driver or 'no driver'}): `vdpad attach` binds to vhost_vdpa")
        with VdpaNetlink() as nl:
            mgmtdev = nl.device(device).mgmtdev
        try:
            kind: MapKind | None = map_kind_of_mgmtdev(mgmtdev)[0]
        except (OSError, LookupError):
            kind = None
        pins_pages = pins_pages_of_mgmtdev(mgmtdev)
        dev = VhostVdpa(bound.node)
        try:
            dev.set_owner()
            extra = dev.get_backend_features() & SESSION_BACKEND_FEATURES
            iotlb = DeviceIotlb(dev, persist=persist, backend_features=extra, map_kind=kind)
        except BaseException:
            dev.close()
            raise
        session = cls(number, owner, device, dev, iotlb, pins_pages)
        try:
            session.shape  # asked now, not inside a migration's downtime
        except BaseException:
            dev.close()
            raise
        session._log().info("session.open", node=str(bound.node), persist=iotlb.persistent,
                            pins=session.pins_pages)
        return session

    def close(self) -> list[MemoryRegion]:
        """Reset the device, close its fd (the kernel unmaps and unpins all), then eventfds and memory.

        Each step is tried whatever the one before did; what fails is logged. Memory that refuses to close
        (still mapped) is returned, for the caller to keep open: never freed while a device could reach it."""
        try:
            self.dev.set_status(0)
        except OSError as error:  # a device that cannot reset still lets go of everything on close
            self._log().warning("session.reset_failed", error=str(error))
        for what, owned in [("device", self.dev), *(("eventfd " + k, e) for k, e in self.eventfds.items()),
                            *(("memory " + k, r) for k, r in self.regions.items())]:
            try:
                owned.close()
            except Exception as error:  # noqa: BLE001 - the rest still closes
                self._log().error("session.release_failed", what=what, error=repr(error))
        unreleased = [region for region in self.regions.values() if not region.closed]
        self.eventfds.clear()
        self.regions.clear()
        self._log().info("session.closed")
        return unreleased

    @functools.cached_property
    def shape(self) -> dict[str, Any]:
        """What never changes of the device, asked once per session (a migration's load checks against it
        inside the downtime): its id, the features it offers, each queue's largest ring (GET_VRING_SIZE where
        the device tells it, else GET_VRING_NUM), groups, address spaces, IOVA range."""
        dev, iova = self.dev, self.iotlb.iova_range

        def ring_limit(index: int) -> int:
            try:
                return dev.get_vring_size(index)
            except NotSupportedError:
                return dev.get_vring_num()

        return {"device_id": dev.get_device_id(), "offered": dev.get_features(),
                "ring_limits": tuple(ring_limit(i) for i in range(dev.get_vqs_count())),
                "group_num": self.iotlb.group_num, "as_num": self.iotlb.as_num,
                "iova_first": iova.first, "iova_last": iova.last}

    async def in_lane(self, work: Callable[[], T]) -> T:
        """`work` in the device's lane (DeviceIotlb.in_lane); a failure counts in the session's errors."""
        try:
            return await self.iotlb.in_lane(work)
        except Exception:
            self.counters.errors += 1
            raise

    def _log(self, **fields: Any) -> Any:
        return log.bind(session=self.number, device=self.device, **fields)

    # -- memory (MemoryHolder) ---------------------------------------------------------------
    @property
    def holder(self) -> str:
        return f"session {self.number}"

    @property
    def holder_device(self) -> str:
        return self.device

    # -- the IOTLB ---------------------------------------------------------------------------
    def stage(self, asid: int, ops: Iterable[MapOp], allow_window: bool = False) -> tuple[Transaction, int]:
        """A transaction holding `ops`, each checked by the engine (nothing sent yet), and the bytes its maps
        add; a refused op aborts it."""
        tx = self.iotlb.transaction(asid, allow_window=allow_window)
        try:
            added = 0
            for op in ops:
                if op.kind == "map":
                    tx.map(op.iova, self.region(op.memory or ""), op.offset, op.size, op.perm)
                    added += op.size
                else:
                    tx.unmap(op.iova, op.size)
        except BaseException:
            tx.abort()
            raise
        return tx, added

    def commit(self, asid: int, ops: Iterable[MapOp], allow_window: bool) -> Plan:
        if asid in self.domains:
            raise InvalidArgument("iotlb.commit", self.device, f"AS {asid} follows domain {self.domains[asid]}: "
                                  "change the domain (domain.commit), or detach the session from it first")
        tx, added = self.stage(asid, ops, allow_window)
        return self.commit_staged(tx, added)

    def commit_staged(self, tx: Transaction, added: int) -> Plan:
        """Commit a staged transaction that maps `added` bytes, within the daemon's pin budget."""
        try:
            with PIN_BUDGET.promise(self.device, added) if self.pins_pages and added else nullcontext():
                plan = tx.commit()
        finally:
            if tx.state == "open":  # the budget refused it before its commit began
                tx.abort()
        self.counters.commits += 1
        self.counters.iotlb_messages += len(plan)
        return plan

    def reset(self) -> None:
        try:
            self.iotlb.reset()
        finally:  # SET_STATUS(0) came first: even a failed replay leaves nothing of the driver's set-up
            self.driver_settings = DriverSettings()
            self.counters.resets += 1

    # -- device calls --------------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any]) -> Any:
        """The VhostVdpa method `name` (a DEVICE_CALLS entry), with its arguments checked by the caller."""
        result = self._forward(name, args)
        self.driver_settings.note(name, args)
        return result

    def _forward(self, name: str, args: dict[str, Any]) -> Any:
        spec = DEVICE_CALLS[name]
        if name == "set_status" and args["status"] == 0:
            return self.reset()
        if name == "set_vring_addr":
            return self.dev.set_vring_addr(args["index"], VringAddr(desc=args["desc"], used=args["used"],
                                                                    avail=args["avail"]))
        if "fd" in spec.args:
            return self._bind_eventfd(name, args)
        if name == "set_config":
            return self.dev.set_config(args["offset"], args["data"])
        return getattr(self.dev, name)(*(args[a] for a in spec.args))

    # -- what is visible -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "session": self.number, "device": self.device, "node": self.dev.path,
            "owner": {"pid": self.owner.pid, "uid": self.owner.uid},
            "opened": self.opened, "persistent": self.iotlb.persistent,
            "map_kind": self.iotlb.map_kind.value if self.iotlb.map_kind else None,
            "pins_pages": self.pins_pages,
            # tuple(): one step, so a lane that registers meanwhile cannot change the dict under us
            "memory": [{"name": r.name, "size": r.size} for r in tuple(self.regions.values())],
            "mapped": self.mapped_bytes(),
            "eventfds": sorted(self.eventfds),
            "counters": vars(self.counters),
            "domains": {str(asid): name for asid, name in self.domains.items()},
        }

    def mapped_bytes(self) -> int:
        return sum(entry.size for asid in range(self.iotlb.as_num) for entry in self.iotlb.space(asid))

    def show_iotlb(self, asid: int | None, start: int, limit: int) -> list[dict[str, Any]]:
        """Each address space's map and kernel entries that start in [start, next): at most `limit` of each.
        `next` is where the following page starts (None: this was the last), the same cut for both lists."""
        spaces = range(self.iotlb.as_num) if asid is None else [asid]
        shown = []
        for number in spaces:
            view = self.iotlb.space(number)
            (asked, held), cut = page_of((view.map.tree, view.units), start, limit)
            shown.append({"asid": number, "in_sync": view.in_sync, "initial": view.initial,
                          "map": [mapping_record(m) for m in asked], "kernel": [mapping_record(m) for m in held],
                          "next": cut})
        return shown

    def info(self) -> dict[str, Any]:
        """What a client needs to drive the device, sent when the session opens."""
        iova = self.iotlb.iova_range
        return {"session": self.number, "device": self.device, "node": self.dev.path,
                "device_id": self.dev.get_device_id(), "persistent": self.iotlb.persistent,
                "backend_features": int(self.iotlb.acked), "as_num": self.iotlb.as_num,
                "group_num": self.iotlb.group_num, "iova_range": {"first": iova.first, "last": iova.last}}


def page_of(trees: Sequence[MappingTree], start: int, limit: int) -> tuple[list[list[Mapping]], int | None]:
    """Of each tree, the entries that start in [start, cut): at most `limit` of each, cut at the first IOVA
    that would take any list past it (None: no list was cut). The next page starts at the cut."""
    lists = [list(itertools.islice(tree.starting_from(start), limit + 1)) for tree in trees]
    cut = min((entries[limit].iova for entries in lists if len(entries) > limit), default=None)
    return [[m for m in entries if cut is None or m.iova < cut] for entries in lists], cut


def mapping_record(mapping: Mapping) -> dict[str, Any]:
    return {"iova": mapping.iova, "size": mapping.size, "memory": mapping.region.name,
            "offset": mapping.offset, "perm": mapping.perm.name.lower() if mapping.perm.name else int(mapping.perm)}


def plan_record(plan: Plan) -> dict[str, Any]:
    return {"invalidate": [{"iova": iova, "size": size} for iova, size in plan.invalidate],
            "update": [mapping_record(m) for m in plan.update], "messages": len(plan)}
