"""Device management: the vdpa netlink family, driver binding, attach and detach.

Beside the device layer: this makes and binds the devices whose fds
vdpad.device drives.
"""

from vdpad.mgmt.binding import Binding, Driver, bind, binding_of, unbind
from vdpad.mgmt.errors import (
    AlreadyExists, Busy, MgmtError, ModuleMissing, NotFound, NotSupported, PermissionDenied, WaitTimeout,
)
from vdpad.mgmt.lifecycle import Attached, attach, detach
from vdpad.mgmt.model import BlkConfig, Device, DeviceConfig, MgmtDev, NetConfig, QueueStats
from vdpad.mgmt.netlink import VdpaNetlink

__all__ = [
    "AlreadyExists", "Attached", "Binding", "BlkConfig", "Busy", "Device", "DeviceConfig", "Driver",
    "MgmtDev", "MgmtError", "ModuleMissing", "NetConfig", "NotFound", "NotSupported", "PermissionDenied",
    "QueueStats", "VdpaNetlink", "WaitTimeout", "attach", "bind", "binding_of", "detach", "unbind",
]
