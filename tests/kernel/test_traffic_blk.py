"""Sectors written to vdpasim_blk before a reset read back identical after it (VA and PA mode, set_map and
dma_map parent)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from tests.sim import debug_logging, iova_far_from_us, sim_mode
from vdpad.device import VhostVdpa
from vdpad.iotlb import DeviceIotlb, MemoryRegion
from vdpad.virtio import BlkDriver, DmaArena
from vdpad.virtio.blk import SECTOR

pytestmark = pytest.mark.kernel

REGION_SIZE = 1 << 20


@pytest.fixture(scope="module", params=["va", "pa", "va-dma_map"])
def mode(request, sim_modules) -> Iterator[str]:
    with sim_mode(use_va=request.param.startswith("va"), batch_mapping=not request.param.endswith("dma_map")):
        yield request.param


@pytest.mark.parametrize("persist", [True, False], ids=["persist", "replay"])
def test_sectors_survive_a_reset(mode, vdpa_blk, persist):
    # Writes bigger than one request and at scattered sectors, so segmenting and offsets are exercised.
    writes = {0: os.urandom(3 * SECTOR), 77: os.urandom(200 * SECTOR), 100_000: os.urandom(8 * SECTOR)}
    with debug_logging(), MemoryRegion(REGION_SIZE, "blk") as region, VhostVdpa(vdpa_blk.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev, persist=persist)
        assert iotlb.persistent == persist
        iova = iova_far_from_us(iotlb.iova_range, REGION_SIZE)
        iotlb.map(0, iova, region, 0, region.size)
        with DmaArena(region, iova) as arena, BlkDriver(dev, arena) as blk:
            blk.start()
            assert blk.capacity > max(sector + len(data) // SECTOR for sector, data in writes.items())
            for sector, data in writes.items():
                blk.write(sector, data)

            with capture_logs() as events:
                iotlb.reset()
                blk.start()
                read = {sector: blk.read(sector, len(data) // SECTOR) for sector, data in writes.items()}

        assert read == writes
        updates = [e for e in events if e["event"] == "iotlb.write" and e["type"] == "UPDATE"]
        if persist:
            assert updates == []
        else:
            assert sum(e["size"] for e in updates) == REGION_SIZE


def test_requests_fit_a_small_ring(vdpa_blk):
    """With 16 descriptors a request carries at most 14 data segments: 64 KiB moves in several."""
    data = os.urandom(128 * SECTOR)
    with MemoryRegion(REGION_SIZE, "blk") as region, VhostVdpa(vdpa_blk.node) as dev:
        dev.set_owner()
        iotlb = DeviceIotlb(dev)
        iova = iova_far_from_us(iotlb.iova_range, REGION_SIZE)
        iotlb.map(0, iova, region, 0, region.size)
        with DmaArena(region, iova) as arena, BlkDriver(dev, arena, queue_size=16) as blk:
            blk.start()
            assert blk.request_bytes < len(data)
            blk.write(10, data)
            assert blk.read(10, 128) == data
