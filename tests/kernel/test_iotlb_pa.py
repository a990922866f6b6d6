"""The IOTLB engine in vdpa_sim's PA mode (use_va=0): vhost-vdpa pins every mapped page.

The pins are the kernel's own count of what it holds: VmPin in
/proc/self/status is this process's pinned_vm, which vhost-vdpa raises by
each mapped page and lowers by each unmapped one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sim import memlock, sim_mode
from tests.kernel.test_iotlb_engine import BASE, kinds, occupied
from vdpad.device import MessageType, VhostError, VhostVdpa
from vdpad.iotlb import PAGE_SIZE, DeviceIotlb, MemoryRegion

pytestmark = pytest.mark.kernel

P = PAGE_SIZE
MIB = 1 << 20
UPDATE, INVALIDATE = MessageType.UPDATE, MessageType.INVALIDATE
BEGIN, END = MessageType.BATCH_BEGIN, MessageType.BATCH_END


def pinned() -> int:
    """Bytes this process has pinned (VmPin)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPin:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmPin in /proc/self/status")


@pytest.fixture(scope="module")
def pa_mode(sim_modules) -> Iterator[None]:
    with sim_mode(use_va=False):
        yield


@pytest.fixture
def pa_net(pa_mode, vdpa_net):
    def make(*, persist: bool = True):
        dev = VhostVdpa(vdpa_net.node)
        dev.set_owner()
        opened.append(dev)
        return dev, DeviceIotlb(dev, persist=persist)

    opened: list[VhostVdpa] = []
    with MemoryRegion(4 * MIB, "data", populate=True) as data, MemoryRegion(P, "scratch") as scratch:
        yield make, data, scratch
        for dev in opened:
            dev.close()


def test_pa_maps_pin_what_they_map_and_a_cut_entry_is_sent_again_whole(pa_net):
    make, data, scratch = pa_net
    base = pinned()
    dev, iotlb = make()
    iotlb.map(0, BASE, data, 0, 2 * MIB)
    iotlb.map(1, BASE, data, 2 * MIB, MIB)
    assert pinned() - base == 3 * MIB
    # One UPDATE became as many kernel entries as the pages had contiguous
    # chunks; cutting a page out must free the whole unit, then send both sides.
    with iotlb.record() as trace:
        iotlb.unmap(0, BASE + MIB, P)
    assert kinds(trace) == [(BEGIN, 0, 0, 0, True), (INVALIDATE, BASE, 2 * MIB, 0, True),
                            (UPDATE, BASE, MIB, 0, True), (UPDATE, BASE + MIB + P, MIB - P, 0, True),
                            (END, 0, 0, 0, True)]
    assert pinned() - base == 3 * MIB - P
    assert not occupied(dev, scratch, BASE + MIB) and occupied(dev, scratch, BASE + MIB + P)
    dev.close()
    assert pinned() == base  # closing the fd unpins everything


def test_pa_a_commit_over_the_memlock_limit_is_rolled_back_and_unpinned(pa_net):
    make, data, scratch = pa_net
    dev, iotlb = make()
    iotlb.map(0, BASE, data, 0, MIB)
    before, held = iotlb.space(0), pinned()
    with memlock(held + MIB), iotlb.record() as trace:
        with pytest.raises(VhostError):
            with iotlb.transaction(0) as tx:
                tx.unmap(BASE, MIB)
                tx.map(BASE + 16 * MIB, data, MIB, MIB)           # fits: pinned, then undone
                tx.map(BASE + 32 * MIB, data, 2 * MIB, 2 * MIB)   # over the limit: refused
    assert kinds(trace) == [
        (BEGIN, 0, 0, 0, True), (INVALIDATE, BASE, MIB, 0, True),
        (UPDATE, BASE + 16 * MIB, MIB, 0, True), (UPDATE, BASE + 32 * MIB, 2 * MIB, 0, False),
        (INVALIDATE, BASE + 16 * MIB, MIB, 0, True), (UPDATE, BASE, MIB, 0, True), (END, 0, 0, 0, True)]
    assert iotlb.space(0) == before and pinned() == held
    assert occupied(dev, scratch, BASE) and not occupied(dev, scratch, BASE + 16 * MIB)


@pytest.mark.parametrize("persist", [True, False])
def test_pa_reset_keeps_or_replays_the_pins(pa_net, persist):
    make, data, scratch = pa_net
    base = pinned()
    dev, iotlb = make(persist=persist)
    assert iotlb.persistent is persist
    iotlb.map(0, BASE, data, 0, 3 * MIB)
    iotlb.map(1, BASE, data, 3 * MIB, MIB)
    maps = [iotlb.space(0).map, iotlb.space(1).map]
    with iotlb.record() as trace:
        iotlb.reset()
    if persist:
        assert list(trace) == []
    else:  # every page unpinned and pinned again
        assert kinds(trace) == [
            (BEGIN, 0, 0, 0, True), (INVALIDATE, BASE, 3 * MIB, 0, True), (UPDATE, BASE, 3 * MIB, 0, True),
            (END, 0, 0, 0, True),
            (BEGIN, 0, 0, 1, True), (INVALIDATE, BASE, MIB, 1, True), (UPDATE, BASE, MIB, 1, True),
            (END, 0, 0, 1, True)]
    assert [iotlb.space(0).map, iotlb.space(1).map] == maps
    assert pinned() - base == 4 * MIB
    assert occupied(dev, scratch, BASE + 3 * MIB - P) and occupied(dev, scratch, BASE + MIB - P, asid=1)


def test_pa_a_refused_replay_is_finished_by_an_empty_transaction(pa_net):
    make, data, scratch = pa_net
    base = pinned()
    dev, iotlb = make(persist=False)
    iotlb.map(0, BASE, data, 0, 2 * MIB)
    with memlock(base + MIB):  # the replay unpins 2 MiB, then may pin only 1 MiB again
        with pytest.raises(VhostError) as refused:
            iotlb.reset()
    assert "only partly replayed" in "".join(refused.value.__notes__)
    view = iotlb.space(0)
    assert not view.in_sync and view.units == () and pinned() == base
    assert [(m.iova, m.size) for m in view.entries] == [(BASE, 2 * MIB)]  # still what the user asked for
    with iotlb.record() as trace, iotlb.transaction(0):
        pass
    assert [(m.type, m.size) for m in trace.messages()] == [(BEGIN, 0), (UPDATE, 2 * MIB), (END, 0)]
    assert iotlb.space(0).in_sync and pinned() - base == 2 * MIB


def test_pa_an_emptying_the_kernel_refuses_is_finished_by_an_empty_transaction(pa_net):
    """The one page that takes the initial map away cannot be pinned: the space says so, a commit retries."""
    make, data, scratch = pa_net
    base = pinned()
    dev, iotlb = make(persist=False)
    iotlb.map(0, BASE, data, 0, MIB)
    iotlb.unmap(0, BASE, MIB)  # emptied by the user
    with memlock(base), pytest.raises(VhostError) as refused:  # not one more page may be pinned
        iotlb.reset()
    assert "only partly replayed" in "".join(refused.value.__notes__)
    view = iotlb.space(0)
    assert view.needs_emptying and not view.in_sync and not view.units and pinned() == base
    with iotlb.record() as trace, iotlb.transaction(0):
        pass
    assert [(m.type, m.size) for m in trace.messages()] == [(BEGIN, 0), (UPDATE, P), (END, 0),
                                                            (BEGIN, 0), (INVALIDATE, P), (END, 0)]
    view = iotlb.space(0)
    assert not view.needs_emptying and view.in_sync and pinned() == base
