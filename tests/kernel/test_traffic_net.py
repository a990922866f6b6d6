"""Frames through vdpasim_net's loopback prove the IOTLB maps: across resets, kept or replayed, cvq in AS 1.

Every test runs in vdpa_sim's VA mode (the device reads our memory through
our page tables) and in PA mode (vhost-vdpa pins the pages, the device reads
them by physical address), as a set_map parent (the device takes a batch as
one new map), and in VA mode as a dma_map parent too (batch_mapping=0: each
message reaches the device as it is written).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import errno

import pytest
from structlog.testing import capture_logs

from tests.sim import debug_logging, frames, iova_far_from_us, sim_mode
from vdpad.device import BackendFeature, InvalidArgument, IotlbMessage, MessageType, VhostError, VhostVdpa
from vdpad.iotlb import PAGE_SIZE, DeviceIotlb, MemoryRegion, Perm
from vdpad.virtio import DmaArena, DriverError, NetDriver
from vdpad.virtio.net import RX, TX

pytestmark = pytest.mark.kernel

REGION_SIZE = 1 << 20
FRAMES = 32
CVQ = 2


@pytest.fixture(scope="module", params=["va", "pa", "va-dma_map"])
def mode(request, sim_modules) -> Iterator[str]:
    with sim_mode(use_va=request.param.startswith("va"), batch_mapping=not request.param.endswith("dma_map")):
        yield request.param


@dataclass
class NetRig:
    dev: VhostVdpa
    iotlb: DeviceIotlb
    data: MemoryRegion
    ctrl: MemoryRegion | None
    net: NetDriver
    data_iova: int


@pytest.fixture
def open_net(mode, vdpa_net):
    """open_net(persist=..., cvq=False) -> NetRig: owned fd, engine, data region mapped in AS 0.

    With cvq=True the driver also gets a control queue in a region of its own
    (`ctrl`, mapped by the test), placed at the same IOVA as the data.
    """
    with debug_logging(), ExitStack() as stack:

        def make(*, persist: bool, cvq: bool = False, extra: BackendFeature = BackendFeature(0)) -> NetRig:
            # The regions outlive the fd: a region the device still maps refuses to close.
            data = stack.enter_context(MemoryRegion(REGION_SIZE, "net-data"))
            ctrl = stack.enter_context(MemoryRegion(16 * PAGE_SIZE, "net-ctrl")) if cvq else None
            dev = stack.enter_context(VhostVdpa(vdpa_net.node))
            dev.set_owner()
            iotlb = DeviceIotlb(dev, persist=persist, backend_features=extra)
            # Far from our own addresses: a device that fell back to its 1:1 map (VA mode) finds nothing there.
            data_iova = iova_far_from_us(iotlb.iova_range, REGION_SIZE)
            iotlb.map(0, data_iova, data, 0, data.size)
            data_arena = stack.enter_context(DmaArena(data, data_iova))
            ctrl_arena = stack.enter_context(DmaArena(ctrl, data_iova)) if ctrl else None
            net = stack.enter_context(NetDriver(dev, data_arena, ctrl=ctrl_arena))
            return NetRig(dev, iotlb, data, ctrl, net, data_iova)

        yield make


def iotlb_writes(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "iotlb.write"]


def test_traffic_across_reset_with_persistence_sends_no_update(open_net):
    rig = open_net(persist=True)
    assert rig.iotlb.persistent
    rig.net.start()
    before = frames(FRAMES, seed=1)
    assert rig.net.exchange(before) == before

    with capture_logs() as events, rig.iotlb.record() as trace:
        rig.iotlb.reset()
        rig.net.start()
        after = frames(FRAMES, seed=2)
        received = rig.net.exchange(after)

    assert received == after
    # The capture saw the restart's ioctls, and not one IOTLB message among them.
    assert any(e["event"] == "ioctl" and e.get("op") == "SET_STATUS" for e in events)
    assert iotlb_writes(events) == [] and len(trace) == 0


def test_traffic_across_reset_by_replay(open_net):
    rig = open_net(persist=False)
    assert not rig.iotlb.persistent
    rig.net.start()
    before = frames(FRAMES, seed=3)
    assert rig.net.exchange(before) == before

    with capture_logs() as events:
        rig.iotlb.reset()
        rig.net.start()
        after = frames(FRAMES, seed=4)
        received = rig.net.exchange(after)

    assert received == after
    updates = [e for e in iotlb_writes(events) if e["type"] == "UPDATE"]
    # The replay mapped the whole region again, at the same IOVA, from the same memory.
    assert updates and sum(e["size"] for e in updates) == REGION_SIZE
    assert min(e["iova"] for e in updates) == rig.data_iova
    if rig.iotlb.batching:
        kinds = [e["type"] for e in iotlb_writes(events)]
        assert kinds[0] == "BATCH_BEGIN" and kinds[-1] == "BATCH_END"


@pytest.mark.parametrize("mode", ["va"], indirect=True)
def test_a_reset_that_drops_the_maps_stops_traffic(open_net):
    """The control for the two tests above: without persistence or replay nothing comes back.

    VA mode only: in PA mode the device's fallback 1:1 map would point the
    rings at physical memory the guest kernel owns.
    """
    rig = open_net(persist=False)
    rig.net.start()
    sent = frames(4, seed=5)
    assert rig.net.exchange(sent) == sent
    rig.dev.set_status(0)  # behind the engine's back: the device is back to passthrough
    rig.net.start()
    with pytest.raises(DriverError, match="used after"):
        rig.net.exchange(frames(4, seed=6), timeout=1.0)


def test_cvq_in_address_space_1(open_net):
    """The cvq's ring and buffers exist only in AS 1, at the very IOVA where AS 0 holds the data rings."""
    rig = open_net(persist=True, cvq=True)
    cvq_group = rig.dev.get_vring_group(CVQ)
    assert cvq_group != rig.dev.get_vring_group(0)
    rig.iotlb.set_group_asid(cvq_group, 1)
    rig.iotlb.map(1, rig.data_iova, rig.ctrl, 0, rig.ctrl.size)
    assert rig.iotlb.space(0).lookup(rig.data_iova).region is rig.data
    assert rig.iotlb.space(1).lookup(rig.data_iova).region is rig.ctrl
    rig.net.start()

    for turn, mac in enumerate((bytes.fromhex("02766470610a"), bytes.fromhex("02766470610b"))):
        if turn:
            rig.iotlb.reset()  # maps kept; the engine points the cvq's group at AS 1 again
            rig.net.start()
        assert rig.net.command(1, 1, mac) == 0  # VIRTIO_NET_CTRL_MAC / MAC_ADDR_SET -> VIRTIO_NET_OK
        assert rig.net.config_mac() == mac
        unicast = frames(8, dst=mac, seed=10 + turn)  # the receive filter now passes this MAC
        assert rig.net.exchange(unicast) == unicast


