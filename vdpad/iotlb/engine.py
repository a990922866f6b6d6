"""A vhost-vdpa device's IOTLB: address spaces changed by transactions, kept across resets."""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
import trio

from vdpad.device.errors import InvalidArgument, NotSupportedError, VhostError
from vdpad.device.flags import BackendFeature, DeviceStatus, describe
from vdpad.device.iotlb_msg import Access, IotlbBatch, IotlbMessage, MessageType, flatten
from vdpad.device.vdpa import IovaRange, VhostVdpa
from vdpad.iotlb.memory import PAGE_SIZE, MemoryRegion
from vdpad.iotlb.plan import (
    Plan, after_invalidate, after_update, replay, transition, unmapped_meanwhile,
)
from vdpad.iotlb.plan import plan as plan_change
from vdpad.iotlb.space import VALID_PERMS, AddressMap, Mapping, Memory, OverlapError, describe_range
from vdpad.iotlb.tree import UPDATE_QUAD, MappingTree
from vdpad.log import debug_enabled
from vdpad.mgmt.parent import MapKind, map_kind_of_node

T = TypeVar("T")

log = structlog.get_logger("vdpad.iotlb")

#: Acked whenever offered: v2 framing (asid field), batches, address spaces.
BASE_FEATURES = BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH | BackendFeature.IOTLB_ASID


@dataclass(frozen=True)
class Written:
    """One IOTLB message written to the device, and the kernel's refusal if it refused."""

    message: IotlbMessage
    error: Exception | None = None

    @property
    def accepted(self) -> bool:
        return self.error is None


class Trace(list[Written]):
    """The messages written while recording, in order."""

    def messages(self, *types: MessageType) -> list[IotlbMessage]:
        """The accepted messages, of the given types only when types are given."""
        return [w.message for w in self if w.accepted and (not types or w.message.type in types)]


@dataclass(frozen=True)
class SpaceView:
    """A read-only picture of one address space."""

    asid: int
    map: AddressMap  # what the user asked for, normalised
    units: MappingTree  # the kernel's entries, as they were sent (reads like, and equals, a tuple)
    # Nothing sent since the last reset that gave the device its parent's initial map back:
    # a 1:1 passthrough on vdpa_sim and mlx5, nothing at all on VDUSE and platform-IOMMU parents.
    initial: bool
    needs_emptying: bool = False  # a replay could not take the initial map away yet; a commit retries

    @property
    def entries(self) -> tuple[Mapping, ...]:
        return self.map.entries

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self.map)

    def __len__(self) -> int:
        return len(self.map)

    def lookup(self, iova: int) -> Mapping | None:
        return self.map.lookup(iova)

    @property
    def in_sync(self) -> bool:
        """The kernel translates exactly as the map says (false only after a failed replay)."""
        return not self.needs_emptying and not plan_change(self.units, self.map)


@dataclass
class _Space:
    view: AddressMap = field(default_factory=AddressMap)
    units: MappingTree = field(default_factory=MappingTree)
    initial: bool = True
    needs_emptying: bool = False  # emptied by the user, but the device may still have its initial map
    # The units are known to translate exactly as `view`: a commit then plans only around what it
    # touched. False from the first message a change sends until it is known to have landed whole.
    in_step: bool = True


_BATCH = int(BackendFeature.IOTLB_BATCH)

# What stops a commit half-way: the kernel refused a write, or the device layer did before writing.
REFUSED = (VhostError, InvalidArgument)


class RollbackError(Exception):
    """The kernel refused a message, and then refused a message sent to undo the commit.

    `space` shows what the kernel holds now (tracked message by message);
    `refused` is the first refusal, `undo` the second.
    """

    def __init__(self, refused: Exception, undo: Exception, space: SpaceView):
        self.refused, self.undo, self.space = refused, undo, space
        super().__init__(f"{refused}; rolling back then failed too: {undo}. "
                         f"AS {space.asid} now holds {len(space.units)} kernel entries: see .space")


