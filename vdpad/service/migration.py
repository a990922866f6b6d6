"""A device's migration state: the versioned document a save writes and a load reads (docs/migration.md).

Pure logic, no device: the document (`DeviceState`) and its JSON, what a
load is checked against (`DeviceDescription`: the destination device and
the memory its session registered), the check itself, and the record of
what a client set on a device that vhost cannot read back
(`DriverSettings`). The steps that suspend, read and load a device are in
vdpad.service.switchover.

Every refusal is an InvalidArgument whose problem starts with the field of
the document it is about (`state.queues[1].size: ...`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from vdpad.device.errors import InvalidArgument
from vdpad.device.flags import DeviceStatus, VirtioDeviceId, VirtioFeature
from vdpad.iotlb.memory import PAGE_SIZE

VERSION = 1
PERMS = ("ro", "wo", "rw")
# The status a saved device had; a load ends there. Anything else was not a running device.
RUNNING = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK
U16, U64 = (1 << 16) - 1, (1 << 64) - 1
RING_ALIGNMENT = {"desc": 16, "avail": 2, "used": 4}


@dataclass(frozen=True)
class QueueState:
    """One virtqueue: disabled (nothing else is kept), or its ring and the next available index to read."""

    index: int
    enabled: bool
    size: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    base: int = 0  # GET_VRING_BASE while suspended: the next available entry the device reads


@dataclass(frozen=True)
class MapEntry:
    """`size` bytes at `iova` translate to registered memory `memory` from `offset`, with `perm`."""

    iova: int
    size: int
    memory: str
    offset: int
    perm: str


@dataclass(frozen=True)
class DeviceState:
    """A suspended device's state: what a load on another (or the same, reset) device carries on from."""

    device_id: int
    features: int  # negotiated
    status: int
    config: bytes
    queues: tuple[QueueState, ...]  # every virtqueue of the device, by index
    groups: tuple[int, ...]  # the address space of each virtqueue group
    spaces: tuple[tuple[MapEntry, ...], ...]  # each address space's map, by ASID

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION, "device_id": self.device_id, "features": self.features, "status": self.status,
            "config": self.config.hex(),
            "queues": [{"index": q.index, "enabled": False} if not q.enabled else
                       {"index": q.index, "enabled": True, "size": q.size, "desc": q.desc, "avail": q.avail,
                        "used": q.used, "base": q.base} for q in self.queues],
            "groups": list(self.groups),
            "spaces": [{"asid": asid, "map": [vars(entry) for entry in entries]}
                       for asid, entries in enumerate(self.spaces)],
        }

    @classmethod
    def from_json(cls, raw: Any, device: str) -> DeviceState:
        """The document `raw` (parsed JSON); InvalidArgument naming the first field that is missing, unknown,
        mistyped or of a future version."""
        doc = _Fields(raw, "state", device)
        version = doc.uint("version")
        if version != VERSION:
            doc.refuse("state.version", f"{version} is not the version this vdpad reads ({VERSION})"
                       + (": the document is newer" if version > VERSION else ""))
        state = cls(
            device_id=doc.uint("device_id"), features=doc.uint("features"), status=doc.uint("status", 0xFF),
            config=doc.hex("config"),
            queues=tuple(_queue(item) for item in doc.items("queues")),
            groups=tuple(doc.uints("groups")),
            spaces=tuple(_space(item, asid) for asid, item in enumerate(doc.items("spaces"))),
        )
        doc.done()
        return state


def _queue(queue: _Fields) -> QueueState:
    index = queue.uint("index", U16)
    if index != queue.position:
        queue.refuse(f"{queue.path}.index", f"{index} where queue {queue.position} belongs: every queue, in order")
    if not queue.flag("enabled"):
        queue.done()
        return QueueState(index, False)
    made = QueueState(index, True, queue.uint("size", U16 + 1), queue.uint("desc"), queue.uint("avail"),
                      queue.uint("used"), queue.uint("base", U16))
    queue.done()
    return made


