"""The IOTLB engine against vdpa_sim (VA mode): the messages it sends, judged by the kernel.

What the kernel holds is probed with a one-page UPDATE written behind the
engine's back: vhost-vdpa refuses it (EFAULT) where an entry is, and takes
it (the probe then invalidates it again) where none is.

Every test runs on both kinds of parent vdpa_sim can be: set_map (its
default, batch_mapping=1: the device gets a batch as one new map) and dma_map
(batch_mapping=0: each message reaches the device as it is written).
"""

from __future__ import annotations

import errno
import gc
import threading
from collections.abc import Iterator

import pytest
import trio
from structlog.testing import capture_logs

from tests.sim import debug_logging, sim_mode
from vdpad.device import BackendFeature, InvalidArgument, IotlbBatch, IotlbMessage, MessageType, VhostError, VhostVdpa
from vdpad.iotlb import PAGE_SIZE, DeviceIotlb, Mapping, MemoryRegion, Perm
from vdpad.mgmt.parent import MapKind

pytestmark = pytest.mark.kernel

P = PAGE_SIZE
BASE = 0x7000_0000_0000  # far from this process's own addresses
CVQ = 2
UPDATE, INVALIDATE = MessageType.UPDATE, MessageType.INVALIDATE
BEGIN, END = MessageType.BATCH_BEGIN, MessageType.BATCH_END


@pytest.fixture(scope="module", autouse=True, params=["set_map", "dma_map"])
def parent(request, sim_modules) -> Iterator[MapKind]:
    with sim_mode(batch_mapping=request.param == "set_map"):
        yield MapKind(request.param)


def occupied(dev: VhostVdpa, scratch: MemoryRegion, iova: int, asid: int = 0) -> bool:
    """Whether vhost-vdpa holds an entry at `iova` in `asid` (leaves it as it was)."""
    try:
        dev.write_iotlb(IotlbMessage(UPDATE, iova, P, scratch.address, Perm.RO, asid))
    except VhostError as error:
        assert error.errno == errno.EFAULT, error
        return True
    dev.write_iotlb(IotlbMessage(INVALIDATE, iova, P, asid=asid))
    return False


def kinds(trace) -> list[tuple]:
    """(type, iova, size, asid) of each write, and whether the kernel took it."""
    return [(w.message.type, w.message.iova, w.message.size, w.message.asid, w.accepted) for w in trace]


@pytest.fixture
def net(vdpa_net):
    # The regions outlive the fd: a region the device still maps refuses to close.
    with MemoryRegion(64 * P, "a") as a, MemoryRegion(64 * P, "b") as b, MemoryRegion(P, "scratch") as scratch, \
            VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        yield dev, DeviceIotlb(dev), a, b, scratch


def test_negotiation_acks_what_the_engine_needs_and_what_is_asked(vdpa_net):
    with VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev, backend_features=BackendFeature.SUSPEND | BackendFeature.RESUME)
        wanted = (BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH | BackendFeature.IOTLB_ASID
                  | BackendFeature.IOTLB_PERSIST | BackendFeature.SUSPEND | BackendFeature.RESUME)
        assert iotlb.acked == wanted == dev.acked_backend_features
        assert iotlb.persistent and iotlb.batching
        assert (iotlb.as_num, iotlb.group_num) == (2, 2)
        assert iotlb.iova_range == dev.get_iova_range()
        assert all(iotlb.space(asid).initial and not iotlb.space(asid).entries for asid in (0, 1))
        with pytest.raises(InvalidArgument, match="DESC_ASID"):
            DeviceIotlb(dev, backend_features=BackendFeature.DESC_ASID)  # not offered by vdpa_sim
        assert not DeviceIotlb(dev, persist=False).persistent


