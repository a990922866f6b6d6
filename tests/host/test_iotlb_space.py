"""AddressMap: normalisation (contiguous neighbours merge), map/unmap, lookups."""

from __future__ import annotations

import pytest

from vdpad.iotlb import PAGE_SIZE, AddressMap, Mapping, MemoryRegion, Perm
from vdpad.iotlb.space import OverlapError

P = PAGE_SIZE


@pytest.fixture(scope="module")
def regions():
    with MemoryRegion(16 * P, "a") as a, MemoryRegion(16 * P, "b") as b:
        yield a, b


def test_contiguous_neighbours_are_one_entry(regions):
    a, _ = regions
    split = AddressMap([Mapping(0, P, a, 0, Perm.RW), Mapping(P, 2 * P, a, P, Perm.RW)])
    whole = AddressMap([Mapping(0, 3 * P, a, 0, Perm.RW)])
    assert split == whole
    assert split.entries == (Mapping(0, 3 * P, a, 0, Perm.RW),)


@pytest.mark.parametrize("second", [
    ("b", P, Perm.RW),      # another region
    ("a", 2 * P, Perm.RW),  # the offset jumps
    ("a", P, Perm.RO),      # another permission
])
def test_neighbours_that_do_not_continue_stay_apart(regions, second):
    by_name = {r.name: r for r in regions}
    name, offset, perm = second
    m = AddressMap([Mapping(0, P, by_name["a"], 0, Perm.RW), Mapping(P, P, by_name[name], offset, perm)])
    assert len(m) == 2


def test_same_looking_but_different_regions_differ(regions):
    a, _ = regions
    with MemoryRegion(16 * P, "a") as twin:
        assert AddressMap([Mapping(0, P, a, 0, Perm.RW)]) != AddressMap([Mapping(0, P, twin, 0, Perm.RW)])


def test_map_over_a_mapped_range_is_refused_with_both_ranges(regions):
    a, b = regions
    m = AddressMap([Mapping(4 * P, 4 * P, a, 0, Perm.RW)])
    with pytest.raises(OverlapError, match=r"\[0x3000, 0x5000\) overlaps Mapping\(\[0x4000, 0x8000\)"):
        m.mapped(Mapping(3 * P, 2 * P, b, 0, Perm.RW))


def test_unmap_cuts_entries_and_keeps_their_outer_parts(regions):
    a, _ = regions
    m = AddressMap([Mapping(0, 8 * P, a, 0, Perm.RW)]).unmapped(2 * P, 3 * P)
    assert m.entries == (Mapping(0, 2 * P, a, 0, Perm.RW), Mapping(5 * P, 3 * P, a, 5 * P, Perm.RW))
    assert m.mapped(Mapping(2 * P, 3 * P, a, 2 * P, Perm.RW)) == AddressMap([Mapping(0, 8 * P, a, 0, Perm.RW)])


def test_lookup_overlapping_and_matches(regions):
    a, b = regions
    m = AddressMap([Mapping(0, 2 * P, a, 0, Perm.RW), Mapping(4 * P, P, b, 3 * P, Perm.RO)])
    assert m.lookup(P + 5).offset == 0 and m.lookup(4 * P).region is b
    assert m.lookup(2 * P) is None
    assert [e.iova for e in m.overlapping(P, 4 * P)] == [0, 4 * P]
    assert m.overlapping(2 * P, 2 * P) == []
    assert m.matches(Mapping(P, P, a, P, Perm.RW))
    assert not m.matches(Mapping(P, P, a, 0, Perm.RW))           # other memory
    assert not m.matches(Mapping(P, 2 * P, a, P, Perm.RW))       # runs into a hole
    assert not m.matches(Mapping(4 * P, P, b, 3 * P, Perm.RW))   # other permission
    assert m.mapped_bytes == 3 * P


def test_uaddr_is_region_address_plus_offset(regions):
    a, _ = regions
    assert Mapping(0, P, a, 3 * P, Perm.RO).uaddr == a.address + 3 * P