def test_a_transaction_the_kernel_refuses_half_way_keeps_traffic_on_the_old_map(open_net):
    """The live rings are moved to other memory, then the kernel refuses: the rollback puts them back."""
    rig = open_net(persist=True, extra=BackendFeature.SUSPEND | BackendFeature.RESUME)
    rig.net.start()
    sent = frames(8, seed=20)
    assert rig.net.exchange(sent) == sent
    old = rig.iotlb.space(0)
    foreign = rig.data_iova + 2 * REGION_SIZE
    with MemoryRegion(REGION_SIZE, "other") as other, MemoryRegion(PAGE_SIZE, "foreign") as page:
        # An entry the engine does not know of: the kernel refuses the commit's last UPDATE over it.
        rig.dev.write_iotlb(IotlbMessage(MessageType.UPDATE, foreign, PAGE_SIZE, page.address, Perm.RO))
        with rig.iotlb.record() as trace, pytest.raises(VhostError) as refused:
            with rig.iotlb.transaction(0) as tx:
                tx.unmap(rig.data_iova, REGION_SIZE)
                tx.map(rig.data_iova, other, 0, REGION_SIZE)  # the rings would read zeroed memory
                tx.map(foreign, other, 0, PAGE_SIZE)
        assert refused.value.errno == errno.EFAULT
        accepted = [w.message.type for w in trace if w.accepted]
        assert MessageType.INVALIDATE in accepted and MessageType.UPDATE in accepted  # half-way, for real
        assert rig.iotlb.space(0) == old and rig.iotlb.space(0).in_sync
        rig.dev.write_iotlb(IotlbMessage(MessageType.INVALIDATE, foreign, PAGE_SIZE))
    after = frames(FRAMES, seed=21)
    assert rig.net.exchange(after) == after


@pytest.mark.parametrize("mode", ["va", "va-dma_map"], indirect=True)
def test_an_emptied_space_translates_nothing_after_a_replay(open_net):
    """Probed on the device: rings placed at their own userspace addresses work through a 1:1
    passthrough map and through nothing else (VA mode: in PA mode a 1:1 map would point the
    rings at physical memory the guest kernel owns)."""
    rig = open_net(persist=False)
    rig.iotlb.unmap(0, rig.data_iova, REGION_SIZE)  # the user's map of AS 0 is empty now
    rig.iotlb.reset()  # the device's initial 1:1 map came back; the replay must take it away
    assert not rig.iotlb.space(0).initial and not rig.iotlb.space(0).entries
    with DmaArena(rig.data, rig.data.address) as identity, NetDriver(rig.dev, identity) as probe:
        probe.start()
        with pytest.raises(DriverError, match="used after"):
            probe.exchange(frames(4, seed=40), timeout=1.0)


