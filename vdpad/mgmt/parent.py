"""How a vdpa device's parent applies IOTLB messages, found from its management device.

vhost-vdpa hands each UPDATE and INVALIDATE to the parent driver in one of
three ways (drivers/vhost/vdpa.c), and what a commit or a reset means differs:

- BATCHED: the parent has set_map (vdpa_sim's default, mlx5, VDUSE). Inside
  a BATCH_BEGIN/END the device gets the whole new map at BATCH_END, at once.
- IMMEDIATE: the parent has dma_map (vdpa_sim with batch_mapping=0). Every
  message reaches the device as it is written; a batch groups nothing.
- PLATFORM_IOMMU: the parent has neither (ifcvf, octeon_ep, pds, vp_vdpa,
  most hardware). vhost-vdpa maps each message at once into an IOMMU domain
  of its own, which a device reset does not touch.

Userspace cannot ask the kernel which; the management device names the
parent driver, and this module knows the drivers.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import structlog

from vdpad.mgmt.binding import VDPA_BUS

log = structlog.get_logger("vdpad.mgmt")

SIM_BATCH_MAPPING = Path("/sys/module/vdpa_sim/parameters/batch_mapping")
SIM_USE_VA = Path("/sys/module/vdpa_sim/parameters/use_va")
PCI_DEVICES = Path("/sys/bus/pci/devices")
AUXILIARY_DEVICES = Path("/sys/bus/auxiliary/devices")


class MapKind(enum.Enum):
    BATCHED = "set_map"
    IMMEDIATE = "dma_map"
    PLATFORM_IOMMU = "platform_iommu"

    @property
    def atomic_batches(self) -> bool:
        """A batch reaches the device as one switch from the old map to the new."""
        return self is MapKind.BATCHED


# Parent drivers with set_map; every other driver on a bus maps through the platform IOMMU.
_SET_MAP_DRIVERS = frozenset({"mlx5_core", "mlx5_vdpa"})


def map_kind_of_mgmtdev(handle: str) -> tuple[MapKind, str]:
    """The kind, and what it was told by, for a management device handle ("vdpasim_net", "pci/0000:03:00.2")."""
    bus, _, name = handle.rpartition("/")
    if not bus and name in ("vdpasim_net", "vdpasim_blk"):
        batching = SIM_BATCH_MAPPING.read_text().strip() != "0"
        return (MapKind.BATCHED if batching else MapKind.IMMEDIATE), f"vdpa_sim batch_mapping={int(batching)}"
    if not bus and name == "vduse":
        return MapKind.BATCHED, "vduse"
    devices = {"pci": PCI_DEVICES, "auxiliary": AUXILIARY_DEVICES}.get(bus)
    driver_link = devices / name / "driver" if devices else None
    driver = os.path.basename(os.readlink(driver_link)) if driver_link and driver_link.is_symlink() else None
    if driver is None:
        raise LookupError(f"management device {handle!r}: no parent driver to tell how it maps")
    if driver in _SET_MAP_DRIVERS or driver.startswith("mlx5"):
        return MapKind.BATCHED, f"parent driver {driver}"
    return MapKind.PLATFORM_IOMMU, f"parent driver {driver}"


def pins_pages_of_mgmtdev(handle: str) -> bool:
    """Whether vhost-vdpa pins the pages a device of `handle` maps (PA mode), against RLIMIT_MEMLOCK.

    Parents that read the owner's virtual memory (vdpa_sim's use_va=Y, VDUSE) pin nothing; a parent
    that DMAs to physical pages (hardware, vdpa_sim's use_va=N) has each mapped page pinned.
    """
    bus, _, name = handle.rpartition("/")
    if not bus and name in ("vdpasim_net", "vdpasim_blk"):
        return SIM_USE_VA.read_text().strip() not in ("Y", "1")
    return not (not bus and name == "vduse")


def device_of_node(node: str | os.PathLike[str]) -> str:
    """The vdpa device whose vhost-vdpa node `node` is (/dev/vhost-vdpa-N -> its name on the bus)."""
    rdev = os.stat(node).st_rdev
    for dev_file in (VDPA_BUS / "devices").glob("*/vhost-vdpa-*/dev"):
        major, minor = (int(n) for n in dev_file.read_text().split(":"))
        if os.makedev(major, minor) == rdev:
            return dev_file.parent.parent.name
    raise LookupError(f"{os.fspath(node)} is not the vhost-vdpa node of any device on the vdpa bus")


def map_kind_of_node(node: str | os.PathLike[str]) -> MapKind | None:
    """The kind of the device behind a vhost-vdpa node; None when it cannot be told."""
    from vdpad.mgmt.netlink import VdpaNetlink  # pyroute2: only when asked

    try:
        name = device_of_node(node)
        with VdpaNetlink() as nl:
            handle = nl.device(name).mgmtdev
        kind, told_by = map_kind_of_mgmtdev(handle)
    except (OSError, LookupError) as error:
        log.debug("parent.map_kind", node=os.fspath(node), kind=None, reason=str(error))
        return None
    log.debug("parent.map_kind", node=os.fspath(node), device=name, mgmtdev=handle, kind=kind.value, by=told_by)
    return kind
