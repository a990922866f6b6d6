"""The persistent B+tree under AddressMap and the units, against simple models.

Nodes are made tiny here (4 items at most) so that a few dozen mappings
already build trees several levels deep, and splits, merges and refills
happen on nearly every change.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.host.test_iotlb_plan import REGION_PAGES, REGIONS, maps, pieces_of
from vdpad.iotlb import PAGE_SIZE, AddressMap, Mapping, Perm
from vdpad.iotlb import plan as plan_module
from vdpad.iotlb import tree as tree_module
from vdpad.iotlb.plan import plan
from vdpad.iotlb.space import OverlapError
from vdpad.iotlb.tree import UPDATE_QUAD, MappingTree

P = PAGE_SIZE
SPAN = 64  # pages
PERMS = st.sampled_from([Perm.RO, Perm.WO, Perm.RW])


@contextmanager
def small_nodes(fanout: int = 4) -> Iterator[None]:
    saved = tree_module.FANOUT, tree_module._LEAST
    tree_module.FANOUT, tree_module._LEAST = fanout, fanout // 2
    try:
        yield
    finally:
        tree_module.FANOUT, tree_module._LEAST = saved


def check_shape(tree: MappingTree) -> None:
    """Every leaf at one depth, keys and totals right, every node but the root between half full and full."""
    depths = set()

    def visit(node, depth: int, root: bool) -> None:
        assert len(node.items) <= tree_module.FANOUT
        assert node.first == node.keys[0]
        assert root or len(node.items) >= tree_module._LEAST, "a node left too small"
        if node.leaf:
            depths.add(depth)
            assert node.keys == tuple(m.iova for m in node.items)
            assert node.count == len(node.items) and node.nbytes == sum(m.size for m in node.items)
            return
        assert not root or len(node.items) > 1, "a root with one child"
        assert node.keys == tuple(child.first for child in node.items)
        assert node.count == sum(c.count for c in node.items) and node.nbytes == sum(c.nbytes for c in node.items)
        for child in node.items:
            visit(child, depth + 1, False)

    if tree._root is not None:
        visit(tree._root, 0, True)
        assert len(depths) == 1


def page_mapping(page: int, pages: int, region: int = 0, offset: int = 0, perm: Perm = Perm.RW) -> Mapping:
    return Mapping(page * P, pages * P, REGIONS[region], offset * P, perm)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 200)), max_size=200), st.integers(0, 80))
def test_tree_inserts_and_removes_like_a_sorted_list(changes, built):
    """Start from a bulk-built tree, then insert and remove one-page mappings; every old tree stays as it was."""
    with small_nodes():
        model = [page_mapping(2 * i, 1) for i in range(built)]
        tree = MappingTree(model)
        history = [(tree, list(model))]
        for insert, page in changes:
            present = next((m for m in model if m.iova == page * P), None)
            if insert and present is None:
                entry = page_mapping(page, 1, offset=page % REGION_PAGES)
                tree = tree.inserted(entry)
                model = sorted([*model, entry], key=lambda m: m.iova)
            elif not insert and present is not None:
                tree = tree.removed(present)
                model = [m for m in model if m is not present]
            elif not insert:
                with pytest.raises(KeyError):
                    tree.removed(page_mapping(page, 1))
                continue
            check_shape(tree)
            tree.update_quads()  # packed as it changes: later versions reuse what did not change
            history.append((tree, list(model)))
        for snapshot, expected in history:  # persistence: each version still reads as it did
            assert list(snapshot) == expected and snapshot == tuple(expected) and len(snapshot) == len(expected)
            assert snapshot.update_quads() == array("Q", [w for m in expected for w in UPDATE_QUAD(m)]).tobytes()
            assert [snapshot.at(i) for i in range(len(expected))] == expected
            with pytest.raises(IndexError):
                snapshot.at(len(expected))
            assert snapshot.nbytes == sum(m.size for m in expected) and bool(snapshot) == bool(expected)
            assert hash(snapshot) == hash(tuple(expected))
        for page in range(0, 205, 3):
            iova = page * P
            assert tree.floor(iova) == next((m for m in reversed(model) if m.iova <= iova), None)
            assert tree.following(iova) == next((m for m in model if m.iova >= iova), None)
            assert list(tree.starting_from(iova)) == [m for m in model if m.iova >= iova]
            assert list(tree.overlapping(iova, iova + 5 * P)) == [m for m in model if m.iova < iova + 5 * P
                                                                  and m.end > iova]


# -- AddressMap against a page-by-page model -------------------------------------------------

def normalised(pages: dict[int, tuple[int, int, Perm]]) -> list[Mapping]:
    """The entries a page model makes: consecutive pages continuing the same memory the same way are one."""
    entries: list[Mapping] = []
    for page in sorted(pages):
        region, offset, perm = pages[page]
        last = entries[-1] if entries else None
        if (last is not None and last.end == page * P and last.region is REGIONS[region]
                and last.offset + last.size == offset * P and last.perm == perm):
            entries[-1] = Mapping(last.iova, last.size + P, last.region, last.offset, perm)
        else:
            entries.append(page_mapping(page, 1, region, offset, perm))
    return entries


operations = st.lists(st.one_of(
    st.tuples(st.just("map"), st.integers(0, SPAN - 1), st.integers(1, 8), st.integers(0, 2),
              st.integers(0, REGION_PAGES - 8), PERMS, st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, SPAN - 1), st.integers(1, 12)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(operations, st.data())
def test_address_map_maps_and_unmaps_like_a_page_model(ops, data):
    with small_nodes():
        current = AddressMap()
        pages: dict[int, tuple[int, int, Perm]] = {}
        for op in ops:
            if op[0] == "map":
                _, page, length, region, offset, perm, continues = op
                before = pages.get(page - 1)
                if continues and before is not None and before[1] + 1 + length <= REGION_PAGES:
                    region, offset, perm = before[0], before[1] + 1, before[2]  # a neighbour it continues
                mapping = page_mapping(page, length, region, offset, perm)
                if any(p in pages for p in range(page, page + length)):
                    with pytest.raises(OverlapError):
                        current.mapped(mapping)
                    continue
                current = current.mapped(mapping)
                pages.update({page + i: (region, offset + i, perm) for i in range(length)})
            else:
                _, page, length = op
                current = current.unmapped(page * P, length * P)
                for p in range(page, page + length):
                    pages.pop(p, None)
            check_shape(current.tree)
            expected = normalised(pages)
            assert current.entries == tuple(expected) and list(current) == expected
            assert len(current) == len(expected) and bool(current) == bool(expected)
            assert current.mapped_bytes == len(pages) * P
        # Any other way of writing the same translation is the same map.
        rewritten = AddressMap(data.draw(pieces_of(current)))
        assert rewritten == current and hash(rewritten) == hash(current)
        for page in range(SPAN + 8):
            found = current.lookup(page * P + 7)
            assert (found is None) == (page not in pages)
            if found is not None:
                region, offset, perm = pages[page]
                assert found.uaddr + page * P - found.iova == REGIONS[region].address + offset * P
                assert found.perm == perm
        start, length = data.draw(st.integers(0, SPAN)), data.draw(st.integers(1, 16))
        assert current.overlapping(start * P, length * P) == [
            m for m in current.entries if m.iova < (start + length) * P and m.end > start * P]
        unit = page_mapping(start, length, data.draw(st.integers(0, 2)), data.draw(st.integers(0, 8)),
                            data.draw(PERMS))
        assert current.matches(unit) == all(
            pages.get(start + i) == (REGIONS.index(unit.region), unit.offset // P + i, unit.perm)
            for i in range(length))


# -- planning only around what a transaction touched ------------------------------------------

@pytest.mark.parametrize("bulk_change", [0, 1 << 30], ids=["rebuilt", "path-copied"])
@settings(max_examples=400, deadline=None)
@given(st.data())
def test_planning_near_the_touched_ranges_gives_the_full_plan(bulk_change, data):
    """Kernel units that translate as the map a transaction started from, cut anywhere: the plan
    over the touched ranges only is the plan of the whole comparison (the kernel's entries after it
    built anew for many changes, or changed in place for a few)."""
    with small_nodes(), mock.patch.object(plan_module, "BULK_CHANGE", bulk_change), \
            mock.patch.object(plan_module, "NEAR_SHARE", 0):  # near however many ranges were touched
        base = data.draw(maps(span=SPAN))
        units = MappingTree.of(data.draw(pieces_of(base)))
        target, touched = base, []
        for op in data.draw(operations):
            if op[0] == "map":
                _, page, length, region, offset, perm, continues = op
                before = target.lookup(page * P - 1)
                if continues and before is not None:
                    mapping = Mapping(page * P, length * P, before.region,
                                      before.offset + page * P - before.iova, before.perm)
                    if mapping.offset + mapping.size > before.region.size:
                        continue
                else:
                    mapping = page_mapping(page, length, region, offset, perm)
                try:
                    target = target.mapped(mapping)
                except OverlapError:
                    continue
            else:
                _, page, length = op
                target = target.unmapped(page * P, length * P)
            touched.append((op[1] * P, (op[1] + op[2]) * P))
        full = plan(units, target)
        near = plan(units, target, touched)
        assert near.invalidate == full.invalidate
        assert near.update == full.update
        assert near.units == full.units
        check_shape(near.units)
