"""The device layer: one class per vhost fd kind, typed methods, no policy.

VhostVdpa (/dev/vhost-vdpa-N) and VhostNet (/dev/vhost-net) are made of one
small class per concern: FdCore (open, close once, the raw ioctl, argument
checks), Features (owner, virtio and backend features), Vrings, DirtyLog,
IotlbWriter and IotlbReader (vhost-net only: a vhost-vdpa fd cannot be read).
Arguments that can be checked are refused with InvalidArgument before any
syscall; what the kernel refuses is a VhostError naming the operation, the
device and the arguments (NotSupportedError for ENOTTY and EOPNOTSUPP,
IotlbWriteError for IOTLB messages).
"""

from vdpad.device.errors import InvalidArgument, IotlbWriteError, NotSupportedError, VhostError
from vdpad.device.fd import DirtyLog, VhostFd
from vdpad.device.flags import BackendFeature, BlkFeature, DeviceStatus, NetFeature, VirtioFeature
from vdpad.device.iotlb_msg import Access, CodecError, IotlbMessage, MessageType, Version
from vdpad.device.net import GuestRegion, VhostNet
from vdpad.device.vdpa import IovaRange, VhostVdpa
from vdpad.device.vring import VringAddr, VringEndian

__all__ = [
    "Access", "BackendFeature", "BlkFeature", "CodecError", "DeviceStatus", "DirtyLog", "GuestRegion",
    "InvalidArgument", "IotlbMessage", "IotlbWriteError", "IovaRange", "MessageType", "NetFeature", "NotSupportedError",
    "Version", "VhostError", "VhostFd", "VhostNet", "VhostVdpa", "VirtioFeature", "VringAddr", "VringEndian",
]