def test_a_first_map_is_one_batch_and_the_kernel_holds_it(net):
    dev, iotlb, a, b, scratch = net
    with iotlb.record() as trace:
        with iotlb.transaction(0) as tx:
            tx.map(BASE, a, 0, 8 * P)
            tx.map(BASE + 8 * P, a, 8 * P, 8 * P)        # continues the same memory: one entry
            tx.map(BASE + 32 * P, b, 4 * P, 2 * P, Perm.RO)
    assert kinds(trace) == [(BEGIN, 0, 0, 0, True), (UPDATE, BASE, 16 * P, 0, True),
                            (UPDATE, BASE + 32 * P, 2 * P, 0, True), (END, 0, 0, 0, True)]
    assert [(m.uaddr, m.perm) for m in trace.messages(UPDATE)] == [(a.address, Perm.RW),
                                                                   (b.address + 4 * P, Perm.RO)]
    assert tx.sent.update == iotlb.space(0).units
    view = iotlb.space(0)
    assert not view.initial and view.in_sync
    assert view.lookup(BASE + 9 * P) == Mapping(BASE, 16 * P, a, 0, Perm.RW)
    assert occupied(dev, scratch, BASE) and occupied(dev, scratch, BASE + 15 * P)
    assert occupied(dev, scratch, BASE + 33 * P)
    assert not occupied(dev, scratch, BASE + 16 * P) and not occupied(dev, scratch, BASE + 34 * P)


def test_a_plus_b_replaced_by_a_prime_and_split_back_send_nothing(net):
    dev, iotlb, a, _, scratch = net
    iotlb.map(0, BASE, a, 0, 4 * P)                 # A
    iotlb.map(0, BASE + 4 * P, a, 4 * P, 4 * P)     # B: continues A's memory
    units = iotlb.space(0).units
    assert len(units) == 2 and len(iotlb.space(0).entries) == 1
    with iotlb.record() as trace:
        with iotlb.transaction(0) as tx:            # A + B -> A'
            tx.unmap(BASE, 8 * P)
            tx.map(BASE, a, 0, 8 * P)
        with iotlb.transaction(0) as tx:            # A' -> A + B again
            tx.unmap(BASE, 8 * P)
            tx.map(BASE, a, 0, 4 * P)
            tx.map(BASE + 4 * P, a, 4 * P, 4 * P)
    assert list(trace) == [] and not tx.sent
    assert iotlb.space(0).units == units
    assert occupied(dev, scratch, BASE) and occupied(dev, scratch, BASE + 7 * P)


def test_a_changed_permission_sends_the_invalidate_and_update_of_that_range_only(net):
    dev, iotlb, a, _, scratch = net
    iotlb.map(0, BASE, a, 0, 4 * P)
    iotlb.map(0, BASE + 4 * P, a, 4 * P, 4 * P)
    with iotlb.record() as trace:
        with iotlb.transaction(0) as tx:
            tx.unmap(BASE + 4 * P, 4 * P)
            tx.map(BASE + 4 * P, a, 4 * P, 4 * P, Perm.RO)
    assert kinds(trace) == [(BEGIN, 0, 0, 0, True), (INVALIDATE, BASE + 4 * P, 4 * P, 0, True),
                            (UPDATE, BASE + 4 * P, 4 * P, 0, True), (END, 0, 0, 0, True)]
    assert trace.messages(UPDATE)[0].perm is Perm.RO
    assert occupied(dev, scratch, BASE) and occupied(dev, scratch, BASE + 4 * P)


def test_a_change_inside_one_kernel_entry_sends_that_entry_again_whole(net):
    dev, iotlb, a, _, scratch = net
    iotlb.map(0, BASE, a, 0, 8 * P)
    with iotlb.record() as trace:
        iotlb.unmap(0, BASE + 2 * P, P)
    # vhost-vdpa cannot cut an entry: it goes whole, both sides come back.
    assert kinds(trace) == [(BEGIN, 0, 0, 0, True), (INVALIDATE, BASE, 8 * P, 0, True),
                            (UPDATE, BASE, 2 * P, 0, True), (UPDATE, BASE + 3 * P, 5 * P, 0, True),
                            (END, 0, 0, 0, True)]
    assert not occupied(dev, scratch, BASE + 2 * P)
    assert occupied(dev, scratch, BASE + P) and occupied(dev, scratch, BASE + 3 * P)