@pytest.mark.parametrize("mode", ["va", "va-dma_map"], indirect=True)
def test_the_probe_moves_frames_through_the_initial_passthrough_map(mode, vdpa_net):
    """The control for the test above: on a device nothing was mapped on, the same probe works."""
    with MemoryRegion(REGION_SIZE, "probe") as data, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        with DmaArena(data, data.address) as identity, NetDriver(dev, identity) as probe:
            probe.start()
            sent = frames(4, seed=41)
            assert probe.exchange(sent) == sent


def _recut_the_live_entry(rig: NetRig):
    """Unmap the data region's last page (unused): the one kernel entry goes whole and the rest,
    rings included, is sent again."""
    return rig.iotlb.transaction(0).unmap(rig.data_iova + REGION_SIZE - PAGE_SIZE, PAGE_SIZE)


def test_a_commit_that_recuts_a_live_entry_suspends_a_device_that_applies_messages_at_once(mode, open_net):
    rig = open_net(persist=True, extra=BackendFeature.SUSPEND | BackendFeature.RESUME)
    rig.net.start()
    sent = frames(8, seed=50)
    assert rig.net.exchange(sent) == sent
    with capture_logs() as events:
        plan = _recut_the_live_entry(rig).commit()
    assert plan.invalidate == ((rig.data_iova, REGION_SIZE),)
    calls = [e.get("op") or e.get("type") for e in events if e["event"] in ("ioctl", "iotlb.write")]
    if rig.iotlb.atomic_batches:  # set_map: the device switches maps at BATCH_END, never sees the gap
        assert calls == ["BATCH_BEGIN", "INVALIDATE", "UPDATE", "BATCH_END"]
    else:
        assert calls == ["GET_STATUS", "SUSPEND", "GET_STATUS", "BATCH_BEGIN", "INVALIDATE", "UPDATE", "BATCH_END",
                         "RESUME"]
    assert not rig.dev.suspended
    after = frames(FRAMES, seed=51)
    assert rig.net.exchange(after) == after


@pytest.mark.parametrize("mode", ["va-dma_map"], indirect=True)
def test_without_suspend_a_commit_with_a_window_is_refused_unless_allowed(open_net):
    rig = open_net(persist=True)
    rig.net.start()
    before = rig.iotlb.space(0)
    with rig.iotlb.record() as trace, pytest.raises(InvalidArgument) as refused:
        _recut_the_live_entry(rig).commit()
    window = f"[{rig.data_iova:#x}, {rig.data_iova + REGION_SIZE - PAGE_SIZE:#x})"
    assert f"{window} of AS 0 stay mapped but would be unmapped for an instant" in str(refused.value)
    assert "dma_map" in str(refused.value) and "nothing was sent" in str(refused.value)
    assert len(trace) == 0 and rig.iotlb.space(0) == before
    # Allowed by the caller (who knows the device does not use those bytes now), it goes through.
    sent = frames(4, seed=52)
    assert rig.net.exchange(sent) == sent
    with rig.iotlb.transaction(0, allow_window=True) as tx:
        tx.unmap(rig.data_iova + REGION_SIZE - PAGE_SIZE, PAGE_SIZE)
    assert tx.sent.invalidate
    after = frames(4, seed=53)
    assert rig.net.exchange(after) == after


def test_suspend_holds_frames_and_keeps_ring_state_resume_delivers(open_net):
    """What a live migration reads: the bases GET_VRING_BASE reports while the device is suspended."""
    rig = open_net(persist=True, extra=BackendFeature.SUSPEND | BackendFeature.RESUME)
    rig.net.start()
    first = frames(8, seed=30)
    assert rig.net.exchange(first) == first

    rig.dev.suspend()
    tx_ring = rig.net.queues[TX].ring
    # Everything the driver made available so far was consumed: 8 TX chains, 8 RX buffers filled.
    assert rig.dev.get_vring_base(TX) == tx_ring.avail_idx == len(first)
    assert rig.dev.get_vring_base(RX) == len(first)
    held = frames(8, seed=31)
    rig.net.send(held)
    with pytest.raises(DriverError, match="used after"):
        rig.net.receive(1, timeout=0.5)  # suspended: the kick waits
    assert rig.dev.get_vring_base(TX) == len(first)  # nothing new consumed

    rig.dev.resume()
    assert rig.net.receive(len(held)) == held