def _space(space: _Fields, asid: int) -> tuple[MapEntry, ...]:
    if space.uint("asid") != asid:
        space.refuse(f"{space.path}.asid", f"is not {asid}: every address space, in order")
    entries = []
    for entry in space.items("map"):
        perm = entry.text("perm")
        if perm not in PERMS:
            entry.refuse(f"{entry.path}.perm", f"{perm!r} is not one of {', '.join(PERMS)}")
        entries.append(MapEntry(entry.uint("iova"), entry.uint("size"), entry.text("memory"), entry.uint("offset"),
                                perm))
        entry.done()
    space.done()
    return tuple(entries)


class _Fields:
    """A JSON object of the document at `path`, taken field by field with its type checked; done() refuses
    the fields nobody took."""

    def __init__(self, raw: Any, path: str, device: str, position: int = 0):
        self.path, self.device, self.position = path, device, position
        if not isinstance(raw, dict):
            self.refuse(path, f"must be a JSON object, not {type(raw).__name__}")
        self._raw = dict(raw)

    def refuse(self, where: str, problem: str) -> NoReturn:
        raise InvalidArgument("session.load", self.device, f"{where}: {problem}")

    def _take(self, name: str, ok: Callable[[Any], bool], what: str) -> Any:
        if name not in self._raw:
            self.refuse(f"{self.path}.{name}", "is missing")
        value = self._raw.pop(name)
        if not ok(value):
            self.refuse(f"{self.path}.{name}", f"must be {what}, not {value!r}")
        return value

    def uint(self, name: str, top: int = U64) -> int:
        return self._take(name, lambda v: type(v) is int and 0 <= v <= top, f"an integer in [0, {top:#x}]")

    def flag(self, name: str) -> bool:
        return self._take(name, lambda v: isinstance(v, bool), "true or false")

    def text(self, name: str) -> str:
        return self._take(name, lambda v: isinstance(v, str), "a string")

    def hex(self, name: str) -> bytes:
        value = self.text(name)
        if len(value) % 2 or value.strip("0123456789abcdefABCDEF"):
            self.refuse(f"{self.path}.{name}", f"must be hex bytes (pairs of hex digits), not {value!r}")
        return bytes.fromhex(value)

    def _list(self, name: str) -> list[Any]:
        return self._take(name, lambda v: isinstance(v, list), "a list")

    def items(self, name: str) -> list[_Fields]:
        """A list of objects."""
        return [_Fields(raw, f"{self.path}.{name}[{i}]", self.device, i) for i, raw in enumerate(self._list(name))]

    def uints(self, name: str, top: int = U64) -> list[int]:
        """A list of integers in [0, top]."""
        values = self._list(name)
        for i, value in enumerate(values):
            if not (type(value) is int and 0 <= value <= top):
                self.refuse(f"{self.path}.{name}[{i}]", f"must be an integer in [0, {top:#x}], not {value!r}")
        return values

    def done(self) -> None:
        if self._raw:
            self.refuse(self.path, f"unknown field(s) {', '.join(map(repr, sorted(self._raw)))}")


@dataclass(frozen=True)
class DeviceDescription:
    """What a load is checked against: the destination device as it is now, and its session's memory."""

    name: str
    device_id: int
    offered: int  # the features the device offers
    status: int
    ring_limits: tuple[int, ...]  # the largest ring each virtqueue takes
    group_num: int
    as_num: int
    iova_first: int
    iova_last: int
    memory: Mapping[str, int]  # registered name -> size


def _device_kind(device_id: int) -> str:
    try:
        return f"{device_id} ({VirtioDeviceId(device_id).name.lower()})"
    except ValueError:
        return str(device_id)