def _bad_transactions(iotlb: DeviceIotlb, a: MemoryRegion, closed: MemoryRegion):
    top = iotlb.iova_range.last + 1
    return {
        "size=0x0 must be positive": lambda tx: tx.map(BASE + 64 * P, a, 0, 0),
        f"iova={BASE + 64 * P + 1:#x} is not a multiple of the page size": lambda tx: tx.map(BASE + 64 * P + 1, a, 0, P),
        "offset=2048 is not a page-aligned offset": lambda tx: tx.map(BASE + 64 * P, a, P // 2, P),
        "size=0x800 is not a multiple": lambda tx: tx.unmap(BASE, P // 2),
        "outside the device's IOVA range": lambda tx: tx.map(top - P, a, 0, 2 * P),
        "overlaps Mapping": lambda tx: tx.map(BASE + P, a, 0, P),
        "perm must be RO, WO or RW": lambda tx: tx.map(BASE + 64 * P, a, 0, P, Perm.NONE),
        "runs past the end of": lambda tx: tx.map(BASE + 64 * P, a, 60 * P, 8 * P),
        "is closed": lambda tx: tx.map(BASE + 64 * P, closed, 0, P),
        "nothing is mapped in": lambda tx: tx.unmap(BASE + 128 * P, P),
        f"overlaps Mapping([{BASE + 64 * P:#x}": lambda tx: (tx.map(BASE + 64 * P, a, 0, 2 * P),
                                                       tx.map(BASE + 65 * P, a, 8 * P, P)),
    }


def test_bad_transactions_are_refused_before_any_write_and_change_nothing(net):
    dev, iotlb, a, b, scratch = net
    iotlb.map(0, BASE, a, 0, 4 * P)
    before = iotlb.space(0)
    closed = MemoryRegion(P, "gone")
    closed.close()
    with iotlb.record() as trace:
        for problem, bad in _bad_transactions(iotlb, a, closed).items():
            with pytest.raises(InvalidArgument) as refused:
                with iotlb.transaction(0) as tx:
                    tx.map(BASE + 200 * P, b, 0, P)  # a good op first: dropped with the bad one
                    bad(tx)
            assert problem in str(refused.value)
            assert "nothing was sent" in str(refused.value)
        with pytest.raises(InvalidArgument, match=r"asid=2 is not below the device's 2 address spaces"):
            iotlb.transaction(2)
        with pytest.raises(RuntimeError, match="the caller's own"):
            with iotlb.transaction(0) as tx:
                tx.map(BASE + 200 * P, b, 0, P)
                raise RuntimeError("the caller's own")  # an exception in the block: nothing sent
    assert list(trace) == []
    assert iotlb.space(0) == before
    assert not occupied(dev, scratch, BASE + 200 * P)
    iotlb.map(0, BASE + 200 * P, b, 0, P)  # and the engine goes on
    assert occupied(dev, scratch, BASE + 200 * P) and occupied(dev, scratch, BASE)


def test_a_commit_the_kernel_refuses_half_way_is_rolled_back(net):
    dev, iotlb, a, b, scratch = net
    iotlb.map(0, BASE + 16 * P, a, 0, 4 * P)                       # A
    before = iotlb.space(0)
    # An entry the engine does not know of: the kernel will refuse an UPDATE over it.
    dev.write_iotlb(IotlbMessage(UPDATE, BASE + 32 * P, P, scratch.address, Perm.RO))
    with iotlb.record() as trace:
        with pytest.raises(VhostError) as refused:
            with iotlb.transaction(0) as tx:
                tx.unmap(BASE + 16 * P, 4 * P)                         # INVALIDATE A
                tx.map(BASE, b, 0, 4 * P)                              # UPDATE C: taken
                tx.map(BASE + 30 * P, b, 8 * P, 4 * P)                 # UPDATE D: over the foreign entry
    assert refused.value.errno == errno.EFAULT
    assert "rolled back" in "".join(getattr(refused.value, "__notes__", []))
    assert kinds(trace) == [
        (BEGIN, 0, 0, 0, True),
        (INVALIDATE, BASE + 16 * P, 4 * P, 0, True),
        (UPDATE, BASE, 4 * P, 0, True),
        (UPDATE, BASE + 30 * P, 4 * P, 0, False),
        (INVALIDATE, BASE, 4 * P, 0, True),                            # undo C
        (UPDATE, BASE + 16 * P, 4 * P, 0, True),                       # A again, as it was sent
        (END, 0, 0, 0, True),
    ]
    assert iotlb.space(0) == before
    assert occupied(dev, scratch, BASE + 16 * P) and not occupied(dev, scratch, BASE)
    dev.write_iotlb(IotlbMessage(INVALIDATE, BASE + 32 * P, P))     # the foreign entry goes
    with iotlb.transaction(0) as tx:                                  # the same change now goes through
        tx.unmap(BASE + 16 * P, 4 * P)
        tx.map(BASE, b, 0, 4 * P)
        tx.map(BASE + 30 * P, b, 8 * P, 4 * P)
    assert occupied(dev, scratch, BASE + 31 * P) and not occupied(dev, scratch, BASE + 16 * P)


def test_reset_with_persistence_sends_nothing_and_the_kernel_keeps_the_map(net):
    dev, iotlb, a, b, scratch = net
    iotlb.map(0, BASE, a, 0, 16 * P)
    iotlb.map(1, BASE, b, 0, 4 * P)
    before = [iotlb.space(0), iotlb.space(1)]
    with iotlb.record() as trace:
        iotlb.reset()
    assert list(trace) == []
    assert [iotlb.space(0), iotlb.space(1)] == before
    assert occupied(dev, scratch, BASE) and occupied(dev, scratch, BASE + 15 * P)
    assert occupied(dev, scratch, BASE, asid=1) and not occupied(dev, scratch, BASE + 4 * P, asid=1)


def test_vhost_vdpa_keeps_its_entries_across_a_reset_even_without_persistence(vdpa_net):
    """Why replay invalidates first: SET_STATUS(0) empties the device's map, not vhost-vdpa's."""
    with MemoryRegion(4 * P, "a") as a, MemoryRegion(P, "scratch") as scratch, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev, persist=False)
        iotlb.map(0, BASE, a, 0, 4 * P)
        dev.set_status(0)  # behind the engine: no replay
        assert occupied(dev, scratch, BASE)


def test_reset_without_persistence_replays_every_address_space(vdpa_net):
    with MemoryRegion(64 * P, "a") as a, MemoryRegion(P, "scratch") as scratch, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev, persist=False)
        assert BackendFeature.IOTLB_PERSIST not in iotlb.acked
        iotlb.map(0, BASE, a, 0, 4 * P)
        iotlb.map(0, BASE + 4 * P, a, 4 * P, 4 * P)     # two kernel entries, one map entry
        iotlb.map(0, BASE + 16 * P, a, 32 * P, 4 * P, Perm.RO)
        iotlb.map(1, BASE, a, 48 * P, 4 * P)
        maps = [iotlb.space(0).map, iotlb.space(1).map]
        with iotlb.record() as trace:
            iotlb.reset()
        assert kinds(trace) == [
            (BEGIN, 0, 0, 0, True), (INVALIDATE, BASE, 20 * P, 0, True),
            (UPDATE, BASE, 8 * P, 0, True), (UPDATE, BASE + 16 * P, 4 * P, 0, True), (END, 0, 0, 0, True),
            (BEGIN, 0, 0, 1, True), (INVALIDATE, BASE, 4 * P, 1, True),
            (UPDATE, BASE, 4 * P, 1, True), (END, 0, 0, 1, True),
        ]
        assert [iotlb.space(0).map, iotlb.space(1).map] == maps
        assert all(iotlb.space(asid).in_sync and not iotlb.space(asid).initial for asid in (0, 1))
        assert occupied(dev, scratch, BASE + 7 * P) and occupied(dev, scratch, BASE + 19 * P)
        assert not occupied(dev, scratch, BASE + 8 * P)


