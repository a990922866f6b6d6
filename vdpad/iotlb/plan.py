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

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

from vdpad.device.core import U64
from vdpad.device.iotlb_msg import IotlbMessage, MessageType
from vdpad.iotlb.space import AddressMap, Mapping
from vdpad.iotlb.tree import MappingTree


@dataclass(frozen=True, init=False)
class Plan:
    """INVALIDATE ranges, then UPDATEs, and the units the kernel holds afterwards
    (a MappingTree: it reads like, and equals, the tuple of the units in IOVA order)."""

    invalidate: tuple[tuple[int, int], ...]  # (iova, size)
    update: tuple[Mapping, ...]
    units: MappingTree

    def __init__(self, invalidate: tuple[tuple[int, int], ...], update: tuple[Mapping, ...], units: MappingTree):
        # One dict update, not a __setattr__ per field: every commit makes one.
        self.__dict__.update(invalidate=invalidate, update=update, units=units)

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
    size = end - start
    return start, size if size <= U64 else U64


def invalidations(units: Sequence[Mapping], keep: set[Mapping]) -> tuple[tuple[int, int], ...]:
    """The fewest INVALIDATE ranges freeing every unit not in `keep` and no unit in it."""
    return _runs((unit, unit in keep) for unit in _sorted(units))


def _runs(units: Iterable[tuple[Mapping, bool]]) -> tuple[tuple[int, int], ...]:
    """One INVALIDATE per run of units not kept, from (unit, kept) pairs of consecutive units in order."""
    ranges: list[tuple[int, int]] = []
    start = end = None
    for unit, kept in units:
        if kept:
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


def after_invalidate(units: Iterable[Mapping], iova: int, size: int) -> MappingTree:
    """The units left once the kernel took an INVALIDATE: every unit it touches goes, whole."""
    units = MappingTree.of(units)
    for unit in units.overlapping(iova, iova + size):
        units = units.removed(unit)
    return units


def after_update(units: Iterable[Mapping], unit: Mapping) -> MappingTree:
    return MappingTree.of(units).inserted(unit)


def transition(units: Iterable[Mapping], wanted: Iterable[Mapping]) -> Plan:
    """From kernel entries `units` to exactly the entries `wanted` (used to roll back)."""
    units, wanted = _sorted(units), _sorted(wanted)
    keep = set(units) & set(wanted)
    return Plan(invalidations(units, keep), tuple(u for u in wanted if u not in keep), MappingTree(wanted))


# Changes to a kernel map beyond which one rebuild beats a path copy per change (besides a quarter of the map).
BULK_CHANGE = 64
# Touched ranges beyond which one walk over both maps beats planning near each (O(log n) apiece, a
# larger constant): near when NEAR_SHARE times their number is at most the units and entries together.
NEAR_SHARE = 8


def plan(units: Iterable[Mapping], target: AddressMap,
         touched: Sequence[tuple[int, int]] | None = None) -> Plan:
    """The minimal change from kernel entries `units` to a kernel translating as `target`.

    O(n) in the units and entries. With `touched`, (start, end) IOVA ranges,
    the caller promises that `units` translate exactly as a map that differs
    from `target` only inside those ranges (the map a transaction started
    from, when the kernel was in step with it): then, when they are few,
    only the units and entries near them are looked at, in O(k log n) for k
    of them, and the plan is the one the full comparison gives.
    """
    units = MappingTree.of(units)
    if not units:  # a first commit: every entry is one UPDATE, and the kernel then holds the entries
        return Plan((), tuple(target.tree), target.tree)
    if not target.tree:  # everything unmapped: every unit goes, in one INVALIDATE (no kept unit between)
        return Plan((_range(next(iter(units)).iova, units.floor(U64).end),), (), target.tree)
    if touched is not None and NEAR_SHARE * len(touched) <= len(units) + len(target):
        return _plan_near(units, target, touched)
    return _compared(units, target)