class DeviceIotlb:
    """The IOTLB of one owned vhost-vdpa device: one address map per address space.

    Negotiates the backend features at once (see module docstring), keeping
    what was acked on the fd before; the fd must already be owned
    (set_owner) before anything is committed. `map_kind` says how the parent
    applies messages (vdpad.mgmt.parent); None finds it from the node, and a
    kind that cannot be found is taken as applying each message at once.
    Thread-safe: commits, resets and group changes are serialised; the async
    variants run in one worker lane per device, in the order they were called.
    """

    def __init__(self, dev: VhostVdpa, *, persist: bool = True,
                 backend_features: BackendFeature | int = BackendFeature(0), map_kind: MapKind | None = None):
        self.dev = dev
        offered = dev.get_backend_features()
        extra = BackendFeature(int(backend_features))
        # On ints: ~ of an IntFlag only flips the bits it names, and an unnamed bit must be refused too.
        if missing := int(extra) & ~int(offered):
            names = ", ".join(describe(missing, BackendFeature))
            raise InvalidArgument("SET_BACKEND_FEATURES", dev.path,
                                  f"backend features {names} ({missing:#x}) asked for but the device offers only "
                                  f"{', '.join(describe(int(offered), BackendFeature))} ({int(offered):#x})")
        wanted = BASE_FEATURES | (BackendFeature.IOTLB_PERSIST if persist else BackendFeature(0))
        kept = dev.acked_backend_features & ~BackendFeature.IOTLB_PERSIST  # acked before us: not ours to drop
        dev.set_backend_features(kept | (wanted & offered) | extra)
        self.map_kind = map_kind if map_kind is not None else map_kind_of_node(dev.path)
        self.iova_range: IovaRange = dev.get_iova_range()
        self.as_num = self._count(dev.get_as_num) if BackendFeature.IOTLB_ASID in self.acked else 1
        self.group_num = self._count(dev.get_group_num)
        self._spaces = [_Space() for _ in range(self.as_num)]
        self._group_asid: dict[int, int] = {}
        self._recorders: list[Callable[[Written], None]] = []
        self._lock = threading.RLock()
        self._open_batch: int | None = None  # the ASID of a batch the kernel did not see end
        self._unguarded = False  # a region without add_mapper was mapped here
        self._log = log.bind(device=dev.path)  # its level is bound now, as a device's logger is
        self._debug = debug_enabled(self._log)
        self._log.debug("iotlb.open", acked=str(self.acked), as_num=self.as_num, groups=self.group_num,
                        map_kind=self.map_kind.value if self.map_kind else "unknown (taken as at once)",
                        reset="kept" if self.persistent else "replayed", atomic_batches=self.atomic_batches,
                        iova_first=self.iova_range.first, iova_last=self.iova_range.last)

    def _count(self, getter: Callable[[], int]) -> int:
        try:
            return getter()
        except NotSupportedError:  # kernels before address spaces: one of everything
            self._log.debug("iotlb.fallback", missing=getter.__name__, using=1)
            return 1

    # -- what is known ------------------------------------------------------------
    @property
    def acked(self) -> BackendFeature:
        """The backend features the fd has acked now (whoever acked them)."""
        return self.dev.acked_backend_features

    @property
    def persistent(self) -> bool:
        """The kernel keeps the maps across SET_STATUS(0) (IOTLB_PERSIST acked)."""
        return BackendFeature.IOTLB_PERSIST in self.acked

    @property
    def batching(self) -> bool:
        return bool(int(self.acked) & _BATCH)  # int arithmetic: asked on every commit

    @property
    def atomic_batches(self) -> bool:
        """A commit reaches the device as one switch: a set_map parent, with batches acked."""
        return self._atomic(self.batching)

    def _atomic(self, batching: bool) -> bool:
        return batching and self.map_kind is not None and self.map_kind.atomic_batches

    @property
    def open_batch(self) -> int | None:
        """The address space of a batch whose BATCH_END the kernel refused: the next write ends it first."""
        return self._open_batch

    def space(self, asid: int = 0) -> SpaceView:
        self._check_asid("IOTLB space", asid)
        with self._lock:
            return self._view(asid)

    def _view(self, asid: int) -> SpaceView:
        space = self._spaces[asid]
        return SpaceView(asid, space.view, space.units, space.initial, space.needs_emptying)

    @property
    def group_asids(self) -> dict[int, int]:
        """The groups this engine moved, and to which address space."""
        with self._lock:
            return dict(self._group_asid)

    def holding(self) -> threading.RLock:
        """The engine's lock: while held, nothing is mapped (MemoryRegion.close holds it)."""
        return self._lock

    def mappings_of(self, region: Memory) -> list[str]:
        """Where the kernel maps `region` through this device now (MemoryRegion.close asks before closing)."""
        if self.dev.released:
            return []  # the fd is closed for real (no call in flight holds it): the kernel unmapped everything
        with self._lock:
            return [f"AS {asid} {describe_range(unit.iova, unit.size)} on {self.dev.path}"
                    for asid, space in enumerate(self._spaces) for unit in space.units if unit.region is region]

    # -- the trace ------------------------------------------------------------------
    def add_recorder(self, recorder: Callable[[Written], None]) -> None:
        self._recorders.append(recorder)

    def remove_recorder(self, recorder: Callable[[Written], None]) -> None:
        self._recorders.remove(recorder)

    @contextmanager
    def record(self) -> Iterator[Trace]:
        """`with iotlb.record() as trace:` collects every message written meanwhile."""
        trace = Trace()
        self.add_recorder(trace.append)
        try:
            yield trace
        finally:
            self.remove_recorder(trace.append)

    # -- changing maps ------------------------------------------------------------------
    def transaction(self, asid: int = 0, *, allow_window: bool = False) -> Transaction:
        """See Transaction; `allow_window` lets a commit unmap live bytes for an instant (see _suspend_for)."""
        return Transaction(self, asid, allow_window=allow_window)

    def map(self, asid: int, iova: int, region: Memory, offset: int, size: int,
            perm: Access = Access.RW) -> Plan:
        """A one-operation transaction; returns what was sent."""
        return Transaction(self, asid).map(iova, region, offset, size, perm).commit()

    def unmap(self, asid: int, iova: int, size: int) -> Plan:
        return Transaction(self, asid).unmap(iova, size).commit()

    def set_group_asid(self, group: int, asid: int) -> None:
        """Make the vqs of `group` use address space `asid` (kept across reset())."""
        self._check_asid("SET_GROUP_ASID", asid)
        with self._lock:
            self.dev.set_group_asid(group, asid)
            self._group_asid[group] = asid

    def reset(self) -> None:
        """SET_STATUS(0), then every address space translates as before.

        With IOTLB_PERSIST the kernel kept the maps: no IOTLB message is sent.
        Without it the device's maps may have gone back to the parent's
        initial map while vhost-vdpa kept its entries: each address space that
        was changed is replayed (see plan.replay), one batch per space; an
        emptied one is emptied on the device again. Group address spaces are
        set again either way (devices point every vq back at AS 0 on reset).
        """
        with self._lock:
            if not self.persistent:
                for asid, space in enumerate(self._spaces):
                    for entry in space.view:
                        if entry.region.closed:
                            raise InvalidArgument("reset", self.dev.path,
                                                  f"{entry} in AS {asid} points into a closed region: "
                                                  "it could not be replayed")
            self._end_batch()  # one the kernel did not see end, if any
            self.dev.set_status(0)
            failures: list[Exception] = []
            if not self.persistent:
                for asid, space in enumerate(self._spaces):
                    if space.initial:
                        continue  # never changed: the reset gave it back what it had
                    space.initial = True
                    try:
                        self._replay(asid, space)
                    except Exception as error:  # noqa: BLE001 - every space gets its replay, every group its AS
                        error.add_note(f"AS {asid} is only partly replayed: commit an empty "
                                       "transaction on it to retry")
                        failures.append(error)
            for group, asid in self._group_asid.items():
                self.dev.set_group_asid(group, asid)
            self._log.debug("iotlb.reset", path="kept" if self.persistent else "replayed", failed=len(failures))
            if failures:
                raise failures[0]

    def _replay(self, asid: int, space: _Space) -> None:
        work = replay(space.units, space.view)
        if work:
            self._run(asid, space, work)
        else:
            self._empty_device_map(asid, space)
        space.in_step = True

    def forget_initial_map(self, asid: int) -> None:
        """Make an address space nothing was sent to translate nothing, rather than as its parent started it
        (vdpa_sim's 1:1 passthrough). A space something was sent to already translates only as its map says."""
        self._check_asid("IOTLB forget initial map", asid)
        with self._lock:
            space = self._spaces[asid]
            if space.initial and not space.view:
                self._empty_device_map(asid, space)
                space.in_step = True

    def _empty_device_map(self, asid: int, space: _Space) -> None:
        """Take the parent's initial map (vdpa_sim's 1:1) away from an address space the user emptied.

        An empty batch does it on a set_map parent only; a dma_map parent is
        told nothing by vhost-vdpa until it maps something, and an INVALIDATE
        of nothing reaches no parent. So one page is mapped read-only and
        unmapped again: every kind of parent ends up translating nothing.
        """
        first = -(-self.iova_range.first // PAGE_SIZE) * PAGE_SIZE
        space.needs_emptying = True  # until the page is unmapped again; a commit retries
        page = MemoryRegion(PAGE_SIZE, "vdpad-empty")
        self._track(page)  # nobody else knows the page: no close() to wait for
        unit = Mapping(first, PAGE_SIZE, page, 0, Access.RO)
        try:
            self._run(asid, space, Plan((), (unit,), after_update(space.units, unit)))
        except BaseException:
            page.close()  # refused: never mapped
            raise
        # Refused, the page stays open: the kernel maps it, and the unit that says so keeps it alive.
        self._run(asid, space, Plan(((first, PAGE_SIZE),), (), after_invalidate(space.units, first, PAGE_SIZE)))
        space.needs_emptying = False
        page.close()
        self._log.debug("iotlb.emptied", asid=asid, iova=first)

    # -- async (never block a trio loop: a write that pins pages can take long) -----------
    async def in_lane(self, work: Callable[[], T]) -> T:
        """Run `work` in a worker thread, after every call made before it on this device.

        Any other call on the device (a vring set-up, a status change) goes through here too,
        so a trio program keeps one order of calls per device."""
        return await trio.to_thread.run_sync(work, limiter=_lane(self))

    @asynccontextmanager
    async def atransaction(self, asid: int = 0, *, allow_window: bool = False) -> AsyncIterator[Transaction]:
        """`async with iotlb.atransaction(asid) as tx:` commits in the device's worker lane."""
        tx = Transaction(self, asid, allow_window=allow_window)
        try:
            yield tx
            await self.in_lane(tx.commit)
        finally:
            if tx.state == "open":  # the body raised, or the commit was cancelled before it started
                tx.abort()

    async def amap(self, asid: int, iova: int, region: Memory, offset: int, size: int,
                   perm: Access = Access.RW) -> Plan:
        return await self.in_lane(functools.partial(self.map, asid, iova, region, offset, size, perm))

    async def aunmap(self, asid: int, iova: int, size: int) -> Plan:
        return await self.in_lane(functools.partial(self.unmap, asid, iova, size))

    async def areset(self) -> None:
        await self.in_lane(self.reset)

    async def aset_group_asid(self, group: int, asid: int) -> None:
        await self.in_lane(functools.partial(self.set_group_asid, group, asid))

    # -- validation ------------------------------------------------------------------------
    def _refuse(self, op: str, problem: str) -> InvalidArgument:
        return InvalidArgument(op, self.dev.path, problem)

    def _check_asid(self, op: str, asid: int) -> None:
        if not 0 <= asid < self.as_num:
            why = "" if BackendFeature.IOTLB_ASID in self.acked else " (IOTLB_ASID not acked)"
            raise self._refuse(op, f"asid={asid} is not below the device's {self.as_num} address spaces{why}")

    def _check_range(self, op: str, iova: int, size: int) -> None:
        if not isinstance(iova, int) or not isinstance(size, int):
            raise self._refuse(op, f"iova={iova!r} and size={size!r} must be integers")
        if size <= 0:
            raise self._refuse(op, f"size={size:#x} must be positive")
        if iova % PAGE_SIZE or size % PAGE_SIZE:
            name, value = ("iova", iova) if iova % PAGE_SIZE else ("size", size)
            raise self._refuse(op, f"{name}={value:#x} is not a multiple of the page size {PAGE_SIZE:#x}")
        first, last = self.iova_range.first, self.iova_range.last
        if iova < first or iova + size - 1 > last:
            raise self._refuse(op, f"{describe_range(iova, size)} is outside the device's IOVA range "
                                   f"[{first:#x}, {last:#x}]")

    def _checked_mapping(self, iova: int, region: Memory, offset: int, size: int, perm: Access) -> Mapping:
        op = "IOTLB map"
        self._check_range(op, iova, size)
        if type(perm) is not Access:  # a plain int, from the wire: its flag, if it names one
            try:
                perm = Access(perm)
            except ValueError:
                perm = None
        if perm not in VALID_PERMS:
            raise self._refuse(op, f"perm must be RO, WO or RW, not {perm!r}")
        try:
            closed, region_size = region.closed, region.size
            region.address  # noqa: B018 - a mapping reads it: a region without one is refused here
        except AttributeError as missing:
            raise self._refuse(op, f"{region!r} is not a memory region (no {missing.name})") from None
        if closed:
            raise self._refuse(op, f"{region!r} is closed")
        if not isinstance(offset, int) or offset < 0 or offset % PAGE_SIZE:
            raise self._refuse(op, f"offset={offset!r} is not a page-aligned offset (page size {PAGE_SIZE:#x})")
        if offset + size > region_size:
            raise self._refuse(op, f"offset {offset:#x} + size {size:#x} runs past the end of {region!r}")
        return Mapping(iova, size, region, offset, perm)

    # -- commit ------------------------------------------------------------------------------
    def _commit(self, tx: Transaction) -> Plan:
        # Before the lock: a region waits here for a close() in progress (which holds our lock),
        # and a region that is open once we hold the lock stays open until we let go.
        for region in tx.regions:
            self._track(region)
        with self._lock:
            space = self._spaces[tx.asid]
            # Other commits may have landed since tx began: its operations then apply to the map they left.
            target = tx.pending if space.view is tx.base else tx._replay_onto(space.view)
            # In step, every entry of the current map is held by kernel units, and a region the kernel
            # maps refuses to close (when it can be told, add_mapper): then only what the transaction's
            # own operations map can be closed.
            touched = tx.touched if space.in_step else None
            if touched is None or self._unguarded or tx.maps_closed_region():
                checked = (target if touched is None
                           else (entry for iova, end in touched for entry in target.tree.overlapping(iova, end)))
                for entry in checked:
                    if entry.region.closed:
                        raise self._refuse("IOTLB commit", f"{entry} points into a closed region")
            work = plan_change(space.units, target, touched)
            batching = self.batching
            atomic = self._atomic(batching)  # a set_map parent never sees the gap between INVALIDATE and UPDATE
            window = unmapped_meanwhile(space.units, work, target) if work.invalidate and not atomic else ()
            suspend = bool(window) and self._suspend_for(tx, window)
            if self._debug:  # the event's fields cost more than the rest of a one-mapping commit's logic
                self._log.debug("iotlb.commit", asid=tx.asid, invalidate=len(work.invalidate),
                                update=len(work.update), entries=len(target), window=len(window),
                                path="batch" if atomic else "suspended" if suspend else "at once")
            if work.invalidate or work.update:
                if suspend:
                    with self._suspended():
                        self._run(tx.asid, space, work, undo_to=space.units, batching=batching)
                        # Sent: a RESUME refused after this leaves the map booked as the kernel holds it.
                        space.view, space.in_step = target, True
                else:
                    self._run(tx.asid, space, work, undo_to=space.units, batching=batching)
            elif space.needs_emptying:
                self._empty_device_map(tx.asid, space)  # left over from a reset whose emptying failed
            space.view = target
            space.in_step = True  # all that was needed landed: the kernel translates as the view
            return work

    def _suspend_for(self, tx: Transaction, window: tuple[tuple[int, int], ...]) -> bool:
        """Whether the device must be suspended while a commit unmaps `window` for an instant.

        `window` (not empty) holds bytes mapped before and after the commit
        that its INVALIDATEs free before its UPDATEs map them again, on a
        parent that applies each message at once: a running device may reach
        into it. (A set_map parent takes the batch as one switch: no window.)
        """
        if self.dev.suspended or DeviceStatus.DRIVER_OK not in self.dev.get_status():
            return False  # nothing is running that could reach the gap
        if BackendFeature.SUSPEND | BackendFeature.RESUME in self.acked:
            return True
        spans = ", ".join(describe_range(iova, size) for iova, size in window)
        if tx.allow_window:
            self._log.debug("iotlb.window_allowed", asid=tx.asid, window=spans)
            return False
        kind = self.map_kind.value if self.map_kind else "of an unknown kind"
        raise self._refuse("IOTLB commit", f"{spans} of AS {tx.asid} stay mapped but would be unmapped for an "
                                           f"instant: the parent ({kind}) applies each message at once and the "
                                           "device is running, with SUSPEND and RESUME not both acked. Suspend "
                                           "it first, ack SUSPEND and RESUME, or allow the window")

    @contextmanager
    def _suspended(self) -> Iterator[None]:
        self.dev.suspend()
        try:
            yield
        except BaseException as error:
            try:
                self.dev.resume()
            except REFUSED as resume_error:
                error.add_note(f"resuming {self.dev.path} after the commit failed too: {resume_error}")
            raise
        try:
            self.dev.resume()
        except REFUSED as error:
            error.add_note("the commit itself was sent and is booked; the device is still suspended")
            raise

    def _track(self, region: Memory) -> None:
        """Tell the region it is mapped here, so it refuses to close while the kernel maps it."""
        add_mapper = getattr(region, "add_mapper", None)
        if add_mapper is not None:
            add_mapper(self)
        else:
            self._unguarded = True  # a region that may close while mapped: commits check every touched entry

    def _run(self, asid: int, space: _Space, work: Plan, *, undo_to: MappingTree | None = None,
             batching: bool | None = None) -> None:
        """Send `work` for one address space, inside one batch when batches are acked.

        BATCH_BEGIN, the work and BATCH_END go to the kernel in one write
        loop; `space.units` is booked from how far it got. If the kernel
        refuses a message of the work and `undo_to` is given, the units are
        brought back to it in the same batch, so a batching device never sees
        the half-way map.
        """
        if self._open_batch is not None:
            self._end_batch()  # one the kernel did not see end
        if batching is None:
            batching = self.batching
        was_initial, space.initial = space.initial, False  # from here on only a reset brings it back
        space.in_step = False  # until the caller knows the whole change landed
        end_refused = None
        try:
            try:
                self._send(asid, space, work, begin=batching, end=batching)
            except REFUSED as refused:
                landed = getattr(refused, "accepted", 0) - batching  # messages of the work the kernel took
                if batching and landed == len(work):
                    end_refused = refused  # the work landed; the batch is open until a BATCH_END is taken
                elif undo_to is None or landed < 0:
                    raise  # no undo asked for, or BATCH_BEGIN refused: nothing was sent
                else:
                    try:
                        self._send(asid, space, transition(space.units, undo_to))
                    except REFUSED as undo:
                        raise RollbackError(refused, undo, self._view(asid)) from refused
                    refused.add_note(f"rolled back: AS {asid} holds what it held before the commit"
                                     + (", but for the parent's initial map, which the first message replaced"
                                        if was_initial else ""))
                    raise
        except BaseException as error:
            self._end_batch(during=error)
            raise
        if end_refused is not None:
            raise end_refused
        space.needs_emptying = False  # whatever was sent replaced the parent's initial map

    def _end_batch(self, *, during: BaseException | None = None) -> None:
        """BATCH_END for the open batch; refused while another error is on its way, it is noted on that one."""
        asid = self._open_batch
        if asid is None:
            return
        try:
            self._write(IotlbMessage(MessageType.BATCH_END, asid=asid))
        except REFUSED as error:
            if during is None:
                raise
            during.add_note(f"BATCH_END of AS {asid} was refused too ({error}): the kernel is still inside "
                            "that batch, and the next commit or reset ends it first")
            return
        self._open_batch = None

    def _send(self, asid: int, space: _Space, work: Plan, *, begin: bool = False, end: bool = False) -> None:
        """Write `work` (after BATCH_BEGIN, before BATCH_END, when asked) by one write loop; book what landed."""
        invalidate, update = flatten(work.invalidate, map(UPDATE_QUAD, work.update) if work.update else ())
        try:
            self.dev.write_iotlb_ranges(asid, invalidate, update, begin=begin, end=end)
        except REFUSED as error:
            # A refusal before the loop (InvalidArgument) took nothing: its first message is the one told refused.
            self._book_part(space, work, IotlbBatch.of_flat(asid, invalidate, update, begin, end),
                            getattr(error, "accepted", 0), error)
            raise
        # All of it landed: the kernel holds the work's units, and a batch that began is open until it ends.
        space.units = work.units
        if end:
            self._open_batch = None
        elif begin:
            self._open_batch = asid
        if self._recorders:  # the trace costs nothing while nobody records
            for message in IotlbBatch.of_flat(asid, invalidate, update, begin, end).messages():
                self._tell(Written(message))

    def _book_part(self, space: _Space, work: Plan, batch: IotlbBatch, accepted: int, error: Exception) -> None:
        """The kernel took the first `accepted` messages of `batch` (sending `work`), then refused `error`'s."""
        if batch.begin and accepted:
            self._open_batch = batch.asid
        landed = max(accepted - batch.begin, 0)
        if landed >= len(work):
            space.units = work.units  # what the kernel holds once it took all of the work
        else:  # message by message, as the kernel took them
            units = space.units
            for iova, size in work.invalidate[:landed]:
                units = after_invalidate(units, iova, size)
            for unit in work.update[:max(landed - len(work.invalidate), 0)]:
                units = after_update(units, unit)
            space.units = units
        if batch.end and accepted == len(batch):
            self._open_batch = None
        if self._recorders:
            messages = batch.messages()
            for message in messages[:accepted]:
                self._tell(Written(message))
            if accepted < len(messages):
                self._tell(Written(messages[accepted], error))

    def _write(self, message: IotlbMessage) -> None:
        """Write one message; told to the recorders, accepted or refused."""
        try:
            self.dev.write_iotlb(message)
        except REFUSED as error:
            self._tell(Written(message, error))
            raise
        self._tell(Written(message))

    def _tell(self, written: Written) -> None:
        for recorder in list(self._recorders):
            try:
                recorder(written)
            except Exception as error:  # noqa: BLE001 - a trace must never change what is sent
                self._log.warning("iotlb.recorder_failed", recorder=repr(recorder), error=repr(error))


_LANES: trio.lowlevel.RunVar = trio.lowlevel.RunVar("vdpad_iotlb_lanes")


def _lane(iotlb: DeviceIotlb) -> trio.CapacityLimiter:
    """The device's worker lane in this trio run: one thread at a time, callers served in FIFO order."""
    try:
        lanes = _LANES.get()
    except LookupError:
        lanes = weakref.WeakKeyDictionary()
        _LANES.set(lanes)
    lane = lanes.get(iotlb)
    if lane is None:
        lane = lanes[iotlb] = trio.CapacityLimiter(1)
    return lane


class Transaction:
    """Map and unmap operations on one address space, committed together.

    Each operation is checked when it is made (InvalidArgument, nothing
    sent); commit() sends the minimal change, or nothing for an equivalent
    map. As a context manager it commits on a clean exit and drops
    everything on an exception.
    """

    def __init__(self, iotlb: DeviceIotlb, asid: int = 0, *, allow_window: bool = False):
        if not (isinstance(asid, int) and 0 <= asid < iotlb.as_num):
            iotlb._check_asid("IOTLB transaction", asid)
        self._iotlb, self.asid = iotlb, asid
        # On a parent that applies each message at once, a running device without SUSPEND
        # may see bytes that stay mapped go missing for an instant; refused unless allowed.
        self.allow_window = allow_window
        self._ops: list[Callable[[AddressMap], AddressMap]] = []
        self.touched: list[tuple[int, int]] = []  # (start, end) of each op: where the map may change
        self.regions: set[Memory] = set()  # the memory its maps point into
        # Lock-free: the map is immutable and the attribute read atomic, so opening a
        # transaction on a trio thread never waits for a commit pinning pages elsewhere.
        self.base = self._pending = iotlb._spaces[asid].view
        self._state = "open"
        self.sent: Plan | None = None

    @property
    def state(self) -> str:
        """open, committed, aborted, or failed (the commit raised)."""
        return self._state

    @property
    def pending(self) -> AddressMap:
        """The map as it will be after commit."""
        return self._pending

    def map(self, iova: int, region: Memory, offset: int, size: int, perm: Access = Access.RW) -> Transaction:
        self._check_open()
        mapping = self._iotlb._checked_mapping(iova, region, offset, size, perm)
        self.regions.add(region)

        def op(current: AddressMap) -> AddressMap:
            try:
                return current.mapped(mapping)
            except OverlapError as error:
                raise self._iotlb._refuse("IOTLB map", str(error)) from None

        self._pending = op(self._pending)
        self._ops.append(op)
        self.touched.append((iova, iova + size))
        return self

    def unmap(self, iova: int, size: int) -> Transaction:
        self._check_open()
        self._iotlb._check_range("IOTLB unmap", iova, size)

        def op(current: AddressMap) -> AddressMap:
            after = current.unmapped(iova, size)
            if after is current:  # nothing was mapped there
                raise self._iotlb._refuse("IOTLB unmap", f"nothing is mapped in {describe_range(iova, size)} "
                                                         f"of AS {self.asid}")
            return after

        self._pending = op(self._pending)
        self._ops.append(op)
        self.touched.append((iova, iova + size))
        return self

    def maps_closed_region(self) -> bool:
        for region in self.regions:
            if region.closed:
                return True
        return False

    def _replay_onto(self, current: AddressMap) -> AddressMap:
        for op in self._ops:
            current = op(current)
        return current

    def commit(self) -> Plan:
        """Send the change; returns the plan that was sent (empty when nothing changed)."""
        self._check_open()
        self._state = "failed"
        self.sent = self._iotlb._commit(self)
        self._state = "committed"
        return self.sent

    def abort(self) -> None:
        self._state = "aborted"

    def _check_open(self) -> None:
        if self._state != "open":
            raise InvalidArgument("IOTLB transaction", self._iotlb.dev.path, f"the transaction is {self._state}")

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()