def test_replay_of_an_emptied_space_maps_and_unmaps_one_page(vdpa_net):
    """What the replay sends (test_traffic_net.py shows on the device that the space is empty)."""
    with MemoryRegion(4 * P, "a") as a, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev, persist=False)
        iotlb.map(1, BASE, a, 0, 4 * P)
        iotlb.unmap(1, BASE, 4 * P)
        with iotlb.record() as trace:
            iotlb.reset()
        # AS 0 never changed: the reset gave it its initial map back, nothing to send.
        # AS 1 was emptied: an empty batch would reach a set_map parent only; a page mapped
        # and unmapped again reaches every kind.
        first = iotlb.iova_range.first
        assert kinds(trace) == [(BEGIN, 0, 0, 1, True), (UPDATE, first, P, 1, True), (END, 0, 0, 1, True),
                                (BEGIN, 0, 0, 1, True), (INVALIDATE, first, P, 1, True), (END, 0, 0, 1, True)]
        assert trace.messages(UPDATE)[0].perm is Perm.RO
        assert iotlb.space(0).initial and not iotlb.space(1).initial and not iotlb.space(1).units


def test_cvq_group_in_address_space_1_with_its_own_map(vdpa_net):
    # Debug logging from the open on: the SET_GROUP_ASID ioctls are seen as events.
    with debug_logging(), MemoryRegion(8 * P, "a") as a, MemoryRegion(8 * P, "b") as b, \
            MemoryRegion(P, "scratch") as scratch, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev)
        cvq_group = dev.get_vring_group(CVQ)
        assert cvq_group == 1 and dev.get_vring_group(0) == dev.get_vring_group(1) == 0
        iotlb.set_group_asid(cvq_group, 1)
        with iotlb.record() as trace:
            iotlb.map(0, BASE, a, 0, 8 * P)
            iotlb.map(1, BASE, b, 0, 2 * P, Perm.RO)     # the same IOVA, other memory
        assert [w.message.asid for w in trace] == [0, 0, 0, 1, 1, 1]
        assert iotlb.space(0).lookup(BASE).region is a and iotlb.space(1).lookup(BASE).region is b
        assert occupied(dev, scratch, BASE + 7 * P, asid=0) and not occupied(dev, scratch, BASE + 7 * P, asid=1)
        assert iotlb.group_asids == {1: 1}
        with capture_logs() as events:
            iotlb.reset()  # vdpa_sim points every vq back at AS 0 on reset: the engine says it again
        assert [(e["group"], e["asid"]) for e in events if e.get("op") == "SET_GROUP_ASID"] == [(1, 1)]
        assert not [e for e in events if e["event"] == "iotlb.write"]
        with pytest.raises(InvalidArgument, match="group=2 is out of range"):
            iotlb.set_group_asid(2, 1)


