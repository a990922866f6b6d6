"""Attach (create + bind) and detach (unbind + delete) a vdpa device, all or nothing."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import structlog

from vdpad.device.errors import InvalidArgument
from vdpad.device.flags import VirtioDeviceId
from vdpad.mgmt import binding, model
from vdpad.mgmt.binding import Binding, Driver
from vdpad.mgmt.errors import ModuleMissing, NotFound
from vdpad.mgmt.model import Device, MgmtDev
from vdpad.mgmt.netlink import VdpaNetlink

log = structlog.get_logger("vdpad.mgmt")

# Management devices whose driver we can name when they are missing.
MGMTDEV_MODULES = {"vdpasim_net": "vdpa_sim_net", "vdpasim_blk": "vdpa_sim_blk", "vduse": "vduse"}


@dataclass(frozen=True)
class Attached:
    device: Device
    binding: Binding


def find_mgmtdev(nl: VdpaNetlink, handle: str) -> MgmtDev:
    """The management device, or an error that says what exists or which module would add it."""
    model.split_handle("MGMTDEV_GET", handle)
    try:
        return nl.mgmtdev(handle)
    except NotFound:
        pass
    if handle in MGMTDEV_MODULES:
        raise ModuleMissing(MGMTDEV_MODULES[handle], f"management device {handle} is not registered")
    present = ", ".join(m.handle for m in nl.mgmtdevs()) or "none: load a vdpa driver (vdpa_sim_net, ...)"
    raise NotFound(errno.ENODEV, f"no management device {handle!r}; there are: {present}")


def check_attach(name: str, mgmtdev: str, *, mac: str | None = None, mtu: int | None = None,
                 max_vqp: int | None = None, features: int | None = None) -> None:
    """Refuse bad input (InvalidArgument) before asking the kernel anything."""
    op = "attach"
    model.check_name(op, name)
    model.split_handle(op, mgmtdev)
    if mac is not None:
        model.parse_mac(op, name, mac)
    if mtu is not None:
        model.check_mtu(op, name, mtu)
    if max_vqp is not None:
        model.check_max_vqp(op, name, max_vqp)
    if features is not None:
        model.check_features(op, name, features)


def attach(nl: VdpaNetlink, name: str, mgmtdev: str, *, mac: str | None = None, mtu: int | None = None,
           max_vqp: int | None = None, features: int | None = None, driver: Driver = Driver.VHOST_VDPA,
           timeout: float = binding.DEFAULT_TIMEOUT) -> Attached:
    """Create `name` on `mgmtdev`, bind it to `driver` and wait for its node.

    Everything that can be checked is checked before the device is made; a
    failure after DEV_NEW (or an interrupt) deletes the device again.
    """
    check_attach(name, mgmtdev, mac=mac, mtu=mtu, max_vqp=max_vqp, features=features)
    driver = Driver(driver)
    binding.require_driver(driver)
    mdev = find_mgmtdev(nl, mgmtdev)
    net_options = [n for n, v in (("mac", mac), ("mtu", mtu), ("max_vqp", max_vqp)) if v is not None]
    if net_options and VirtioDeviceId.NET not in mdev.classes:
        kinds = ", ".join(model.class_name(c) for c in mdev.classes) or "no"
        raise InvalidArgument("attach", name, f"{', '.join(net_options)} apply to net devices; "
                              f"{mgmtdev} makes {kinds} devices")
    nl.new_device(name, mgmtdev, mac=mac, mtu=mtu, max_vqp=max_vqp, features=features)
    try:
        bound = binding.bind(name, driver, timeout)
        return Attached(nl.device(name), bound)
    except BaseException as error:
        _undo(nl, name, error)
        raise


def _undo(nl: VdpaNetlink, name: str, error: BaseException) -> None:
    log.debug("attach failed: deleting the device again", device=name, error=str(error))
    try:
        # If someone opened the node meanwhile, DEV_DEL would wait for them
        # uninterruptibly: Busy leaves the device in place and says so instead.
        binding.refuse_if_open(name)
        nl.delete_device(name)  # unregistering unbinds it too (and needs no sysfs write)
    except Exception as undo_error:  # reported with the error that made us undo
        error.add_note(f"deleting {name} again failed too ({undo_error}): remove it with `vdpad detach {name}`")
    else:
        error.add_note(f"{name} was deleted again")


def detach(nl: VdpaNetlink, name: str) -> None:
    """Unbind `name` (refused while its node is open) and delete it."""
    nl.device(name)  # NotFound before touching sysfs
    binding.unbind(name)
    nl.delete_device(name)
