"""A migration's device steps on a session: save a running device, load a reset one (docs/migration.md).

Run in the session's lane (a worker thread). A save suspends the device and
reads it into a DeviceState (vdpad.service.migration); the device stays
suspended, for the caller to resume if the migration is abandoned. A load
checks the state against the device and the session's memory first and
changes nothing when it refuses; once it has started, a step that fails
leaves the device reset with its maps emptied (nothing mapped, nothing
pinned) before the error is raised. Restarting in place is a save, a reset
and a load on the same session.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from vdpad.device import BackendFeature, DeviceStatus, NotSupportedError, VirtioFeature
from vdpad.device.errors import InvalidArgument
from vdpad.iotlb import Mapping
from vdpad.service.migration import RUNNING, DeviceDescription, DeviceState, MapEntry, QueueState, check
from vdpad.service.protocol import MAX_MESSAGE
from vdpad.service.sessions import PERMS, PIN_BUDGET, MapOp, Session

log = structlog.get_logger("vdpad.service")

# The daemon's failure injection, for tests: the file this names holds the name of a load step; every load
# fails before that step, as a refusal by the kernel there would. Read at each load, so one daemon serves
# every step; no file, or an empty one: no failure.
FAIL_AT_ENV = "VDPAD_FAIL_LOAD_AT"


class InjectedFailure(OSError):
    """The failure VDPAD_FAIL_LOAD_AT asked for."""


def save(session: Session) -> DeviceState:
    """Suspend the running device and read its state; on a failure after the suspend it is resumed."""
    dev, settings = session.dev, session.driver_settings
    status = dev.get_status()
    if status != RUNNING or settings.features is None:
        raise InvalidArgument("session.save", session.device, f"status {status!r}: only a running device "
                                                              "(DRIVER_OK alone, features set through the session) "
                                                              "is saved")
    if settings.features & VirtioFeature.RING_PACKED:
        raise NotSupportedError("session.save of packed rings (their state is not one 16-bit index)", session.device,
                                errno=errno.EOPNOTSUPP)
    if dev.suspended:
        raise InvalidArgument("session.save", session.device, "the device is suspended already: a save suspends "
                                                              "it itself (and resumes it when the save fails)")
    wanted = BackendFeature.SUSPEND | BackendFeature.RESUME
    if session.iotlb.acked & wanted != wanted:
        raise NotSupportedError("SUSPEND", session.device, errno=errno.EOPNOTSUPP)
    for index, queue in settings.queues.items():
        if queue.enabled and (queue.size is None or queue.addr is None):
            raise InvalidArgument("session.save", session.device,
                                  f"queue {index} is enabled without a size and addresses set through the session")
    dev.suspend()
    try:
        queues = []
        for index in range(len(session.shape["ring_limits"])):
            queue = settings.queues.get(index)
            if queue is None or not queue.enabled:
                queues.append(QueueState(index, False))
                continue
            assert queue.size is not None and queue.addr is not None  # checked before the suspend
            desc, avail, used = queue.addr
            queues.append(QueueState(index, True, queue.size, desc, avail, used, dev.get_vring_base(index)))
        moved = session.iotlb.group_asids
        state = DeviceState(
            device_id=session.shape["device_id"], features=settings.features, status=int(status),
            config=dev.get_config(0, dev.get_config_size()), queues=tuple(queues),
            groups=tuple(moved.get(group, 0) for group in range(session.iotlb.group_num)),
            spaces=tuple(tuple(map(_entry, session.iotlb.space(asid))) for asid in range(session.iotlb.as_num)),
        )
        if (size := len(json.dumps(state.to_json()))) > MAX_MESSAGE // 2:
            raise InvalidArgument("session.save", session.device, f"the state is {size} bytes of JSON, more than "
                                  f"one reply carries ({MAX_MESSAGE // 2}): too many mappings")
    except BaseException:
        dev.resume()
        raise
    log.info("migration.saved", session=session.number, device=session.device, queues=sum(q.enabled for q in queues))
    return state


def _entry(mapping: Mapping) -> MapEntry:
    """A mapping by registered memory name and offset: what another session (or daemon) can map again."""
    return MapEntry(mapping.iova, mapping.size, mapping.region.name, mapping.offset, mapping.perm.name.lower())


def description_of(session: Session) -> DeviceDescription:
    """The session's device as a load is checked against it: its shape, its status and the memory now."""
    return DeviceDescription(name=session.device, **session.shape, status=int(session.dev.get_status()),
                             memory={name: region.size for name, region in session.regions.items()})