def test_blk_has_one_address_space(vdpa_blk):
    with MemoryRegion(4 * P, "a") as a, VhostVdpa(vdpa_blk.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev)
        assert iotlb.as_num == 1
        with pytest.raises(InvalidArgument, match="asid=1 is not below the device's 1 address spaces"):
            iotlb.map(1, BASE, a, 0, P)
        assert iotlb.map(0, BASE, a, 0, 4 * P).update


def test_async_variants_commit_in_a_worker_thread(net):
    dev, iotlb, a, b, scratch = net

    async def main():
        async with iotlb.atransaction(0) as tx:
            tx.map(BASE, a, 0, 4 * P)
        await iotlb.amap(1, BASE, b, 0, P)
        await iotlb.aunmap(0, BASE, P)
        await iotlb.areset()
        return tx.sent

    sent = trio.run(main)
    assert [u.size for u in sent.update] == [4 * P]
    assert [(m.iova, m.size) for m in iotlb.space(0).entries] == [(BASE + P, 3 * P)]
    assert occupied(dev, scratch, BASE + P) and not occupied(dev, scratch, BASE)
    assert occupied(dev, scratch, BASE, asid=1)


def test_units_at_both_ends_of_the_iova_space_are_freed_in_one_commit(net):
    dev, iotlb, a, _, scratch = net
    first, last = iotlb.iova_range.first, iotlb.iova_range.last
    top = last + 1 - P
    iotlb.map(0, first, a, 0, P)
    iotlb.map(0, top, a, P, P)
    with iotlb.record() as trace:
        with iotlb.transaction(0) as tx:
            tx.unmap(first, P)
            tx.unmap(top, P)
    # From the first IOVA to the last is 2^64 bytes: one byte less still reaches the top entry.
    assert kinds(trace) == [(BEGIN, 0, 0, 0, True), (INVALIDATE, first, last - first, 0, True),
                            (END, 0, 0, 0, True)]
    assert not iotlb.space(0).units and iotlb.space(0).in_sync
    assert not occupied(dev, scratch, first) and not occupied(dev, scratch, top)


