"""PA mode only: a transaction the kernel refuses (pinning over RLIMIT_MEMLOCK) is rolled back, traffic goes on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sim import frames, iova_far_from_us, memlock, sim_mode
from vdpad.device import MessageType, VhostError, VhostVdpa
from vdpad.iotlb import DeviceIotlb, MemoryRegion
from vdpad.virtio import DmaArena, NetDriver

pytestmark = pytest.mark.kernel

MIB = 1 << 20


@pytest.fixture(scope="module")
def pa_mode(sim_modules) -> Iterator[None]:
    with sim_mode(use_va=False):
        yield


def test_kernel_refused_commit_rolls_back_and_traffic_continues(pa_mode, vdpa_net):
    with MemoryRegion(MIB, "data") as data, MemoryRegion(MIB, "other") as other, \
            MemoryRegion(8 * MIB, "big") as big, VhostVdpa(vdpa_net.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev, persist=True)
        iova = iova_far_from_us(iotlb.iova_range, 24 * MIB)
        iotlb.map(0, iova, data, 0, data.size)
        with DmaArena(data, iova) as arena, NetDriver(dev, arena) as net:
            net.start()
            sent = frames(16, seed=1)
            assert net.exchange(sent) == sent
            old = iotlb.space(0).entries

            # 2 MiB of pins allowed: the 1 MiB in use fits, the transaction's 9 MiB does not.
            with memlock(2 * MIB), iotlb.record() as trace:
                with pytest.raises(VhostError) as refused:
                    with iotlb.transaction(0) as tx:
                        tx.unmap(iova, data.size)
                        tx.map(iova, other, 0, other.size)  # the live rings would move to other memory
                        tx.map(iova + 16 * MIB, big, 0, big.size)
            assert any(not w.accepted and w.message.type is MessageType.UPDATE for w in trace), refused.value
            assert iotlb.space(0).entries == old and iotlb.space(0).in_sync

            after = frames(32, seed=2)
            assert net.exchange(after) == after
