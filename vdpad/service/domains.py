"""vIOMMU domains: one address space (IOVA -> memory, offset, perm) that many devices translate through.

A client creates a domain, registers memory with it, changes its map in
transactions and attaches device sessions. Each kind of device gets every
change its own way, all before the commit is answered:

- an address space of a vhost-vdpa session is committed the same operations
  through its IOTLB engine (the minimal diff, in one batch; vhost-vdpa never
  misses);
- a vhost core session (vhost-net) translates lazily through its device
  IOTLB: its misses are answered from the map (vdpad.service.misses), and
  every range a commit unmaps (or changes the permission of) is INVALIDATEd
  on it, after the new map is in place, so no stale translation outlives the
  reply.

A commit is checked whole, on the domain and on every attached device, before
anything is sent; a device that refuses what was sent has the devices before
it brought back to the old map, so the domain stays as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import structlog
import trio

from vdpad.device.errors import InvalidArgument
from vdpad.iotlb import PAGE_SIZE, MemoryRegion, Transaction
from vdpad.iotlb.space import VALID_PERMS, AddressMap, Mapping, OverlapError, describe_range
from vdpad.service.memory import MemoryHolder
from vdpad.service.net_session import NetSession
from vdpad.service.sessions import MapOp, Peer, Session

log = structlog.get_logger("vdpad.service")

IOVA_END = 1 << 64


class Domain(MemoryHolder):
    def __init__(self, name: str, owner: Peer):
        if not name or len(name) > 64 or not name.isprintable() or "/" in name:
            raise InvalidArgument("domain.create", name, f"domain name {name!r} must be 1-64 printable "
                                                         "characters, without '/'")
        self.name, self.owner = name, owner
        self.regions: dict[str, MemoryRegion] = {}
        self.map = AddressMap()  # swapped whole: a miss answered in another thread reads one snapshot
        self.spaces: dict[int, tuple[Session, int]] = {}  # vhost-vdpa session number -> (session, asid)
        self.net: dict[int, NetSession] = {}
        self.commits = 0
        self.created = time.time()
        self.lock = trio.Lock()  # commits, attachments and closing, one at a time
        self._log = log.bind(domain=name)

    @property
    def holder(self) -> str:
        return f"domain {self.name}"

    @property
    def holder_device(self) -> str:
        return self.holder

    def _refuse(self, op: str, problem: str) -> InvalidArgument:
        return InvalidArgument(op, self.holder, problem)

    # -- changing the map --------------------------------------------------------------------
    def stage(self, ops: Sequence[MapOp]) -> tuple[AddressMap, list[tuple[int, int]]]:
        """The map after `ops`, and the ranges whose translation they take away; checked, nothing changed."""
        current, revoked = self.map, []
        for index, op in enumerate(ops):
            where = f"ops[{index}] ({op.kind} {describe_range(op.iova, op.size)})"
            if op.size <= 0 or op.iova % PAGE_SIZE or op.size % PAGE_SIZE or op.iova + op.size > IOVA_END:
                raise self._refuse("domain.commit", f"{where}: iova and size must be page-aligned ({PAGE_SIZE:#x}), "
                                                    "the size positive, the range inside 64 bits")
            if op.kind == "unmap":
                if not current.overlapping(op.iova, op.size):
                    raise self._refuse("domain.commit", f"{where}: nothing is mapped there")
                current = current.unmapped(op.iova, op.size)
                revoked.append((op.iova, op.size))
                continue
            region = self.region(op.memory or "")
            if op.perm not in VALID_PERMS:
                raise self._refuse("domain.commit", f"{where}: perm must be ro, wo or rw")
            if op.offset % PAGE_SIZE or op.offset + op.size > region.size:
                raise self._refuse("domain.commit", f"{where}: offset {op.offset:#x} + size {op.size:#x} is not a "
                                                    f"page-aligned window of {region.name!r} ({region.size:#x} bytes)")
            try:
                current = current.mapped(Mapping(op.iova, op.size, region, op.offset, op.perm))
            except OverlapError as error:
                raise self._refuse("domain.commit", f"{where}: {error}") from None
        return current, revoked

    def _device_transaction(self, session: Session, asid: int, ops: Sequence[MapOp]) -> tuple[Transaction, int]:
        """The same operations on an attached device's address space, checked by its engine (its IOVA range)."""
        tx = session.iotlb.transaction(asid)
        added = 0
        try:
            for op in ops:
                if op.kind == "map":
                    tx.map(op.iova, self.regions[op.memory or ""], op.offset, op.size, op.perm)
                    added += op.size
                else:
                    tx.unmap(op.iova, op.size)
        except BaseException:
            tx.abort()
            raise
        return tx, added

    async def commit(self, ops: Sequence[MapOp]) -> dict[str, Any]:
        async with self.lock:
            target, revoked = await trio.to_thread.run_sync(self.stage, ops)
            staged = []
            try:
                for session, asid in self.spaces.values():
                    staged.append((session, asid, *await session.in_lane(
                        lambda s=session, a=asid: self._device_transaction(s, a, ops))))
            except BaseException:
                for _, _, tx, _ in staged:
                    tx.abort()
                raise
            sent: dict[int, int] = {}
            try:
                for session, asid, tx, added in staged:
                    plan = await session.in_lane(lambda s=session, t=tx, n=added: s.commit_staged(t, n))
                    sent[session.number] = len(plan)
            except BaseException as error:
                await self._undo(staged, sent, error)
                raise
            self.map = target
            invalidated, failed = 0, {}
            for net in list(self.net.values()):
                try:
                    invalidated += await net.in_lane(lambda n=net: n.revoke(revoked))
                except Exception as error:  # noqa: BLE001 - every device is told; what it may hold keeps its memory
                    failed[net.number] = str(error)
                    self._log.error("domain.invalidate_failed", session=net.number, error=str(error))
            self.commits += 1
            self._log.debug("domain.commit", ops=len(ops), entries=len(target), revoked=len(revoked),
                            devices=len(self.spaces) + len(self.net))
            # A device that refused its INVALIDATE is named: its memory stays open while it may hold some.
            return {"entries": len(target), "invalidated": invalidated, "sent": sent, "invalidate_failed": failed}

    async def _undo(self, staged: list, sent: dict[int, int], error: BaseException) -> None:
        """Bring back to the domain's map every device that took the commit; abort the others."""
        for session, asid, tx, _ in staged:
            if session.number not in sent:
                if tx.state == "open":
                    tx.abort()
                continue
            try:
                await session.in_lane(lambda s=session, a=asid: _follow(s, a, self.map))
            except Exception as undo:  # noqa: BLE001 - every device is tried; the first error is the one raised
                error.add_note(f"bringing session {session.number} ({session.device}) back failed too: {undo}")
            else:
                error.add_note(f"session {session.number} ({session.device}) took the commit and was brought back")

    # -- attaching -------------------------------------------------------------------------------
    def register(self, name: str, fd: int, offset: int, size: int) -> MemoryRegion:
        return self._guarded(super().register(name, fd, offset, size))

    def allocate(self, name: str, size: int) -> MemoryRegion:
        return self._guarded(super().allocate(name, size))

    def _guarded(self, region: MemoryRegion) -> MemoryRegion:
        """A new region refuses to close while a vhost core device may hold a translation into it."""
        for net in list(self.net.values()):
            if net.misses is not None:
                region.add_mapper(net.misses)
        return region

    async def attach(self, session: Session | NetSession, asid: int) -> None:
        async with self.lock:
            if isinstance(session, NetSession):
                if session.domain is not None:
                    raise self._refuse("domain.attach", f"session {session.number} is attached to domain "
                                                        f"{session.domain.name} already")
                await session.in_lane(lambda: session.serve(self))
                self.net[session.number] = session
                return
            if session.domains:
                (followed, name), = session.domains.items()
                raise self._refuse("domain.attach", f"session {session.number} has AS {followed} attached to "
                                                    f"domain {name} already (one address space per session)")

            def follow() -> None:
                view = session.iotlb.space(asid)  # checks the asid
                if len(view):
                    raise self._refuse("domain.attach", f"AS {asid} of session {session.number} ({session.device}) "
                                                        f"maps {len(view)} entries of its own: unmap them first")
                _follow(session, asid, self.map, pins=True)
                if not self.map:  # nothing was sent: the parent's initial map (vdpa_sim's 1:1) would stay
                    session.iotlb.forget_initial_map(asid)
                session.domains[asid] = self.name

            await session.in_lane(follow)
            self.spaces[session.number] = (session, asid)

    async def detach(self, session: Session | NetSession) -> None:
        """The session stops translating through the domain: a vhost-vdpa address space is emptied, a vhost
        core device forgets its translations. It stays attached if that fails."""
        async with self.lock:
            if session.number in self.net:
                await session.in_lane(session.unserve)
                del self.net[session.number]
                return
            found = self.spaces.get(session.number)
            if found is None:
                raise self._refuse("domain.detach", f"session {session.number} is not attached to it")
            asid = found[1]

            def leave() -> None:
                _follow(session, asid, AddressMap())
                session.domains.pop(asid, None)

            await session.in_lane(leave)
            del self.spaces[session.number]

    def forget(self, session: Session | NetSession) -> None:
        """A session that closes: its device lets go of everything as its fd closes (called in its lane)."""
        if self.net.pop(session.number, None) is not None:
            session.unserve(closing=True)
        elif self.spaces.pop(session.number, None) is not None:
            session.domains.clear()

    async def close(self) -> list[MemoryRegion]:
        """Detach every session, then close the memory; returns what refused to close (still mapped)."""
        for session in [*(s for s, _ in self.spaces.values()), *self.net.values()]:
            try:
                await self.detach(session)
            except Exception:  # noqa: BLE001 - a device that refuses to unmap keeps the memory open, below
                self._log.exception("domain.detach_failed", session=session.number)
        # Nothing answers from the map any more (a device whose detach failed keeps what it holds, and that
        # memory refuses to close): only then is the memory closed.
        self.map = AddressMap()
        unreleased = await trio.to_thread.run_sync(self._close_memory)  # munmap of large regions: off the loop
        self._log.info("domain.closed")
        return unreleased

    def _close_memory(self) -> list[MemoryRegion]:
        unreleased = []
        for region in self.regions.values():
            try:
                region.close()
            except Exception as error:  # noqa: BLE001 - RegionInUse: kept open, never freed under a device
                self._log.error("domain.release_failed", memory=region.name, error=str(error))
                unreleased.append(region)
        self.regions.clear()
        return unreleased

    def release(self, name: str) -> None:
        region = self.region(name)
        if users := [m for m in self.map if m.region is region]:
            raise self._refuse("memory.release", f"{region.name!r} is mapped at "
                                                 f"{', '.join(describe_range(m.iova, m.size) for m in users[:4])}: "
                                                 "unmap it first")
        super().release(name)

    # -- what is visible ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        misses: dict[str, int] = {}
        for net in list(self.net.values()):
            if net.misses is not None:
                for key, value in vars(net.misses.counters).items():
                    misses[key] = misses.get(key, 0) + value
        return {"domain": self.name, "owner": {"pid": self.owner.pid, "uid": self.owner.uid},
                "created": self.created, "entries": len(self.map), "mapped": self.map.mapped_bytes,
                "commits": self.commits,
                "memory": [{"name": r.name, "size": r.size} for r in tuple(self.regions.values())],
                "devices": [{"session": s.number, "device": s.device, "asid": asid, "kind": "vhost-vdpa"}
                            for s, asid in list(self.spaces.values())]
                + [{"session": n.number, "device": n.device, "kind": "vhost-net"} for n in list(self.net.values())],
                "misses": misses}


def _follow(session: Session, asid: int, target: AddressMap, *, pins: bool = False) -> None:
    """Make the session's address space translate exactly as `target` (one transaction, the minimal diff).
    `pins`: it maps what the device did not map before (an attach), held against the memlock budget; a
    rollback or a detach only gives back."""
    tx = session.iotlb.transaction(asid)
    try:
        for entry in session.iotlb.space(asid):
            tx.unmap(entry.iova, entry.size)
        for entry in target:
            tx.map(entry.iova, entry.region, entry.offset, entry.size, entry.perm)
    except BaseException:
        tx.abort()
        raise
    session.commit_staged(tx, target.mapped_bytes if pins else 0)