def test_a_recorder_that_raises_changes_nothing_that_is_sent_or_booked(net):
    dev, iotlb, a, _, scratch = net

    def broken(written):
        raise RuntimeError("a broken trace")

    iotlb.add_recorder(broken)
    with capture_logs() as events:
        iotlb.map(0, BASE, a, 0, 4 * P)
    assert iotlb.space(0).units == (Mapping(BASE, 4 * P, a, 0, Perm.RW),) and iotlb.space(0).in_sync
    assert occupied(dev, scratch, BASE)
    assert [e["event"] for e in events].count("iotlb.recorder_failed") == 3  # BEGIN, UPDATE, END
    iotlb.unmap(0, BASE, 4 * P)  # the engine and the kernel still agree
    assert not occupied(dev, scratch, BASE)


def test_opening_a_transaction_does_not_wait_for_a_commit_in_progress(net):
    """A trio task opening `atransaction` must not block while another thread commits (pins pages)."""
    import threading

    _, iotlb, a, _, _ = net
    iotlb.map(0, BASE, a, 0, P)
    committing = threading.Event()
    release = threading.Event()

    def slow(written):
        committing.set()
        release.wait(10)

    iotlb.add_recorder(slow)
    worker = threading.Thread(target=iotlb.map, args=(0, BASE + P, a, P, P))
    worker.start()
    try:
        assert committing.wait(10)
        opened = threading.Event()
        threading.Thread(target=lambda: (iotlb.transaction(0), opened.set())).start()
        assert opened.wait(2), "opening a transaction waited for the commit's lock"
    finally:
        release.set()
        worker.join(10)
        iotlb.remove_recorder(slow)
    assert [m.iova for m in iotlb.space(0).entries] == [BASE]  # contiguous: one entry


def test_a_backend_feature_bit_without_a_name_is_refused_too(vdpa_net):
    with VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        with pytest.raises(InvalidArgument, match=r"backend features bit9 \(0x200\) asked for"):
            DeviceIotlb(dev, backend_features=1 << 9)
        assert dev.acked_backend_features == BackendFeature(0)  # nothing was acked


def test_the_parent_kind_is_found_from_the_node(vdpa_net, parent):
    with VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev)
        assert iotlb.map_kind is parent
        assert iotlb.atomic_batches is (parent is MapKind.BATCHED)


def test_features_acked_before_the_engine_are_kept_and_the_engine_reads_what_is_acked_now(vdpa_net):
    with VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        dev.set_backend_features(BackendFeature.SUSPEND | BackendFeature.RESUME | BackendFeature.IOTLB_MSG_V2)
        iotlb = DeviceIotlb(dev, persist=False)
        assert BackendFeature.SUSPEND | BackendFeature.RESUME in dev.acked_backend_features
        assert not iotlb.persistent and iotlb.batching
        dev.set_backend_features(dev.acked_backend_features | BackendFeature.IOTLB_PERSIST)
        assert iotlb.persistent and iotlb.acked == dev.acked_backend_features