def _compared(units: MappingTree, target: AddressMap) -> Plan:
    """The full comparison, in one walk over both in IOVA order: a unit stays when target
    translates all of it as it says; the units that go make runs; what the kept units leave
    of each entry is sent."""
    invalidate: list[tuple[int, int]] = []
    update: list[Mapping] = []
    after: list[Mapping] = []  # kept units and UPDATEs: what the kernel then holds, in IOVA order
    run_start = run_end = None  # the run of removed units so far
    entries = iter(target)
    entry = next(entries, None)
    # Where the part of `entry` that no kept unit covers (so far) starts; its end is spelt out
    # because this is the hot loop of a full plan.
    cursor, entry_end = (entry.iova, entry.end) if entry is not None else (0, 0)
    for unit in chain(units, (None,)):  # None: past the last unit, where every entry is finished
        start = unit.iova if unit is not None else U64 + 1
        while entry is not None and entry_end <= start:
            if cursor < entry_end:
                piece = entry if cursor == entry.iova else entry.piece(cursor, entry_end)
                update.append(piece)
                after.append(piece)
            entry = next(entries, None)
            if entry is not None:
                cursor, entry_end = entry.iova, entry.end
        if unit is None:
            break
        # Most of a map is the very mappings the kernel was given; else Mapping.translates_like, inlined.
        if entry is unit or (entry is not None and entry.iova <= start and unit.end <= entry_end
                             and entry.region is unit.region and entry.perm == unit.perm
                             and entry.offset - entry.iova == unit.offset - start):
            if run_start is not None:
                invalidate.append(_range(run_start, run_end))
                run_start = None
            if cursor < start:
                piece = entry.piece(cursor, start)
                update.append(piece)
                after.append(piece)
            cursor = unit.end
            after.append(unit)
        else:
            if run_start is None:
                run_start = start
            run_end = unit.end
    if run_start is not None:
        invalidate.append(_range(run_start, run_end))
    return Plan(tuple(invalidate), tuple(update), MappingTree(after))


def _spans(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) ranges sorted, and merged where they overlap or touch."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _plan_near(units: MappingTree, target: AddressMap, touched: Sequence[tuple[int, int]]) -> Plan:
    # Outside the touched ranges every unit still translates as wanted, so it is kept, and
    # every byte target maps there is covered by one. Only units that meet a touched range can go.
    spans = _spans(touched) if len(touched) > 1 else touched
    near: list[Mapping] = []
    for start, end in spans:
        for unit in units.overlapping(start, end):
            if not near or near[-1] is not unit:  # a unit across two spans is met twice in a row
                near.append(unit)
    flags = [(unit, target.matches(unit)) for unit in near]
    kept = [unit for unit, keep in flags if keep]
    removed = [unit for unit, keep in flags if not keep]

    # Two removed units make one run when no unit lies between them: a unit that did not meet
    # a touched range is kept, so it breaks the run as a kept unit among `near` does.
    paired: list[tuple[Mapping, bool]] = []
    for index, (unit, keep) in enumerate(flags):
        if index and not keep and not flags[index - 1][1] and units.following(flags[index - 1][0].end) is not unit:
            paired.append((unit, True))  # stands for the unit in between: the run ends there
        paired.append((unit, keep))
    invalidate = _runs(paired)

    # What target maps and no kept unit covers lies inside the touched ranges or a removed unit:
    # the UPDATEs are the pieces of target's entries there, between the kept units.
    update: list[Mapping] = []
    kept_starts = [unit.iova for unit in kept]
    for start, end in _spans([*spans, *((unit.iova, unit.end) for unit in removed)]):
        for entry in target.tree.overlapping(start, end):
            cursor, stop = max(start, entry.iova), min(end, entry.end)
            index = max(bisect.bisect_right(kept_starts, cursor) - 1, 0)
            while index < len(kept) and kept[index].iova < stop:
                hole = kept[index]
                if hole.end > cursor:
                    if hole.iova > cursor:
                        update.append(entry.piece(cursor, hole.iova))
                    cursor = hole.end
                index += 1
            if cursor < stop:
                update.append(entry.piece(cursor, stop))
    return Plan(invalidate, tuple(update), _changed(units, removed, update))


def _changed(units: MappingTree, removed: list[Mapping], added: list[Mapping]) -> MappingTree:
    """`units` without `removed`, with `added`: path copies for a few changes, one O(n) build for many."""
    if 4 * (len(removed) + len(added)) > len(units) + BULK_CHANGE:
        gone = set(map(id, removed))
        # Two sorted runs: sorted() merges them in linear time.
        return MappingTree(sorted((*(u for u in units if id(u) not in gone), *added), key=attrgetter("iova")))
    after = units
    for unit in removed:
        after = after.removed(unit)
    for unit in added:
        after = after.inserted(unit)
    return after


def unmapped_meanwhile(units: Iterable[Mapping], work: Plan, target: AddressMap) -> tuple[tuple[int, int], ...]:
    """The (iova, size) ranges `target` maps that `work`'s INVALIDATEs unmap before its UPDATEs map them again.

    A device that applies each message as it is written may reach those bytes
    in between and find nothing there; a device that takes a batch as one
    switch (set_map) never sees the gap.
    """
    # The units an INVALIDATE meets are exactly the ones the plan removes.
    units = MappingTree.of(units)
    removed = [unit for iova, size in work.invalidate for unit in units.overlapping(iova, iova + size)]
    spans: list[tuple[int, int]] = []
    for unit in removed:
        for entry in target.tree.overlapping(unit.iova, unit.end):
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
    return Plan(_runs((unit, False) for unit in MappingTree.of(units)), fresh.update, fresh.units)
