"""The messages that take one address space from what the kernel holds to a wanted map.

What the kernel holds is tracked as *units*: the UPDATEs it accepted, exactly
as sent. They are not the user's normalised map (two units may continue each
other; one map entry may be several units), and the difference matters
because of how vhost-vdpa treats its entries (drivers/vhost/vdpa.c, iotlb.c):

- an UPDATE that intersects any entry is refused (EEXIST, seen as EFAULT);
- an INVALIDATE of [iova, iova + size) frees every entry that intersects the
  range, *whole*: there is no partial unmap;
- in PA mode one UPDATE becomes one kernel entry per physically contiguous
  chunk, at boundaries userspace cannot know. Each chunk lies inside the
  UPDATE's range, so a unit is only ever removed whole, by an INVALIDATE that
  covers it and touches no unit that stays.

Minimal, then, means: no unit that still translates as wanted is touched
(nothing re-pinned, nothing the device uses disturbed); a unit with any
changed byte is invalidated whole and its unchanged bytes are sent again; the
INVALIDATEs are as few as the kept units allow (one per run of removed units
with no kept unit between them); the UPDATEs are as few as contiguous memory
allows (one per stretch of the wanted map, same region with the offset
running on and the same permission, not covered by a kept unit).
INVALIDATEs go first so no UPDATE meets an entry on its way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vdpad.device.core import U64
from vdpad.device.iotlb_msg import IotlbMessage, MessageType
from vdpad.iotlb.space import AddressMap, Mapping


@dataclass(frozen=True)
class Plan:
    """INVALIDATE ranges, then UPDATEs, and the units the kernel holds afterwards."""

    invalidate: tuple[tuple[int, int], ...]  # (iova, size)
    update: tuple[Mapping, ...]
    units: tuple[Mapping, ...]

    def __bool__(self) -> bool:
        return bool(self.invalidate or self.update)

    def __len__(self) -> int:
        return len(self.invalidate) + len(self.update)

    def messages(self, asid: int = 0) -> list[IotlbMessage]:
        return ([IotlbMessage(MessageType.INVALIDATE, iova, size, asid=asid) for iova, size in self.invalidate]
                + [update_message(unit, asid) for unit in self.update])


def update_message(unit: Mapping, asid: int = 0) -> IotlbMessage:
    return IotlbMessage(MessageType.UPDATE, unit.iova, unit.size, unit.uaddr, unit.perm, asid)


def _sorted(units: Iterable[Mapping]) -> list[Mapping]:
    return sorted(units, key=lambda u: u.iova)


def _range(start: int, end: int) -> tuple[int, int]:
    # A run from IOVA 0 to the very top is 2^64 bytes, one more than a message
    # can say; one byte less still touches the top unit, and a touched unit goes whole.
    return start, min(end - start, U64)


def invalidations(units: Sequence[Mapping], keep: set[Mapping]) -> tuple[tuple[int, int], ...]:
    """The fewest INVALIDATE ranges freeing every unit not in `keep` and no unit in it."""
    ranges: list[tuple[int, int]] = []
    start = end = None
    for unit in _sorted(units):
        if unit in keep:
            if start is not None:
                ranges.append(_range(start, end))
                start = None
            continue
        if start is None:
            start = unit.iova
        end = unit.end
    if start is not None:
        ranges.append(_range(start, end))
    return tuple(ranges)


def after_invalidate(units: Iterable[Mapping], iova: int, size: int) -> tuple[Mapping, ...]:
    """The units left once the kernel took an INVALIDATE: every unit it touches goes, whole."""
    end = iova + size
    return tuple(u for u in units if u.end <= iova or u.iova >= end)


def after_update(units: Iterable[Mapping], unit: Mapping) -> tuple[Mapping, ...]:
    return tuple(_sorted((*units, unit)))


def transition(units: Iterable[Mapping], wanted: Iterable[Mapping]) -> Plan:
    """From kernel entries `units` to exactly the entries `wanted` (used to roll back)."""
    units, wanted = _sorted(units), _sorted(wanted)
    keep = set(units) & set(wanted)
    return Plan(invalidations(units, keep), tuple(u for u in wanted if u not in keep), tuple(wanted))


def plan(units: Iterable[Mapping], target: AddressMap) -> Plan:
    """The minimal change from kernel entries `units` to a kernel translating as `target`."""
    units = _sorted(units)
    kept = [u for u in units if target.matches(u)]
    return transition(units, kept + target.without(kept))


def unmapped_meanwhile(units: Iterable[Mapping], work: Plan, target: AddressMap) -> tuple[tuple[int, int], ...]:
    """The (iova, size) ranges `target` maps that `work`'s INVALIDATEs unmap before its UPDATEs map them again.

    A device that applies each message as it is written may reach those bytes
    in between and find nothing there; a device that takes a batch as one
    switch (set_map) never sees the gap.
    """
    after = set(work.units)
    removed = [u for u in _sorted(units) if u not in after]
    spans: list[tuple[int, int]] = []
    for unit in removed:
        for entry in target.overlapping(unit.iova, unit.size):
            start, end = max(unit.iova, entry.iova), min(unit.end, entry.end)
            if spans and spans[-1][1] >= start:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
    return tuple((start, end - start) for start, end in spans)


def replay(units: Iterable[Mapping], target: AddressMap) -> Plan:
    """After a reset that emptied the device's map: send `target` again.

    vhost-vdpa's own entries outlive SET_STATUS(0) even when the device's map
    does not, so the old units are invalidated first (one INVALIDATE per run),
    then `target` is sent as the fewest UPDATEs, like a first commit.
    """
    fresh = plan((), target)
    return Plan(invalidations(list(units), set()), fresh.update, fresh.units)