def test_a_refused_batch_end_keeps_the_refusal_that_caused_the_rollback(net):
    """The kernel refuses an UPDATE, the rollback goes in, and then BATCH_END is refused too."""
    dev, iotlb, a, b, scratch = net
    iotlb.map(0, BASE, a, 0, 4 * P)
    dev.write_iotlb(IotlbMessage(UPDATE, BASE + 32 * P, P, scratch.address, Perm.RO))  # behind the engine

    def drop_batch_ack(written):  # someone else re-acks the fd's features without BATCH mid-commit
        if not written.accepted:
            dev.set_backend_features(dev.acked_backend_features & ~BackendFeature.IOTLB_BATCH)

    iotlb.add_recorder(drop_batch_ack)
    with pytest.raises(VhostError) as refused:
        with iotlb.transaction(0) as tx:
            tx.unmap(BASE, 4 * P)
            tx.map(BASE + 32 * P, b, 0, P)
    iotlb.remove_recorder(drop_batch_ack)
    assert refused.value.errno == errno.EFAULT  # the cause, not the BATCH_END's refusal
    notes = " ".join(refused.value.__notes__)
    assert "rolled back" in notes and "BATCH_END of AS 0 was refused too" in notes
    assert iotlb.open_batch == 0 and iotlb.space(0).in_sync
    dev.write_iotlb(IotlbMessage(INVALIDATE, BASE + 32 * P, P))
    dev.set_backend_features(dev.acked_backend_features | BackendFeature.IOTLB_BATCH)
    with iotlb.record() as trace:
        iotlb.map(0, BASE + 32 * P, b, 0, P)
    # The batch the kernel is still in is ended before the next one begins.
    assert kinds(trace) == [(END, 0, 0, 0, True), (BEGIN, 0, 0, 0, True), (UPDATE, BASE + 32 * P, P, 0, True),
                            (END, 0, 0, 0, True)]
    assert iotlb.open_batch is None


def test_an_atransaction_cancelled_before_its_commit_ends_aborted(net):
    dev, iotlb, a, _, scratch = net
    seen = []

    async def main():
        with trio.CancelScope() as scope:
            async with iotlb.atransaction(0) as tx:
                tx.map(BASE, a, 0, P)
                seen.append(tx)
                scope.cancel()  # lands at the commit's first checkpoint, before its thread starts
        assert scope.cancelled_caught

    trio.run(main)
    assert seen[0].state == "aborted"
    assert not iotlb.space(0).entries and not occupied(dev, scratch, BASE)
    with pytest.raises(InvalidArgument, match="the transaction is aborted"):
        seen[0].commit()


