"""The diff from what the kernel holds to a wanted map: correct, minimal, nothing for equivalent maps.

The plans are applied to a model of vhost-vdpa's entry handling, written from
drivers/vhost/vdpa.c and drivers/vhost/iotlb.c (6.12): an UPDATE that
intersects an entry is refused; an INVALIDATE frees every entry it
intersects, whole; in PA mode one UPDATE becomes several entries at
physically contiguous chunk boundaries (drawn at random here). The real
kernel judges the same plans in tests/kernel/test_iotlb_*.py.
"""

from __future__ import annotations

import errno
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vdpad.device.iotlb_msg import IotlbMessage, MessageType
from vdpad.iotlb import PAGE_SIZE, AddressMap, Mapping, MemoryRegion, Perm
from vdpad.iotlb.plan import after_invalidate, after_update, plan, replay, transition, unmapped_meanwhile

P = PAGE_SIZE
SPAN = 48  # pages of IOVA space the maps are drawn in
REGION_PAGES = 32
REGIONS = [MemoryRegion(REGION_PAGES * P, f"r{i}") for i in range(3)]
PERMS = st.sampled_from([Perm.RO, Perm.WO, Perm.RW])


class KernelModel:
    """vhost-vdpa's entries for one address space."""

    def __init__(self, rnd: random.Random | None = None):
        self.entries: list[tuple[int, int, int, Perm]] = []  # start, end, uaddr, perm
        self.rnd = rnd  # set: UPDATEs are cut into chunks, as PA mode pins them

    def write(self, message: IotlbMessage) -> None:
        start, end = message.iova, message.iova + message.size
        if message.type is MessageType.UPDATE:
            if message.size == 0 or any(s < end and start < e for s, e, _, _ in self.entries):
                raise OSError(errno.EFAULT, "EEXIST: the range intersects an entry")
            cuts = sorted(self.rnd.sample(range(start + P, end, P), k=self.rnd.randint(0, (end - start) // P - 1))
                          ) if self.rnd else []
            bounds = [start, *cuts, end]
            for a, b in zip(bounds, bounds[1:]):
                self.entries.append((a, b, message.uaddr + a - start, message.perm))
        elif message.type is MessageType.INVALIDATE:
            self.entries = [x for x in self.entries if x[1] <= start or x[0] >= end]
        else:
            raise AssertionError(f"unexpected {message.type.name} in a plan")

    def translation(self) -> dict[int, tuple[int, Perm]]:
        pages = {}
        for start, end, uaddr, perm in self.entries:
            for page in range(start, end, P):
                assert page not in pages, "the model never holds overlapping entries"
                pages[page] = (uaddr + page - start, perm)
        return pages


def translation(entries) -> dict[int, tuple[int, Perm]]:
    return {page: (m.uaddr + page - m.iova, m.perm) for m in entries for page in range(m.iova, m.end, P)}


def assert_kernel_holds(kernel: KernelModel, units) -> None:
    """Every kernel entry lies inside one unit and the units are fully present."""
    for start, end, _, _ in kernel.entries:
        assert sum(1 for u in units if u.iova <= start and end <= u.end) == 1
    assert kernel.translation() == translation(units)


@st.composite
def maps(draw, span: int = SPAN) -> AddressMap:
    """Any map in [0, span) pages: holes, fresh memory, and runs that continue the memory before them."""
    entries: list[Mapping] = []
    page, previous = 0, None
    while page < span:
        length = min(draw(st.integers(1, 6)), span - page)
        kind = draw(st.sampled_from(["hole", "fresh", "continue", "continue"]))
        if kind == "hole":
            previous = None
        else:
            if kind == "continue" and previous and previous.offset + previous.size + length * P <= REGION_PAGES * P:
                perm = draw(st.sampled_from([previous.perm, previous.perm, Perm.RO, Perm.RW]))
                mapping = Mapping(page * P, length * P, previous.region, previous.offset + previous.size, perm)
            else:
                region = draw(st.sampled_from(REGIONS))
                offset = draw(st.integers(0, REGION_PAGES - length)) * P
                mapping = Mapping(page * P, length * P, region, offset, draw(PERMS))
            entries.append(mapping)
            previous = mapping
        page += length
    return AddressMap(entries)


@st.composite
def pieces_of(draw, m: AddressMap) -> list[Mapping]:
    """The same translation written as more, smaller entries."""
    out = []
    for entry in m:
        pages = entry.size // P
        cuts = sorted(draw(st.sets(st.integers(1, pages - 1), max_size=pages - 1))) if pages > 1 else []
        bounds = [0, *cuts, pages]
        out += [entry.piece(entry.iova + a * P, entry.iova + b * P) for a, b in zip(bounds, bounds[1:])]
    return draw(st.permutations(out))


def apply(kernel: KernelModel, work, asid: int = 0):
    for message in work.messages(asid):
        kernel.write(message)


def commits(kernel: KernelModel, sequence):
    """Commit each map in turn: (units before, map, plan) once the kernel took the plan."""
    units: tuple[Mapping, ...] = ()
    for target in sequence:
        work = plan(units, target)
        apply(kernel, work)
        yield units, target, work
        units = work.units


def assert_minimal(units, target: AddressMap, work) -> None:
    """Nothing that still translates as wanted is touched, and no two messages could be one."""
    kept = set(units) & set(work.units)
    removed = [u for u in units if u not in kept]
    for unit in units:  # a unit goes if and only if some byte of it changes
        assert (unit in kept) == target.matches(unit), unit
    for start, size in work.invalidate:
        end = start + size
        assert not any(u.iova < end and start < u.end for u in kept), "INVALIDATE of an unchanged entry"
        assert any(u.iova < end and start < u.end for u in removed), "INVALIDATE that frees nothing"
    for unit in removed:
        assert any(s <= unit.iova and unit.end <= s + n for s, n in work.invalidate), f"{unit} never invalidated"
    ordered = sorted(work.invalidate)
    for (s1, n1), (s2, _) in zip(ordered, ordered[1:]):
        assert any(s1 + n1 <= u.iova and u.end <= s2 for u in kept), "two INVALIDATEs that could be one"
    before = translation(units)
    after = translation(target)
    freed = {page for u in removed for page in range(u.iova, u.end, P)}
    updates = sorted(work.update, key=lambda u: u.iova)
    for update in updates:
        assert target.matches(update)
        assert not any(u.iova < update.end and update.iova < u.end for u in kept)
        for page in range(update.iova, update.end, P):
            assert page in freed or before.get(page) != after[page], f"UPDATE of unchanged {page:#x}"
    for a, b in zip(updates, updates[1:]):
        assert not a.continued_by(b), f"{a} and {b} could be one UPDATE"


@settings(max_examples=300, deadline=None)
@given(st.lists(maps(), min_size=1, max_size=6), st.booleans(), st.randoms(use_true_random=False))
def test_any_sequence_of_maps_reaches_each_map_minimally(sequence, pa_mode, rnd):
    kernel = KernelModel(rnd if pa_mode else None)
    for units, target, work in commits(kernel, sequence):
        assert_minimal(units, target, work)
        assert kernel.translation() == translation(target)
        assert_kernel_holds(kernel, work.units)
        assert not plan(work.units, target), "a map reached is reached: nothing more to send"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_equivalent_maps_send_nothing_however_the_kernel_entries_were_cut(data):
    target = data.draw(maps())
    pieces = data.draw(pieces_of(target))
    assert AddressMap(pieces) == target
    # A+B+... sent one commit at a time: each commit sends only its new piece.
    units: tuple[Mapping, ...] = ()
    built = AddressMap()
    for piece in pieces:
        built = built.mapped(piece)
        work = plan(units, built)
        assert work.update == (piece,) and not work.invalidate
        units = work.units
    assert sorted(units, key=lambda u: u.iova) == sorted(pieces, key=lambda u: u.iova)
    assert not plan(units, target), "A+B -> A' sends nothing"
    whole = plan((), target).units
    assert not plan(whole, AddressMap(pieces)), "A' -> A+B sends nothing"


def test_a_changed_permission_costs_the_invalidate_and_update_of_that_range():
    r = REGIONS[0]
    old = AddressMap([Mapping(0, 4 * P, r, 0, Perm.RW), Mapping(4 * P, 4 * P, r, 8 * P, Perm.RW)])
    units = plan((), old).units
    new = old.unmapped(4 * P, 4 * P).mapped(Mapping(4 * P, 4 * P, r, 8 * P, Perm.RO))
    work = plan(units, new)
    assert work.invalidate == ((4 * P, 4 * P),)
    assert work.update == (Mapping(4 * P, 4 * P, r, 8 * P, Perm.RO),)


def test_a_unit_cut_by_a_change_is_sent_again_whole_and_alone():
    r = REGIONS[0]
    units = plan((), AddressMap([Mapping(0, 8 * P, r, 0, Perm.RW)])).units
    new = AddressMap([Mapping(0, 8 * P, r, 0, Perm.RW)]).unmapped(2 * P, P)
    work = plan(units, new)
    # The kernel cannot unmap part of an entry: free it whole, send both sides again.
    assert work.invalidate == ((0, 8 * P),)
    assert work.update == (Mapping(0, 2 * P, r, 0, Perm.RW), Mapping(3 * P, 5 * P, r, 3 * P, Perm.RW))


def test_removed_units_with_nothing_kept_between_are_freed_by_one_invalidate():
    a, b = REGIONS[:2]
    old = AddressMap([Mapping(0, P, a, 0, Perm.RW), Mapping(4 * P, P, b, 0, Perm.RW),
                      Mapping(8 * P, P, a, 4 * P, Perm.RW), Mapping(12 * P, P, b, 4 * P, Perm.RW)])
    units = plan((), old).units
    new = old.unmapped(0, 5 * P).unmapped(12 * P, P)  # keep only the unit at 8 pages
    work = plan(units, new)
    assert work.invalidate == ((0, 5 * P), (12 * P, P))
    assert work.update == ()


@settings(max_examples=300, deadline=None)
@given(maps(), maps(), st.integers(0, 200), st.booleans(), st.randoms(use_true_random=False))
def test_a_refusal_anywhere_is_undone_to_the_entries_before(first, second, refused_at, pa_mode, rnd):
    kernel = KernelModel(rnd if pa_mode else None)
    start = plan((), first)
    apply(kernel, start)
    work = plan(start.units, second)
    messages = work.messages()
    refused_at %= len(messages) + 1
    units = start.units
    for message in messages[:refused_at]:  # the kernel took these, then refused the next
        kernel.write(message)
        if message.type is MessageType.INVALIDATE:
            units = after_invalidate(units, message.iova, message.size)
        else:
            units = after_update(units, next(u for u in work.update if u.iova == message.iova))
    assert_kernel_holds(kernel, units)
    undo = transition(units, start.units)
    apply(kernel, undo)
    assert set(undo.units) == set(start.units)
    assert_kernel_holds(kernel, start.units)
    assert kernel.translation() == translation(first)


@settings(max_examples=200, deadline=None)
@given(st.lists(maps(), min_size=1, max_size=4), st.booleans(), st.randoms(use_true_random=False))
def test_replay_after_a_clean_reset_frees_the_old_entries_then_sends_the_map(history, pa_mode, rnd):
    kernel = KernelModel(rnd if pa_mode else None)
    *_, (_, _, work) = commits(kernel, history)
    units = work.units
    # SET_STATUS(0) without PERSIST: the device's map is gone, vhost-vdpa's entries are not.
    again = replay(units, history[-1])
    assert len(again.invalidate) <= 1
    assert again.update == plan((), history[-1]).update
    apply(kernel, again)
    assert kernel.translation() == translation(history[-1])
    assert_kernel_holds(kernel, again.units)


def test_messages_carry_the_asid_and_the_region_address():
    r = REGIONS[1]
    work = plan((), AddressMap([Mapping(16 * P, 2 * P, r, 4 * P, Perm.WO)]))
    (message,) = work.messages(asid=1)
    assert (message.type, message.iova, message.size, message.uaddr, message.perm, message.asid) == (
        MessageType.UPDATE, 16 * P, 2 * P, r.address + 4 * P, Perm.WO, 1)


def test_freeing_units_at_both_ends_of_the_iova_space_fits_one_message():
    """A run from IOVA 0 to 2^64-1 is 2^64 bytes: one byte less still frees the top unit."""
    a = REGIONS[0]
    top = (1 << 64) - P
    units = plan((), AddressMap([Mapping(0, P, a, 0, Perm.RW), Mapping(top, P, a, P, Perm.RW)])).units
    kernel = KernelModel()
    apply(kernel, plan((), AddressMap(units)))
    work = plan(units, AddressMap())
    assert work.invalidate == ((0, (1 << 64) - 1),)
    messages = work.messages()  # each must encode: a size of 2^64 would not
    assert [m.encode() for m in messages]
    apply(kernel, work)
    assert kernel.entries == [] and work.units == ()
    assert after_invalidate(units, 0, (1 << 64) - 1) == ()


@settings(max_examples=300, deadline=None)
@given(st.lists(maps(), min_size=2, max_size=4), st.booleans(), st.randoms(use_true_random=False))
def test_the_window_is_exactly_the_bytes_mapped_after_that_the_kernel_goes_without_meanwhile(sequence, pa_mode, rnd):
    """Applied one message at a time (a dma_map parent), the model's translation loses exactly the
    window's pages at some point between the commit's start and its end, and no others that stay mapped."""
    kernel = KernelModel(rnd if pa_mode else None)
    for units, target, work in commits(kernel, sequence):
        window = {page for iova, size in unmapped_meanwhile(units, work, target) for page in range(iova, iova + size, P)}
        replayed = KernelModel()
        replayed.entries = [(u.iova, u.end, u.uaddr, u.perm) for u in units]
        gone: set[int] = set()
        for message in work.messages():
            replayed.write(message)
            gone |= set(translation(units)) - set(replayed.translation())
        assert window == gone & set(translation(target))
        spans = unmapped_meanwhile(units, work, target)
        assert all(a[0] + a[1] < b[0] for a, b in zip(spans, spans[1:])), "spans sorted, apart, merged"


def test_a_cut_live_entry_has_a_window_of_what_stays():
    region = REGIONS[0]
    units = (Mapping(0, 8 * P, region, 0, Perm.RW),)
    target = AddressMap(units).unmapped(7 * P, P)
    work = plan(units, target)
    assert unmapped_meanwhile(units, work, target) == ((0, 7 * P),)
    assert unmapped_meanwhile(work.units, plan(work.units, target), target) == ()  # nothing to do, no window
