"""Frames through vdpasim_net's loopback prove the IOTLB maps: across resets, kept or replayed, cvq in AS 1.

Every test runs in vdpa_sim's VA mode (the device reads our memory through
our page tables) and in PA mode (vhost-vdpa pins the pages, the device reads
them by physical address).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from tests.sim import debug_logging, frames, sim_mode
from vdpad.device import BackendFeature, InvalidArgument, VhostVdpa
from vdpad.iotlb import PAGE_SIZE, DeviceIotlb, MemoryRegion
from vdpad.virtio import DmaArena, DriverError, NetDriver
from vdpad.virtio.net import RX, TX

pytestmark = pytest.mark.kernel

# Far from any address of this process: a device that fell back to its 1:1
# passthrough map (VA mode) finds nothing there instead of some of our memory.
DATA_IOVA = 0x1000_0000_0000
REGION_SIZE = 1 << 20
FRAMES = 32
CVQ = 2


@pytest.fixture(scope="module", params=["va", "pa"])
def mode(request, sim_modules) -> Iterator[str]:
    with sim_mode(use_va=request.param == "va"):
        yield request.param


@dataclass
class NetRig:
    dev: VhostVdpa
    iotlb: DeviceIotlb
    data: MemoryRegion
    ctrl: MemoryRegion | None
    net: NetDriver


@pytest.fixture
def open_net(mode, vdpa_net):
    """open_net(persist=..., cvq=False) -> NetRig: owned fd, engine, data region mapped in AS 0.

    With cvq=True the driver also gets a control queue in a region of its own
    (`ctrl`, mapped by the test), placed at the same IOVA as the data.
    """
    with debug_logging(), ExitStack() as stack:

        def make(*, persist: bool, cvq: bool = False, extra: BackendFeature = BackendFeature(0)) -> NetRig:
            dev = stack.enter_context(VhostVdpa(vdpa_net.node))
            dev.set_owner()
            iotlb = DeviceIotlb(dev, persist=persist, backend_features=extra)
            data = stack.enter_context(MemoryRegion(REGION_SIZE, "net-data"))
            ctrl = stack.enter_context(MemoryRegion(16 * PAGE_SIZE, "net-ctrl")) if cvq else None
            iotlb.map(0, DATA_IOVA, data, 0, data.size)
            data_arena = stack.enter_context(DmaArena(data, DATA_IOVA))
            ctrl_arena = stack.enter_context(DmaArena(ctrl, DATA_IOVA)) if ctrl else None
            net = stack.enter_context(NetDriver(dev, data_arena, ctrl=ctrl_arena))
            return NetRig(dev, iotlb, data, ctrl, net)

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
    assert min(e["iova"] for e in updates) == DATA_IOVA
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
    rig.iotlb.map(1, DATA_IOVA, rig.ctrl, 0, rig.ctrl.size)
    assert rig.iotlb.space(0).lookup(DATA_IOVA).region is rig.data
    assert rig.iotlb.space(1).lookup(DATA_IOVA).region is rig.ctrl
    rig.net.start()

    for turn, mac in enumerate((bytes.fromhex("02766470610a"), bytes.fromhex("02766470610b"))):
        if turn:
            rig.iotlb.reset()  # maps kept; the engine points the cvq's group at AS 1 again
            rig.net.start()
        assert rig.net.command(1, 1, mac) == 0  # VIRTIO_NET_CTRL_MAC / MAC_ADDR_SET -> VIRTIO_NET_OK
        assert rig.net.config_mac() == mac
        unicast = frames(8, dst=mac, seed=10 + turn)  # the receive filter now passes this MAC
        assert rig.net.exchange(unicast) == unicast


def test_refused_transaction_keeps_traffic_on_the_old_map(open_net):
    rig = open_net(persist=True)
    rig.net.start()
    sent = frames(8, seed=20)
    assert rig.net.exchange(sent) == sent
    old = rig.iotlb.space(0).entries
    with MemoryRegion(REGION_SIZE, "other") as other, rig.iotlb.record() as trace:
        with pytest.raises(InvalidArgument, match="overlap"):
            with rig.iotlb.transaction(0) as tx:
                tx.unmap(DATA_IOVA, REGION_SIZE)
                tx.map(DATA_IOVA, other, 0, REGION_SIZE)  # would move the live rings under the device
                tx.map(DATA_IOVA + REGION_SIZE - PAGE_SIZE, other, 0, 2 * PAGE_SIZE)
    assert len(trace) == 0
    assert rig.iotlb.space(0).entries == old
    after = frames(FRAMES, seed=21)
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
