"""The device layer: one class per vhost fd kind, typed methods, no policy.

Each fd kind is composed of the concerns its kernel driver serves, one small
class each: FdCore (open, close once, the raw ioctl, argument checks),
Features (owner, virtio and backend features), Vrings and IotlbWriter (every
kind); DirtyLog, LegacyEndian, Busyloop and IotlbReader (VhostNet only:
vhost-vdpa answers the log and endian ioctls with ENOTTY, ignores busy
polling and cannot be read). Every fd is held by an OwnedFd (closed once,
-1 after, never closed under a call in flight, closed with a ResourceWarning
if dropped open); EventFd is the eventfd a driver kicks and is called through.
Arguments that can be checked are refused with InvalidArgument before any
syscall; what the kernel refuses is a VhostError naming the operation, the
device and the arguments (NotSupportedError for ENOTTY and EOPNOTSUPP,
IotlbWriteError for IOTLB messages).
"""

from vdpad.device.errors import InvalidArgument, IotlbWriteError, NotSupportedError, VhostError
from vdpad.device.eventfd import EventFd
from vdpad.device.fd import DirtyLog, VhostFd
from vdpad.device.flags import (
    BackendFeature, BlkFeature, DeviceStatus, NetFeature, VirtioDeviceId, VirtioFeature,
)
from vdpad.device.iotlb_msg import Access, CodecError, IotlbBatch, IotlbMessage, MessageType, Version
from vdpad.device.net import GuestRegion, VhostNet
from vdpad.device.vdpa import IovaRange, VhostVdpa
from vdpad.device.vring import VringAddr, VringEndian

__all__ = [
    "Access", "BackendFeature", "BlkFeature", "CodecError", "DeviceStatus", "DirtyLog", "EventFd", "GuestRegion",
    "InvalidArgument", "IotlbBatch", "IotlbMessage", "IotlbWriteError", "IovaRange", "MessageType", "NetFeature", "NotSupportedError",
    "Version", "VhostError", "VhostFd", "VhostNet", "VhostVdpa", "VirtioDeviceId", "VirtioFeature", "VringAddr",
    "VringEndian",
]