def check(state: DeviceState, device: DeviceDescription) -> None:
    """Refuse (InvalidArgument naming the field) a state `device` cannot carry on from; a load that
    passes changes the device only in ways it accepts."""

    def refuse(where: str, problem: str) -> NoReturn:
        raise InvalidArgument("session.load", device.name, f"state.{where}: {problem}")

    if state.device_id != device.device_id:
        refuse("device_id", f"the state is of virtio device {_device_kind(state.device_id)}; {device.name} is "
                            f"{_device_kind(device.device_id)}")
    if state.features & VirtioFeature.RING_PACKED:
        refuse("features", "RING_PACKED: a packed ring's state is not one 16-bit index (not supported)")
    if missing := state.features & ~device.offered:
        refuse("features", f"{device.name} does not offer {missing:#x} of {state.features:#x} (offers "
                           f"{device.offered:#x})")
    if state.status != RUNNING:
        refuse("status", f"{state.status:#x} is not a running device's ({int(RUNNING):#x})")
    if device.status != DeviceStatus.RESET:
        refuse("status", f"{device.name} has status {device.status:#x}: a load starts from a reset device")
    if len(state.queues) != len(device.ring_limits):
        refuse("queues", f"{len(state.queues)} virtqueues; {device.name} has {len(device.ring_limits)}")
    for queue, limit in zip(state.queues, device.ring_limits):
        if queue.enabled and not (0 < queue.size <= limit and queue.size & (queue.size - 1) == 0):
            refuse(f"queues[{queue.index}].size", f"a ring of {queue.size}; {device.name} takes a power of two "
                                                  f"up to {limit} on this queue")
        for part, alignment in RING_ALIGNMENT.items():  # virtio 1.x 2.7: split virtqueue part alignment
            if queue.enabled and getattr(queue, part) % alignment:
                refuse(f"queues[{queue.index}].{part}", f"{getattr(queue, part):#x} is not {alignment}-byte aligned")
    if len(state.groups) != device.group_num:
        refuse("groups", f"{len(state.groups)} virtqueue groups; {device.name} has {device.group_num}")
    if len(state.spaces) > device.as_num:
        refuse(f"spaces[{device.as_num}]", f"{device.name} has {device.as_num} address space(s): none with "
                                          f"ASID {device.as_num}")
    for group, asid in enumerate(state.groups):
        if asid >= len(state.spaces):
            refuse(f"groups[{group}]", f"address space {asid}, which the state does not have "
                                       f"({len(state.spaces)})")
    for asid, entries in enumerate(state.spaces):
        for i, entry in enumerate(entries):
            where = f"spaces[{asid}].map[{i}]"
            size = device.memory.get(entry.memory)
            if size is None:
                known = ", ".join(sorted(device.memory)) or "none"
                refuse(f"{where}.memory", f"{entry.memory!r} is not registered in the session of {device.name} "
                                          f"(registered: {known})")
            for name in ("iova", "size", "offset"):
                if getattr(entry, name) % PAGE_SIZE:
                    refuse(f"{where}.{name}", f"{getattr(entry, name):#x} is not a multiple of the page size")
            if entry.size == 0:
                refuse(f"{where}.size", "is 0")
            if entry.offset + entry.size > size:
                refuse(f"{where}.offset", f"{entry.offset:#x}+{entry.size:#x} is not inside memory "
                                          f"{entry.memory!r} of {size:#x} bytes")
            if i and entry.iova < entries[i - 1].iova + entries[i - 1].size:
                refuse(f"{where}.iova", f"{entry.iova:#x} overlaps or comes before the entry before it (the map "
                                        "is in IOVA order, without overlaps)")
            if entry.iova < device.iova_first or entry.iova + entry.size - 1 > device.iova_last:
                refuse(f"{where}.iova", f"{entry.iova:#x}+{entry.size:#x} is outside {device.name}'s IOVA range "
                                        f"[{device.iova_first:#x}, {device.iova_last:#x}]")


@dataclass
class QueueSetup:
    size: int | None = None
    addr: tuple[int, int, int] | None = None  # desc, avail, used
    enabled: bool = False


@dataclass
class DriverSettings:
    """What a client set on a device that vhost has no call to read back (features, ring sizes and
    addresses, which rings are enabled): a save needs it. A reset forgets it, as the device does."""

    features: int | None = None
    queues: dict[int, QueueSetup] = field(default_factory=dict)

    def note(self, call: str, args: Mapping[str, Any]) -> None:
        """A device call (vdpad.service.calls) that succeeded."""
        if call == "set_features":
            self.features = args["features"]
        elif call in ("set_vring_num", "set_vring_addr", "set_vring_enable"):
            queue = self.queues.setdefault(args["index"], QueueSetup())
            if call == "set_vring_num":
                queue.size = args["num"]
            elif call == "set_vring_addr":
                queue.addr = (args["desc"], args["avail"], args["used"])
            else:
                queue.enabled = args["enabled"]
