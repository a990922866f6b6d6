"""A real third-party vDPA device: VDUSE virtio-blk served by qemu-storage-daemon from a plain file.

vdpad attaches it, probes it (a parent without vq groups, SUSPEND or
IOTLB_PERSIST), maps memfd memory through the IOTLB engine and moves sectors
with the blk driver: what the driver writes is found in qsd's backing file at
the sector's offset, what is written into the file is read back through the
device, and a reset (maps replayed: VDUSE cannot keep them) loses nothing.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import ExitStack
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.cli import vdpad
from tests.sim import debug_logging, iova_far_from_us
from tests.vduse import MGMTDEV, vduse_export
from vdpad.device import (
    BackendFeature, BlkFeature, MessageType, NotSupportedError, VhostVdpa, VirtioFeature, flags,
)
from vdpad.iotlb import DeviceIotlb, MemoryRegion
from vdpad.mgmt import VdpaNetlink
from vdpad.virtio import BlkDriver, DmaArena
from vdpad.virtio.blk import SECTOR

pytestmark = pytest.mark.kernel

REGION_SIZE = 1 << 20
DISK_SECTORS = (16 << 20) // SECTOR  # the fixture's 16 MiB file
# What Debian bookworm's qemu-storage-daemon (7.2) offers for a writable raw file (0x331006644).
QSD_FEATURES = ["SEG_MAX", "BLK_SIZE", "FLUSH", "TOPOLOGY", "DISCARD", "WRITE_ZEROES", "NOTIFY_ON_EMPTY",
                "INDIRECT_DESC", "EVENT_IDX", "VERSION_1", "ACCESS_PLATFORM"]


def file_sectors(image: Path, sector: int, count: int) -> bytes:
    with open(image, "rb") as disk:
        return os.pread(disk.fileno(), count * SECTOR, sector * SECTOR)


class Rig:
    """The device opened and owned, memory mapped by the engine, the blk driver started; closed as a whole."""

    def __init__(self, node: Path):
        with ExitStack() as stack:  # a failure half way closes what was made
            # The region outlives the fd: closing the fd is what unmaps it.
            self.region = stack.enter_context(MemoryRegion(REGION_SIZE, "vduse-blk"))
            self.dev = stack.enter_context(VhostVdpa(node))
            self.dev.set_owner()
            self.iotlb = DeviceIotlb(self.dev)
            self.iova = iova_far_from_us(self.iotlb.iova_range, REGION_SIZE)
            self.iotlb.map(0, self.iova, self.region, 0, REGION_SIZE)
            self.arena = stack.enter_context(DmaArena(self.region, self.iova))
            self.blk = stack.enter_context(BlkDriver(self.dev, self.arena))
            self.blk.start()
            self._made = stack.pop_all()

    def close(self) -> None:
        self._made.close()


@pytest.fixture
def rig(vduse_device):
    made = Rig(vduse_device.node)
    yield made
    made.close()


def test_attach_and_info_through_the_cli(vduse_modules):
    name = f"vdcli{os.getpid() % 1000}"
    with vduse_export(name):
        code, out, err = vdpad("attach", name, "--mgmtdev", MGMTDEV)
        assert (code, err) == (0, "")
        node = Path(out.strip())
        assert node.parent == Path("/dev") and node.name.startswith("vhost-vdpa-")
        assert stat.S_ISCHR(node.stat().st_mode)

        code, out, err = vdpad("info", str(node), "--json")
        assert (code, err) == (0, "")
        info = json.loads(out)
        assert (info["device"], info["source"], info["class"], info["vqs"]) == (name, "fd", "block", 1)
        # What VDUSE on 6.12 lacks shows as null, the rest is there.
        assert info["vq_groups"] is None
        assert (info["groups"], info["address_spaces"]) == (1, 1)
        assert info["vring_sizes"] == [info["vring_num_max"]]
        assert "IOTLB_PERSIST" not in info["backend_feature_names"]
        assert {"VERSION_1", "ACCESS_PLATFORM"} <= set(info["feature_names"])

        code, out, err = vdpad("info", str(node))
        assert (code, err) == (0, "")
        lines = dict(line.split(None, 1) for line in out.splitlines())
        assert lines["vq_groups"] == "-" and lines["class"] == "block" and lines["device"] == name

        assert vdpad("detach", name) == (0, "", "")


def test_what_vduse_offers(vduse_device):
    """The shape kernel-notes.md records: no optional vhost-vdpa operation beyond the IOTLB."""
    with VdpaNetlink() as nl:
        assert nl.mgmtdev(MGMTDEV).classes == (1, 2)  # net and block
    with VhostVdpa(vduse_device.node) as dev:
        dev.set_owner()
        backend = dev.get_backend_features()
        assert backend == BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH | BackendFeature.IOTLB_ASID
        iova = dev.get_iova_range()
        assert (iova.first, iova.last) == (0, (1 << 64) - 1)  # no bounce area held back from vhost-vdpa
        assert flags.describe(dev.get_features(), VirtioFeature, BlkFeature) == QSD_FEATURES
        assert (dev.get_vqs_count(), dev.get_group_num(), dev.get_as_num(), dev.get_config_size()) == (1, 1, 1, 60)
        with pytest.raises(NotSupportedError, match="not supported by this device"):
            dev.get_vring_group(0)
        assert dev.get_vring_size(0) == dev.get_vring_num() == 256
        dev.suspend()  # before DRIVER_OK vhost-vdpa answers 0 without asking the parent


def test_a_running_vduse_device_cannot_suspend(rig):
    with pytest.raises(NotSupportedError, match="SUSPEND on .*: not supported by this device"):
        rig.dev.suspend()


def test_driver_takes_the_per_queue_ring_limit(vduse_device):
    with debug_logging(), capture_logs() as events:
        rig = Rig(vduse_device.node)
        rig.close()
    assert [(e["queue"], e["path"]) for e in events if e["event"] == "virtio.ring_limit"] == [(0, "GET_VRING_SIZE")]


def test_sectors_written_land_in_the_backing_file(rig, vduse_device):
    assert rig.blk.capacity == DISK_SECTORS
    writes = {0: os.urandom(3 * SECTOR), 77: os.urandom(200 * SECTOR), DISK_SECTORS - 8: os.urandom(8 * SECTOR)}
    for sector, data in writes.items():
        rig.blk.write(sector, data)
    for sector, data in writes.items():
        assert file_sectors(vduse_device.image, sector, len(data) // SECTOR) == data
    assert file_sectors(vduse_device.image, 3, 74) == bytes(74 * SECTOR)  # nothing between them


def test_file_data_reads_back_through_the_device(rig, vduse_device):
    data = os.urandom(40 * SECTOR)
    with open(vduse_device.image, "r+b") as disk:
        os.pwrite(disk.fileno(), data, 1000 * SECTOR)
    assert rig.blk.read(1000, 40) == data


def test_nothing_is_lost_across_a_reset(rig, vduse_device):
    """VDUSE offers no IOTLB_PERSIST: the engine replays the map after SET_STATUS(0)."""
    assert not rig.iotlb.persistent
    before = os.urandom(24 * SECTOR)
    rig.blk.write(500, before)
    with rig.iotlb.record() as trace:
        rig.iotlb.reset()
    assert sum(m.size for m in trace.messages(MessageType.UPDATE)) == REGION_SIZE  # replayed, not kept
    rig.blk.start()
    assert rig.blk.read(500, 24) == before
    after = os.urandom(16 * SECTOR)
    rig.blk.write(600, after)
    assert file_sectors(vduse_device.image, 500, 24) == before
    assert file_sectors(vduse_device.image, 600, 16) == after


def test_info_on_a_node_this_process_holds_falls_back_to_netlink(vduse_device):
    with VhostVdpa(vduse_device.node):
        code, out, err = vdpad("info", str(vduse_device.node), "--json")
    assert code == 0
    assert f"{vduse_device.node} is open by pid {os.getpid()} (this process)" in err
    info = json.loads(out)
    assert (info["source"], info["held_by"], info["device"]) == ("netlink", [os.getpid()], vduse_device.name)
    assert (info["device_id"], info["vqs"], info["vring_num_max"]) == (2, 1, 256)
    assert {"VERSION_1", "ACCESS_PLATFORM"} <= set(info["feature_names"])
    assert info["backend_features"] is None and info["iova_range"] is None  # only the fd can tell


def test_vendor_stats_are_not_supported(vduse_device):
    """VDUSE has no vendor queue statistics: the kernel answers EOPNOTSUPP (before asking for FEATURES_OK), exit 6."""
    code, out, err = vdpad("dev", "stats", vduse_device.name, "--queue", "0")
    assert (code, out) == (6, "")
    assert err == f"vdpad: DEV_VSTATS_GET {vduse_device.name} queue 0: Operation not supported (ENOTSUP)\n"
