"""Address maps: IOVA -> (memory region, offset, permission), as a pure value.

An `AddressMap` is normalised: its entries are sorted, never overlap, and two
neighbours that continue each other (same region, the offset running on, the
same permission) are one entry. Two ways of writing the same translation are
therefore the same map: mapping A then B of contiguous memory equals mapping
A' covering both, and `==` says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from vdpad.device.iotlb_msg import Access
from vdpad.iotlb.tree import MappingTree

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


class Mapping:
    """`size` bytes at `iova` translate to `region` from `offset`, with `perm`. Immutable.

    Regions are compared by identity: the same memory, not equal-looking memory.
    `end` (the first IOVA after it) and `uaddr` (the userspace address the
    kernel is given for `iova`) are worked out once: every plan and every
    UPDATE reads them.
    """

    iova: int
    size: int
    region: Memory
    offset: int
    perm: Access
    end: int
    uaddr: int

    def __init__(self, iova: int, size: int, region: Memory, offset: int, perm: Access):
        # One dict update, not a __setattr__ per field: maps and plans make mappings by the thousand.
        self.__dict__.update(iova=iova, size=size, region=region, offset=offset, perm=perm,
                             end=iova + size, uaddr=region.address + offset)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Mapping is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a Mapping is immutable: cannot delete {name}")

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
    """An immutable, normalised interval map. Operations return new maps.

    Stored in a persistent B+tree (vdpad.iotlb.tree): `lookup`, `mapped` and
    `unmapped` are O(log n) (plus the entries an unmap cuts), a new map shares
    nearly all of its storage with the old one, and `entries` is an O(n) copy.
    """

    __slots__ = ("_tree", "_hash")

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
        self._tree = MappingTree(merged)
        self._hash: int | None = None

    @classmethod
    def _of(cls, tree: MappingTree) -> AddressMap:
        """A map stored in `tree`, which holds normalised entries already."""
        new = cls.__new__(cls)
        new._tree, new._hash = tree, None
        return new

    # -- reading ------------------------------------------------------------
    @property
    def entries(self) -> tuple[Mapping, ...]:
        return tuple(self._tree)

    @property
    def tree(self) -> MappingTree:
        """The entries as stored: iterate or search them without copying."""
        return self._tree

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def __bool__(self) -> bool:
        return bool(self._tree)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressMap):
            return NotImplemented
        return self._tree == other._tree  # normalised: the same translation is the same entries

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self._tree)
        return self._hash

    def __repr__(self) -> str:
        return f"AddressMap({list(self._tree)!r})"

    @property
    def mapped_bytes(self) -> int:
        return self._tree.nbytes

    def lookup(self, iova: int) -> Mapping | None:
        """The entry that contains `iova`, if any."""
        entry = self._tree.floor(iova)
        return entry if entry is not None and iova < entry.end else None

    def overlapping(self, iova: int, size: int) -> list[Mapping]:
        """Entries that intersect [iova, iova + size)."""
        return self._tree.overlapping(iova, iova + size)

    def matches(self, unit: Mapping) -> bool:
        """Every byte of `unit` translates here exactly as `unit` says."""
        entry = self.lookup(unit.iova)
        return entry is not None and entry.covers(unit.iova, unit.end) and entry.translates_like(unit)

    # -- changing (new maps) ---------------------------------------------------
    def mapped(self, mapping: Mapping) -> AddressMap:
        if mapping.size <= 0:
            raise ValueError(f"{mapping} has no size")
        # Entries never overlap: only the last one starting before the mapping's end can reach into it;
        # when it does not, it is the entry before the mapping (if any).
        before = self._tree.floor(mapping.end - 1)
        if before is not None and before.end > mapping.iova:
            raise OverlapError(f"{describe_range(mapping.iova, mapping.size)} overlaps {before}, "
                               "which is mapped already (unmap it first)")
        tree = self._tree
        # Normalised: a neighbour that the new mapping continues (or that continues it) becomes one with it.
        if before is not None and before.continued_by(mapping):
            tree = tree.removed(before)
            mapping = Mapping(before.iova, before.size + mapping.size, before.region, before.offset, before.perm)
        after = tree.floor(mapping.end)
        if after is not None and mapping.continued_by(after):
            tree = tree.removed(after)
            mapping = Mapping(mapping.iova, mapping.size + after.size, mapping.region, mapping.offset, mapping.perm)
        return AddressMap._of(tree.inserted(mapping))

    def unmapped(self, iova: int, size: int) -> AddressMap:
        """This map without [iova, iova + size); entries partly inside keep their outer parts.
        The map itself when nothing is mapped there."""
        end = iova + size
        cut = self._tree.overlapping(iova, end)
        if not cut:
            return self
        tree = self._tree
        for entry in cut:
            tree = tree.removed(entry)
        # The outer parts stay normalised: their outer neighbours did not continue the whole entry either.
        if cut[0].iova < iova:
            tree = tree.inserted(cut[0].piece(cut[0].iova, iova))
        if end < cut[-1].end:
            tree = tree.inserted(cut[-1].piece(end, cut[-1].end))
        return AddressMap._of(tree)
