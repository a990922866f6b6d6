"""Address maps: IOVA -> (memory region, offset, permission), as a pure value.

An `AddressMap` is normalised: its entries are sorted, never overlap, and two
neighbours that continue each other (same region, the offset running on, the
same permission) are one entry. Two ways of writing the same translation are
therefore the same map: mapping A then B of contiguous memory equals mapping
A' covering both, and `==` says so.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from vdpad.device.iotlb_msg import Access

VALID_PERMS = (Access.RO, Access.WO, Access.RW)


class Memory(Protocol):
    """What a map needs of a region (vdpad.iotlb.MemoryRegion is one)."""

    name: str
    size: int
    address: int

    @property
    def closed(self) -> bool: ...


class OverlapError(ValueError):
    """A range mapped over one that is already mapped."""


@dataclass(frozen=True, eq=False)
class Mapping:
    """`size` bytes at `iova` translate to `region` from `offset`, with `perm`.

    Regions are compared by identity: the same memory, not equal-looking memory.
    """

    iova: int
    size: int
    region: Memory
    offset: int
    perm: Access

    @property
    def end(self) -> int:
        """The first IOVA after the mapping."""
        return self.iova + self.size

    @property
    def uaddr(self) -> int:
        """The userspace address the kernel is given for `iova`."""
        return self.region.address + self.offset

    def continued_by(self, other: Mapping) -> bool:
        """`other` starts where this ends and maps the memory that follows, the same way."""
        return (other.iova == self.end and other.region is self.region
                and other.offset == self.offset + self.size and other.perm == self.perm)

    def translates_like(self, other: Mapping) -> bool:
        """Where both are defined, the two give the same memory with the same permission."""
        return (self.region is other.region and self.perm == other.perm
                and self.offset - self.iova == other.offset - other.iova)

    def covers(self, iova: int, end: int) -> bool:
        return self.iova <= iova and end <= self.end

    def piece(self, iova: int, end: int) -> Mapping:
        """The part of this mapping in [iova, end)."""
        if not (self.iova <= iova < end <= self.end):
            raise ValueError(f"[{iova:#x}, {end:#x}) is not inside {self}")
        return Mapping(iova, end - iova, self.region, self.offset + iova - self.iova, self.perm)

    def _key(self) -> tuple:
        return (self.iova, self.size, id(self.region), self.offset, int(self.perm))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._key() == other._key() and self.region is other.region

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        name = getattr(self.region, "name", "?")
        return (f"Mapping([{self.iova:#x}, {self.end:#x}) -> {name}+{self.offset:#x} "
                f"{Access(self.perm).name})")


def describe_range(iova: int, size: int) -> str:
    return f"[{iova:#x}, {iova + size:#x})"


class AddressMap:
    """An immutable, normalised interval map. Operations return new maps."""

    __slots__ = ("_entries", "_starts")

    def __init__(self, entries: Iterable[Mapping] = ()):
        ordered = sorted(entries, key=lambda m: m.iova)
        merged: list[Mapping] = []
        for entry in ordered:
            if entry.size <= 0:
                raise ValueError(f"{entry} has no size")
            if merged and entry.iova < merged[-1].end:
                raise OverlapError(f"{entry} overlaps {merged[-1]}")
            if merged and merged[-1].continued_by(entry):
                last = merged.pop()
                entry = Mapping(last.iova, last.size + entry.size, last.region, last.offset, last.perm)
            merged.append(entry)
        self._entries = tuple(merged)
        self._starts = [m.iova for m in merged]

    # -- reading ------------------------------------------------------------
    @property
    def entries(self) -> tuple[Mapping, ...]:
        return self._entries

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressMap):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return f"AddressMap({list(self._entries)!r})"

    @property
    def mapped_bytes(self) -> int:
        return sum(m.size for m in self._entries)

    def lookup(self, iova: int) -> Mapping | None:
        """The entry that contains `iova`, if any."""
        index = bisect.bisect_right(self._starts, iova) - 1
        if index >= 0 and iova < self._entries[index].end:
            return self._entries[index]
        return None

    def overlapping(self, iova: int, size: int) -> list[Mapping]:
        """Entries that intersect [iova, iova + size)."""
        end = iova + size
        index = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        found = []
        for entry in self._entries[index:]:
            if entry.iova >= end:
                break
            if entry.end > iova:
                found.append(entry)
        return found

    def matches(self, unit: Mapping) -> bool:
        """Every byte of `unit` translates here exactly as `unit` says."""
        entry = self.lookup(unit.iova)
        return entry is not None and entry.covers(unit.iova, unit.end) and entry.translates_like(unit)

    # -- changing (new maps) ---------------------------------------------------
    def mapped(self, mapping: Mapping) -> AddressMap:
        clash = self.overlapping(mapping.iova, mapping.size)
        if clash:
            raise OverlapError(f"{describe_range(mapping.iova, mapping.size)} overlaps {clash[0]}, "
                               "which is mapped already (unmap it first)")
        return AddressMap(self._entries + (mapping,))

    def unmapped(self, iova: int, size: int) -> AddressMap:
        """This map without [iova, iova + size); entries partly inside keep their outer parts."""
        end = iova + size
        kept: list[Mapping] = []
        for entry in self._entries:
            if entry.end <= iova or entry.iova >= end:
                kept.append(entry)
                continue
            if entry.iova < iova:
                kept.append(entry.piece(entry.iova, iova))
            if end < entry.end:
                kept.append(entry.piece(end, entry.end))
        return AddressMap(kept)

    def without(self, units: Iterable[Mapping]) -> list[Mapping]:
        """The parts of this map not covered by `units` (sorted, non-overlapping, all inside the map)."""
        holes = sorted(units, key=lambda u: u.iova)
        pieces: list[Mapping] = []
        index = 0
        for entry in self._entries:
            cursor = entry.iova
            while index < len(holes) and holes[index].end <= entry.iova:
                index += 1
            scan = index
            while scan < len(holes) and holes[scan].iova < entry.end:
                hole = holes[scan]
                if hole.iova > cursor:
                    pieces.append(entry.piece(cursor, hole.iova))
                cursor = max(cursor, hole.end)
                scan += 1
            if cursor < entry.end:
                pieces.append(entry.piece(cursor, entry.end))
        return pieces
