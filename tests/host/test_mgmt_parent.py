"""How a parent applies IOTLB messages, told from its management device (sysfs laid out in tmp_path).

The VM proves the vdpa_sim answers on the real sysfs (test_iotlb_engine.py);
hardware parents exist only here, as the sysfs links a PCI or auxiliary
parent has: <bus>/devices/<name>/driver -> .../drivers/<driver>.
"""

from __future__ import annotations

import pytest

from vdpad.mgmt import parent
from vdpad.mgmt.parent import MapKind, map_kind_of_mgmtdev


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(parent, "SIM_BATCH_MAPPING", tmp_path / "batch_mapping")
    monkeypatch.setattr(parent, "PCI_DEVICES", tmp_path / "pci")
    monkeypatch.setattr(parent, "AUXILIARY_DEVICES", tmp_path / "auxiliary")

    def driven_by(bus: str, name: str, driver: str) -> None:
        device = tmp_path / bus / name
        device.mkdir(parents=True)
        (device / "driver").symlink_to(tmp_path / "drivers" / driver)

    return tmp_path, driven_by


@pytest.mark.parametrize(("value", "kind"), [("1", MapKind.BATCHED), ("0", MapKind.IMMEDIATE)])
def test_vdpa_sim_follows_its_batch_mapping_parameter(sysfs, value, kind):
    root, _ = sysfs
    (root / "batch_mapping").write_text(value + "\n")
    assert map_kind_of_mgmtdev("vdpasim_net") == (kind, f"vdpa_sim batch_mapping={value}")
    assert map_kind_of_mgmtdev("vdpasim_blk")[0] is kind


def test_vduse_has_set_map():
    assert map_kind_of_mgmtdev("vduse")[0] is MapKind.BATCHED


@pytest.mark.parametrize(("bus", "driver", "kind"), [
    ("pci", "mlx5_core", MapKind.BATCHED),
    ("auxiliary", "mlx5_vdpa", MapKind.BATCHED),
    ("pci", "ifcvf", MapKind.PLATFORM_IOMMU),
    ("pci", "octeon_ep_vdpa", MapKind.PLATFORM_IOMMU),
    ("auxiliary", "pds_vdpa", MapKind.PLATFORM_IOMMU),
])
def test_hardware_parents_are_told_by_their_driver(sysfs, bus, driver, kind):
    _, driven_by = sysfs
    driven_by(bus, "0000:03:00.2", driver)
    assert map_kind_of_mgmtdev(f"{bus}/0000:03:00.2") == (kind, f"parent driver {driver}")
    assert kind.atomic_batches is (kind is MapKind.BATCHED)


def test_a_parent_without_a_driver_cannot_be_told(sysfs):
    with pytest.raises(LookupError, match="pci/0000:03:00.9"):
        map_kind_of_mgmtdev("pci/0000:03:00.9")
    with pytest.raises(LookupError, match="usb/1-1"):
        map_kind_of_mgmtdev("usb/1-1")