def test_async_commits_on_one_device_run_in_the_order_they_were_called(net):
    dev, iotlb, a, _, _ = net
    called: list[int] = []
    first_update = threading.Event()

    def slow_first(written):  # the first commit holds the engine while the others queue up
        if written.message.type is UPDATE and not first_update.is_set():
            first_update.set()
            threading.Event().wait(0.3)

    iotlb.add_recorder(slow_first)

    async def commit(number: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        called.append(number)  # no checkpoint between this and the lane's queue
        await iotlb.amap(0, BASE + number * 2 * P, a, number * P, P)

    async def main():
        async with trio.open_nursery() as nursery:
            for number in range(8):
                await nursery.start(commit, number)

    with iotlb.record() as trace:
        trio.run(main)
    order = [(m.iova - BASE) // (2 * P) for m in trace.messages(UPDATE)]
    assert order == called == list(range(8))


def test_a_mapped_region_refuses_to_close_and_names_where_it_is_mapped(net):
    from vdpad.iotlb import RegionInUse

    dev, iotlb, _, _, _ = net
    region = MemoryRegion(4 * P, "guest")
    iotlb.map(1, BASE, region, 0, 4 * P)
    with pytest.raises(RegionInUse, match=rf"AS 1 \[{BASE:#x}, {BASE + 4 * P:#x}\) on {dev.path}"):
        region.close()
    assert not region.closed and region.view[0] == 0  # still whole
    iotlb.unmap(1, BASE, 4 * P)
    region.close()
    assert region.closed


def test_a_region_mapped_through_a_closed_fd_may_close(vdpa_net):
    region = MemoryRegion(4 * P, "guest")
    dev = VhostVdpa(vdpa_net.node)
    dev.set_owner()
    DeviceIotlb(dev).map(0, BASE, region, 0, 4 * P)
    dev.close()  # the kernel unmapped everything with the fd
    gc.collect()
    region.close()


def test_a_map_racing_a_close_waits_and_is_refused_instead_of_mapping_freed_memory(net):
    """close() holds every mapper's lock from its question to the end: a commit cannot slip in between."""
    dev, iotlb, _, _, scratch = net
    region = MemoryRegion(4 * P, "racing")
    iotlb.map(0, BASE, region, 0, P)
    iotlb.unmap(0, BASE, P)  # the engine is one of the region's mappers now, mapping nothing of it
    asked, go_on = threading.Event(), threading.Event()

    class SlowMapper:  # a second mapper that answers slowly: close() is between question and answer
        def mappings_of(self, _region):
            asked.set()
            go_on.wait(10)
            return []

        def holding(self):
            return threading.Lock()

    slow = SlowMapper()
    region.add_mapper(slow)
    closer = threading.Thread(target=region.close)
    closer.start()
    assert asked.wait(10)
    outcome: list[object] = []
    mapper = threading.Thread(target=lambda: outcome.append(_try(lambda: iotlb.map(0, BASE, region, 0, P))))
    mapper.start()
    mapper.join(0.5)
    assert mapper.is_alive(), "the map went ahead while close() was deciding"
    go_on.set()
    closer.join(10)
    mapper.join(10)
    assert region.closed
    assert isinstance(outcome[0], InvalidArgument) and "closed region" in str(outcome[0])
    assert not iotlb.space(0).entries and not occupied(dev, scratch, BASE)


def _try(call):
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - the test looks at what came back
        return error


# -- the write loop ---------------------------------------------------------------------------
def test_a_batch_written_by_the_c_loop_is_held_by_the_kernel(net):
    dev, iotlb, a, b, scratch = net
    batch = IotlbBatch(0, [], [(BASE, P, a.address, Perm.RO), (BASE + 2 * P, P, a.address + P, Perm.RW)],
                       begin=True, end=True)
    assert dev.write_iotlb_batch(batch) == 4
    assert occupied(dev, scratch, BASE) and occupied(dev, scratch, BASE + 2 * P)
    assert not occupied(dev, scratch, BASE + P)
    assert dev.write_iotlb_batch(IotlbBatch(0, [(BASE, 3 * P)], begin=True, end=True)) == 3
    assert not occupied(dev, scratch, BASE) and not occupied(dev, scratch, BASE + 2 * P)


def test_a_batch_refused_half_way_reports_what_the_kernel_took(net):
    dev, iotlb, a, b, scratch = net
    dev.write_iotlb(IotlbMessage(UPDATE, BASE + 4 * P, P, scratch.address, Perm.RO))  # in the way
    update = [(BASE + 2 * i * P, P, a.address + i * P, Perm.RW) for i in range(4)]   # the third meets it
    with pytest.raises(VhostError) as refused:
        dev.write_iotlb_batch(IotlbBatch(0, [], update, begin=True))
    assert refused.value.errno == errno.EFAULT and refused.value.accepted == 3  # BATCH_BEGIN and two UPDATEs
    assert f"iova={BASE + 4 * P:#x}" in str(refused.value)
    dev.write_iotlb(IotlbMessage(END))
    assert occupied(dev, scratch, BASE) and occupied(dev, scratch, BASE + 2 * P)
    assert not occupied(dev, scratch, BASE + 6 * P)
    dev.write_iotlb(IotlbMessage(INVALIDATE, BASE, 8 * P))


def test_recorders_and_debug_events_see_every_message_of_a_commit(vdpa_net):
    # The regions outlive the fd; the device is opened at debug level, so it logs every write.
    with debug_logging(), capture_logs() as events, MemoryRegion(64 * P, "a") as a, \
            MemoryRegion(P, "scratch") as scratch, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev)
        seen = []
        iotlb.add_recorder(seen.append)
        with iotlb.record() as trace:
            with iotlb.transaction(0) as tx:
                for i in range(32):
                    tx.map(BASE + 2 * i * P, a, i * P, P)
        iotlb.remove_recorder(seen.append)
        writes = [(e["type"], e["iova"]) for e in events if e["event"] == "iotlb.write"]
        wanted = [(BEGIN, 0, 0, 0, True)] + [(UPDATE, BASE + 2 * i * P, P, 0, True) for i in range(32)] + [
            (END, 0, 0, 0, True)]
        assert kinds(trace) == kinds(seen) == wanted
        assert writes == [(kind.name, iova) for kind, iova, *_ in wanted]
        assert all(occupied(dev, scratch, BASE + 2 * i * P) for i in range(32))
        assert not occupied(dev, scratch, BASE + P)
