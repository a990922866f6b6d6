"""The device layer: one class per vhost fd kind, typed methods, no policy."""

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