def load(session: Session, state: DeviceState) -> None:
    """Carry on from `state` on the session's reset device: its maps (unchanged where the client committed
    them already), group address spaces, features, rings, DRIVER_OK. Refused, nothing changes; failed
    half-way, the device is left reset with nothing mapped."""
    check(state, description_of(session))
    _check_maps(session, state)
    fail_at = _injected_failure_step()
    try:
        for name, step in LOAD_STEPS.items():
            if name == fail_at:
                raise InjectedFailure(f"session.load on {session.device}: failure injected at step {name!r} "
                                      f"({FAIL_AT_ENV}={os.environ[FAIL_AT_ENV]})")
            step(session, state)
    except BaseException as error:
        try:
            abort(session)
        except Exception as undo:  # noqa: BLE001 - the load's own error is the one to raise
            error.add_note(f"leaving the device reset and unmapped failed too: {undo}")
        else:
            error.add_note(f"{session.device} was reset and its maps emptied")
        raise
    log.info("migration.loaded", session=session.number, device=session.device,
             queues=sum(q.enabled for q in state.queues))


def _injected_failure_step() -> str | None:
    path = os.environ.get(FAIL_AT_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def _map_changes(session: Session, state: DeviceState) -> Iterator[tuple[int, list[MapOp]]]:
    """Per address space whose map is not the state's already (committed ahead): the ops that make it so."""
    for asid, entries in enumerate(state.spaces):
        now = [_entry(m) for m in session.iotlb.space(asid)]
        if now != list(entries):
            yield asid, ([MapOp("unmap", e.iova, e.size) for e in now]
                         + [MapOp("map", e.iova, e.size, e.memory, e.offset, PERMS[e.perm]) for e in entries])


def _check_maps(session: Session, state: DeviceState) -> None:
    """Each map change staged in a transaction and abandoned, what it would pin held against the budget:
    whatever the engine or the budget refuses is refused here, naming the address space, before the device
    is touched."""
    for asid, ops in _map_changes(session, state):
        try:
            tx, added = session.stage(asid, ops)
            tx.abort()
            if session.pins_pages:  # what the kernel would refuse with a bare EFAULT, refused here by number
                PIN_BUDGET.check(session.device, added)
        except InvalidArgument as refused:
            raise InvalidArgument("session.load", session.device, f"state.spaces[{asid}].map: {refused.problem}") from None


def _load_maps(session: Session, state: DeviceState) -> None:
    for asid, ops in _map_changes(session, state):
        session.commit(asid, ops, allow_window=False)


def _load_groups(session: Session, state: DeviceState) -> None:
    moved = session.iotlb.group_asids
    for group, asid in enumerate(state.groups):
        if moved.get(group, 0) != asid:
            session.iotlb.set_group_asid(group, asid)


def _load_features(session: Session, state: DeviceState) -> None:
    step = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
    session.call("set_status", {"status": int(DeviceStatus.ACKNOWLEDGE)})
    session.call("set_status", {"status": int(step)})
    session.call("set_features", {"features": state.features})
    session.call("set_status", {"status": int(step | DeviceStatus.FEATURES_OK)})
    if DeviceStatus.FEATURES_OK not in session.dev.get_status():
        raise OSError(errno.EINVAL, f"session.load on {session.device}: the device refused features "
                                    f"{state.features:#x} (FEATURES_OK did not stick)")


def _load_queues(session: Session, state: DeviceState) -> None:
    for queue in state.queues:
        if queue.enabled:
            session.call("set_vring_num", {"index": queue.index, "num": queue.size})
            session.call("set_vring_addr", {"index": queue.index, "desc": queue.desc, "avail": queue.avail,
                                            "used": queue.used})
            session.call("set_vring_base", {"index": queue.index, "base": queue.base})
    for queue in state.queues:
        if queue.enabled:
            session.call("set_vring_enable", {"index": queue.index, "enabled": True})


def _load_status(session: Session, state: DeviceState) -> None:
    session.call("set_status", {"status": state.status})


# In the order a load runs them.
LOAD_STEPS: dict[str, Callable[[Session, DeviceState], None]] = {
    "maps": _load_maps, "groups": _load_groups, "features": _load_features, "queues": _load_queues,
    "driver_ok": _load_status,
}


def abort(session: Session) -> None:
    """Empty every address space, then reset the device: nothing mapped, nothing pinned (emptied first, so
    a reset without IOTLB_PERSIST has nothing to replay). Every space is tried; the first failure is raised
    once the device is reset. Groups keep the address spaces they were moved to, as across any reset."""
    failures: list[Exception] = []
    try:
        for asid in range(session.iotlb.as_num):
            entries = list(session.iotlb.space(asid))
            try:
                if entries:
                    session.commit(asid, [MapOp("unmap", m.iova, m.size) for m in entries], allow_window=False)
            except Exception as error:  # noqa: BLE001 - the other spaces are still emptied
                failures.append(error)
    finally:
        session.reset()
    if failures:
        raise failures[0]
    log.info("migration.aborted", session=session.number, device=session.device)
